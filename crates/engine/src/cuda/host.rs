//! Host memory for checkpoint copies.
//!
//! Every checkpoint the capture keeps is a fresh vector, filled from the
//! page-locked memory its device-to-host copy landed in. Filling fresh
//! memory is the host's cost of a capture, and for a pass with every stage
//! captured it is most of the pass (a 512-token prefill's 411 checkpoints
//! weigh 2.15 GB): each new page is faulted in as the copy first touches it,
//! one 4 KiB page at a time, about 2 GB/s on one core (`bench/host_fill.c`).
//! Three things make it cheaper:
//!
//! - glibc keeps freed memory for reuse ([`keep_freed_host_memory`]), so the
//!   next pass's vectors land in pages already mapped: no faults at all;
//! - the vectors are allocated on the calling thread (glibc's main heap,
//!   the one that keeps; heaps of other threads are returned to the kernel
//!   whole once empty) and filled by all cores, in pieces, so the faults that
//!   remain (tensors above glibc's largest mmap threshold, 32 MiB: the
//!   logits) and the copying are shared out;
//! - a vector of 4 MiB or more is backed by transparent huge pages (2 MiB)
//!   where the kernel allows it (`madvise` mode, the usual default): 512
//!   times fewer faults.
//!
//! On the H100 machine (16 cores), every stage of a 512-token prefill took
//! 568 ms with neither of the first two, 396 ms with the heap kept on one
//! thread, 176 ms on every core with glibc as it is, 161 ms with both
//! (`reports/gpu/2026-12-07-h100-decode-kernels/`).

use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Bytes in a transparent huge page on x86-64 and aarch64 (4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// Values each parallel task copies (4 MiB): large enough that a task's
/// overhead is nothing next to its copy, small enough that the logits (311
/// MB at 512 tokens) are shared by every core.
const PIECE: usize = 1 << 20;

/// Below this many values in all (4 MiB) the copies run on the calling
/// thread: a decode step's checkpoints are a few hundred KB.
const PARALLEL_FROM: usize = 1 << 20;

/// glibc's largest mmap threshold on 64-bit targets: blocks below it come
/// from the heap, and with the threshold fixed they stay there when freed.
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Free memory at the top of the heap glibc may keep instead of returning.
const TRIM_THRESHOLD: i32 = 2_000_000_000;

/// Ask glibc, once per process, to keep freed memory for reuse: blocks up to
/// 32 MiB from the heap, never trimmed below 2 GB of free space. A run
/// drops each pass's checkpoints, and the next pass's land in the same pages
/// instead of pages mapped and faulted in anew. The process keeps its peak
/// heap until it exits (what one pass with every stage captured weighs).
/// `QWEN2_PARITY_CUDA_KEEP_HOST_MEMORY=0` leaves glibc as it is (to measure
/// this). Returns whether the setting is in force.
pub(super) fn keep_freed_host_memory() -> bool {
    static IN_FORCE: OnceLock<bool> = OnceLock::new();
    *IN_FORCE.get_or_init(|| std::env::var("QWEN2_PARITY_CUDA_KEEP_HOST_MEMORY").map_or(true, |v| v != "0") && set_heap_thresholds())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_heap_thresholds() -> bool {
    // SAFETY: mallopt only changes two of glibc's malloc parameters; it is
    // thread-safe (it takes the arena lock) and changes no memory already
    // handed out. It returns 1 on success, 0 for a value out of range.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_heap_thresholds() -> bool {
    false
}

/// A new vector holding each of `srcs`, in order: allocated here, filled
/// by all cores when there is enough to fill.
pub(super) fn copy_to_fresh_vecs(srcs: &[&[f32]]) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = srcs.iter().map(|src| fresh_vec(src.len())).collect();
    let total: usize = srcs.iter().map(|s| s.len()).sum();
    // (destination, source) pieces covering every vector's first len values.
    let pieces = outs.iter_mut().zip(srcs).flat_map(|(out, src)| out.spare_capacity_mut()[..src.len()].chunks_mut(PIECE).zip(src.chunks(PIECE)));
    if total >= PARALLEL_FROM {
        pieces.collect::<Vec<_>>().into_par_iter().for_each(|(dst, src)| write(dst, src));
    } else {
        pieces.for_each(|(dst, src)| write(dst, src));
    }
    for (out, src) in outs.iter_mut().zip(srcs) {
        // SAFETY: the pieces above cover the first src.len() values of the
        // vector's capacity (chunks of spare_capacity_mut()[..len]), and
        // every piece has been written: for_each returns only once all its
        // tasks have finished.
        unsafe { out.set_len(src.len()) };
    }
    outs
}

/// A new vector holding `src`.
pub(super) fn copy_to_fresh_vec(src: &[f32]) -> Vec<f32> {
    copy_to_fresh_vecs(&[src]).pop().expect("one vector for one source")
}

fn write(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    // Compiles to a memcpy.
    for (d, s) in dst.iter_mut().zip(src) {
        d.write(*s);
    }
}

/// An empty vector with capacity for `len` values, its whole huge pages
/// advised to the kernel as such before anything touches them.
fn fresh_vec(len: usize) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let bytes = len * std::mem::size_of::<f32>();
    if bytes >= 2 * HUGE_PAGE {
        let start = out.as_mut_ptr() as usize;
        let first = start.next_multiple_of(HUGE_PAGE);
        let end = (start + bytes) / HUGE_PAGE * HUGE_PAGE;
        if end > first {
            advise_huge_pages(first, end - first);
        }
    }
    out
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(addr: usize, len: usize) {
    // SAFETY: [addr, addr + len) is page-aligned and lies inside the
    // allocation `fresh_vec` just made (its capacity covers it), which
    // nothing else references yet. MADV_HUGEPAGE changes no contents and no
    // mapping: it only tells the kernel how to back pages not yet touched.
    // Its result is ignored on purpose: without huge pages the copy is
    // merely slower.
    let _ = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_addr: usize, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|i| i as f32 * scale).collect()
    }

    #[test]
    fn the_copy_is_the_source_whatever_its_size() {
        for n in [0, 1, 1000, (HUGE_PAGE / 4) * 2 + 3, (HUGE_PAGE / 4) * 5 + 17, PIECE * 3 + 1] {
            let src = ramp(n, 0.5);
            assert_eq!(copy_to_fresh_vec(&src), src);
        }
    }

    #[test]
    fn many_sources_come_back_in_order_serial_and_parallel() {
        // Small (one thread) and large (pieces over all cores, some split
        // mid-vector, one empty between them).
        for sizes in [vec![3, 0, 700, 1], vec![PIECE + 5, 17, 0, 2 * PIECE - 1, PARALLEL_FROM]] {
            let srcs: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(k, &n)| ramp(n, k as f32 + 0.25)).collect();
            let refs: Vec<&[f32]> = srcs.iter().map(|s| s.as_slice()).collect();
            assert_eq!(copy_to_fresh_vecs(&refs), srcs);
        }
    }

    #[test]
    fn keeping_freed_memory_is_decided_once_per_process() {
        let first = keep_freed_host_memory();
        assert_eq!(keep_freed_host_memory(), first);
        if cfg!(all(target_os = "linux", target_env = "gnu")) && std::env::var("QWEN2_PARITY_CUDA_KEEP_HOST_MEMORY").as_deref() != Ok("0") {
            assert!(first, "glibc refused the thresholds");
        }
    }
}
