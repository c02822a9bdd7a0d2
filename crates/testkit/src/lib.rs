//! Test support shared by the integration tests of every crate: where the
//! real model is cached, and skips that are counted instead of passing
//! silently.
//!
//! A test that cannot run (no cached model, no GPU) calls [`skip`]: it prints
//! `SKIPPED: <test>: <reason>` and appends that line to the file named by
//! `$PARITY_SKIP_LOG`, which `scripts/test` sets and counts in its summary
//! line. With `PARITY_REQUIRE_MODEL=1` (CI sets it after fetching the model)
//! a missing model fails the test instead.

use std::io::Write;
use std::path::PathBuf;

/// The reference model's file name in the cache (`scripts/fetch-model`).
pub const MODEL_FILE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// The cache directory shared with `scripts/fetch-model`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("QWEN2_PARITY_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache").join("qwen2-parity"),
    }
}

/// The cached real model, if present (no skip recorded).
pub fn cached_model() -> Option<PathBuf> {
    let path = cache_dir().join(MODEL_FILE);
    path.is_file().then_some(path)
}

/// Record that the current test did not run, and why.
pub fn skip(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unnamed test");
    let line = format!("SKIPPED: {test}: {reason}");
    println!("{line}");
    if let Some(log) = std::env::var_os("PARITY_SKIP_LOG") {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            // One write of the whole line: O_APPEND keeps lines from
            // parallel tests whole.
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = appended {
            panic!("cannot record the skip in PARITY_SKIP_LOG: {e}");
        }
    }
}

/// The real model, or `None` after recording a skip; with
/// `PARITY_REQUIRE_MODEL=1` a missing model is a failure.
pub fn real_model() -> Option<PathBuf> {
    if let Some(path) = cached_model() {
        return Some(path);
    }
    if std::env::var_os("PARITY_REQUIRE_MODEL").is_some_and(|v| v == "1") {
        panic!("PARITY_REQUIRE_MODEL=1 but the real model is not cached in {}: run scripts/fetch-model", cache_dir().display());
    }
    skip("real model not cached (run scripts/fetch-model)");
    None
}

/// The real model's path, or return from the test after recording the skip.
#[macro_export]
macro_rules! real_model_or_skip {
    () => {
        match $crate::real_model() {
            Some(p) => p,
            None => return,
        }
    };
}

/// splitmix64 (the sequence of `engine::checkpoint::splitmix64`, which this
/// crate sits below): a fixed pseudo-random sequence for reproducible mutations.
pub fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One mutation of `base`, biased to the header and tensor table where the
/// parser reads sizes (the data section is only bounds-checked).
pub fn mutate(base: &[u8], header_len: usize, state: &mut u64) -> Vec<u8> {
    let mut b = base.to_vec();
    let pos = |s: &mut u64, len: usize| if next(s).is_multiple_of(4) { (next(s) as usize) % len } else { (next(s) as usize) % header_len.min(len) };
    for _ in 0..1 + next(state) % 4 {
        match next(state) % 6 {
            0 => {
                let p = pos(state, b.len());
                b[p] ^= 1 << (next(state) % 8);
            }
            1 => {
                let p = pos(state, b.len().saturating_sub(8));
                let v: u64 = [0, 1, u64::MAX, 1 << 60, 1 << 32, 1 << 31, 0xFFFF_FFFF, next(state)][(next(state) % 8) as usize];
                b[p..p + 8].copy_from_slice(&v.to_le_bytes());
            }
            2 => {
                let p = pos(state, b.len().saturating_sub(4));
                let v: u32 = [0, 1, u32::MAX, 4, 16, 31, 1 << 31, next(state) as u32][(next(state) % 8) as usize];
                b[p..p + 4].copy_from_slice(&v.to_le_bytes());
            }
            3 => {
                let cut = pos(state, b.len());
                b.truncate(cut);
            }
            4 => {
                let p = pos(state, b.len());
                let n = (next(state) as usize % 64).min(b.len() - p);
                let chunk = b[p..p + n].to_vec();
                b.splice(p..p, chunk);
            }
            _ => {
                let p = pos(state, b.len());
                b[p] = next(state) as u8;
            }
        }
        if b.len() < 8 {
            break;
        }
    }
    b
}
