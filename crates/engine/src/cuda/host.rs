//! Host memory for checkpoint copies.
//!
//! Every checkpoint the capture keeps is a fresh vector, and a fresh
//! vector's pages are faulted in one 4 KiB page at a time as the copy first
//! touches them: on the H100 host the copies ran at about 0.6 GB/s, the speed
//! of the page faults, not of the link (page-locked staging made no
//! difference). Backing the vector with transparent huge pages (2 MiB) takes
//! 512 times fewer faults where the kernel allows it (`madvise` mode, the
//! usual default); where it does not, the advice is ignored.

/// Bytes in a transparent huge page on x86-64 and aarch64 (4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// A new vector holding `src`, its whole huge pages advised to the kernel
/// as such before the copy touches them.
pub(super) fn copy_to_fresh_vec(src: &[f32]) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(src.len());
    let bytes = std::mem::size_of_val(src);
    if bytes >= 2 * HUGE_PAGE {
        let start = out.as_mut_ptr() as usize;
        let first = start.next_multiple_of(HUGE_PAGE);
        let end = (start + bytes) / HUGE_PAGE * HUGE_PAGE;
        if end > first {
            advise_huge_pages(first, end - first);
        }
    }
    out.extend_from_slice(src);
    out
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(addr: usize, len: usize) {
    // SAFETY: [addr, addr + len) is page-aligned and lies inside the
    // allocation `copy_to_fresh_vec` just made (its capacity covers it), which
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

    #[test]
    fn the_copy_is_the_source_whatever_its_size() {
        for n in [0, 1, 1000, (HUGE_PAGE / 4) * 2 + 3, (HUGE_PAGE / 4) * 5 + 17] {
            let src: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            assert_eq!(copy_to_fresh_vec(&src), src);
        }
    }
}
