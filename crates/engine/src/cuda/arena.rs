//! Device memory that an observed pass's op outputs are carved from, so
//! that its checkpoints reach the host in one copy.
//!
//! A pass that captures every stage starts one host copy per checkpoint:
//! 411 for a decode step of Qwen2-0.5B, each a `cuMemcpyAsync` of a few KB
//! that the stream waits for before the next kernel. Here, once a pass has
//! started its first checkpoint copy, every op output after it is a slice of
//! one device buffer, handed out in order and never freed on its own (a
//! prefill's dequantized matrices are scratch, not outputs: they come from
//! the pool). A checkpoint whose tensor is such a slice is only noted (its offset and
//! shape); when the pass's copies are finished, the arena's bytes up to the
//! last noted slice cross to the host in one copy, and each noted range is
//! handed out from there. Outputs are never written after the op that made
//! them returns, so a slice holds its checkpoint's values at the end of the
//! pass as it did when noted.
//!
//! When the arena is full, outputs come from the memory pool again and their
//! checkpoints are copied one by one, as without it. The arena starts again
//! from its first byte at the end of a pass, once no slice of it is alive
//! (counted by [`Ticket`]s); while one is, it goes on from where it was.
//! `QWEN2_PARITY_CUDA_CHECKPOINT_ARENA_MIB` sets its size (default 64; 0
//! turns it off, for A/B).

use anyhow::{anyhow, Context, Result};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Values between the starts of two slices: 64 f32 (256 bytes), the
/// alignment `cuMemAlloc` gives and the kernels' vector loads expect.
const ALIGN_VALUES: usize = 64;

/// Default size in MiB (`QWEN2_PARITY_CUDA_CHECKPOINT_ARENA_MIB`).
const DEFAULT_MIB: usize = 64;

/// One live slice of the arena; the count drops when the slice does.
pub(super) struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) struct Arena {
    /// The memory, allocated at the first observed pass (None until then,
    /// and when the size is 0).
    mem: Option<CudaSlice<f32>>,
    /// Its size in f32 values.
    capacity: usize,
    /// Values handed out since the last reset.
    used: usize,
    /// Whether op outputs come from here now (from a pass's first
    /// checkpoint copy to the end of its copies).
    active: bool,
    live: Arc<AtomicUsize>,
}

impl Arena {
    /// The arena the environment asks for (nothing is allocated yet).
    pub(super) fn from_env() -> Result<Self> {
        let mib = match std::env::var("QWEN2_PARITY_CUDA_CHECKPOINT_ARENA_MIB") {
            Ok(v) => v.parse::<usize>().map_err(|_| anyhow!("QWEN2_PARITY_CUDA_CHECKPOINT_ARENA_MIB={v}: expected a size in MiB (0 turns it off)"))?,
            Err(_) => DEFAULT_MIB,
        };
        Ok(Arena { mem: None, capacity: mib << 18, used: 0, active: false, live: Arc::new(AtomicUsize::new(0)) })
    }

    /// A new size in MiB (0: off), taking effect at the next observed pass.
    pub(super) fn resize(&mut self, mib: usize) -> Result<()> {
        anyhow::ensure!(!self.active && self.live.load(Ordering::Relaxed) == 0, "the checkpoint arena is resized while in use");
        self.mem = None;
        self.capacity = mib << 18;
        self.used = 0;
        Ok(())
    }

    /// From now on, op outputs come from the arena while it has room
    /// (allocated here the first time).
    pub(super) fn activate(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        if self.active || self.capacity == 0 {
            return Ok(());
        }
        if self.mem.is_none() {
            // SAFETY: uninitialized device memory; a slice is only ever read
            // after the op it was handed to has written all of it.
            let mem = unsafe { stream.alloc::<f32>(self.capacity) }.with_context(|| format!("allocating the {} MiB checkpoint arena on the GPU", self.capacity >> 18))?;
            self.mem = Some(mem);
        }
        self.active = true;
        Ok(())
    }

    /// The device address of the arena's first value.
    fn base(&self, stream: &Arc<CudaStream>) -> Option<CUdeviceptr> {
        self.mem.as_ref().map(|m| m.device_ptr(stream).0)
    }

    /// `n` values of the arena, when it is active and has room: the slice
    /// (a `CudaSlice` over the arena's memory that must never be freed, see
    /// `CudaBuf`'s Drop) and its ticket.
    pub(super) fn take(&mut self, stream: &Arc<CudaStream>, n: usize) -> Option<(CudaSlice<f32>, Ticket)> {
        if !self.active {
            return None;
        }
        let start = self.used;
        let end = start.checked_add(n)?;
        if end > self.capacity {
            return None;
        }
        let base = self.base(stream)?;
        self.used = end.next_multiple_of(ALIGN_VALUES).min(self.capacity);
        self.live.fetch_add(1, Ordering::Relaxed);
        // SAFETY: [start, start + n) lies inside the arena's allocation and
        // is handed out to no other slice until the arena is reset, which
        // happens only when no ticket is alive. The slice is leaked, never
        // freed, when dropped (CudaBuf's Drop, for a buffer with a ticket).
        let slice = unsafe { stream.upgrade_device_ptr::<f32>(base + (start * 4) as u64, n) };
        Some((slice, Ticket(self.live.clone())))
    }

    /// Where `slice` starts in the arena, in values, when it is one of its slices.
    pub(super) fn offset_of(&self, stream: &Arc<CudaStream>, slice: &CudaSlice<f32>) -> Option<usize> {
        let base = self.base(stream)?;
        let ptr = slice.device_ptr(stream).0;
        let offset = ptr.checked_sub(base)? as usize / 4;
        (offset + slice.len() <= self.capacity).then_some(offset)
    }

    /// The arena's first `n` values, to copy to the host.
    pub(super) fn prefix(&self, n: usize) -> Result<cudarc::driver::CudaView<'_, f32>> {
        let mem = self.mem.as_ref().context("a checkpoint noted in an arena that was never allocated")?;
        Ok(mem.slice(..n))
    }

    /// The pass's copies are finished: outputs come from the pool until the
    /// next pass's first checkpoint, and the arena starts again from its
    /// first value unless a slice of it is still alive.
    pub(super) fn deactivate(&mut self) {
        self.active = false;
        if self.live.load(Ordering::Relaxed) == 0 {
            self.used = 0;
        }
    }
}
