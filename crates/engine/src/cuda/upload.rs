//! The weights' bytes to the GPU through two page-locked buffers.
//!
//! A copy from pageable memory (the mapped GGUF) is staged by the driver
//! into its own page-locked memory before the copy engine moves it, one
//! piece at a time, with the host waiting on each piece. Here the host
//! copies one chunk of the file into a page-locked buffer while the copy
//! engine moves the previous chunk out of the other buffer, so the host's
//! copy and the transfer overlap, and the transfer runs at the link's speed.

use anyhow::{Context, Result};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use std::sync::Arc;

/// Bytes per chunk: large enough that a chunk's fixed costs (an event, a
/// few microseconds) are small next to the host's copy of it (about 100 us
/// at 10 GB/s), small enough that the kernel tests' larger matrices cross
/// chunk boundaries.
const CHUNK: usize = 1 << 20;

/// Two page-locked buffers and, for each, the copy out of it last started.
pub(super) struct Uploader {
    stream: Arc<CudaStream>,
    buffers: [PinnedHostSlice<u8>; 2],
    /// Recorded after the last copy out of each buffer; the buffer may be
    /// written again once it has completed.
    copied: [Option<CudaEvent>; 2],
    next: usize,
}

impl Uploader {
    pub(super) fn new(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<Self> {
        // SAFETY: flags 0 asks for plain page-locked memory; its contents
        // are uninitialized, and only bytes this uploader wrote first are
        // ever copied out of it.
        let alloc = || unsafe { ctx.alloc_pinned_with_flags::<u8>(CHUNK, 0) }.with_context(|| format!("allocating {} MiB of page-locked host memory", CHUNK >> 20));
        Ok(Uploader { stream: stream.clone(), buffers: [alloc()?, alloc()?], copied: [None, None], next: 0 })
    }

    /// A device copy of `bytes`. The copies may still be in flight when it
    /// returns: they are ordered on the backend's stream before any kernel
    /// that reads the slice, and `finish` waits for them.
    pub(super) fn upload(&mut self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        // SAFETY: every byte of the new slice is written by the copies
        // below (the chunks cover `bytes` exactly) before anything on the
        // stream reads it.
        let mut dst = unsafe { self.stream.alloc::<u8>(bytes.len()) }.context("allocating device memory for a weight")?;
        let mut offset = 0;
        for chunk in bytes.chunks(CHUNK) {
            let i = self.next;
            self.next = 1 - i;
            if let Some(done) = self.copied[i].take() {
                done.synchronize().context("waiting for an earlier weight copy")?;
            }
            let host = &mut self.buffers[i].as_mut_slice().context("page-locked upload buffer")?[..chunk.len()];
            host.copy_from_slice(chunk);
            let mut view = dst.slice_mut(offset..offset + chunk.len());
            // From page-locked memory the copy is asynchronous: the event
            // recorded after it says when the buffer may be written again.
            self.stream.memcpy_htod(&*host, &mut view).context("host-to-device copy")?;
            self.copied[i] = Some(self.stream.record_event(None).context("recording a weight copy")?);
            offset += chunk.len();
        }
        Ok(dst)
    }

    /// Wait for every copy started (before the buffers are freed).
    pub(super) fn finish(&mut self) -> Result<()> {
        for done in self.copied.iter_mut().filter_map(Option::take) {
            done.synchronize().context("waiting for the last weight copies")?;
        }
        Ok(())
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        // A copy may not outlive the buffer it reads (an error path that
        // skipped `finish`); errors here have nowhere to go.
        let _ = self.finish();
    }
}
