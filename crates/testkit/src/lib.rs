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
