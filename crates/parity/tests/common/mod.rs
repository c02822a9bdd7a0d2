//! Shared by the parity crate's integration tests: the cached real model and
//! the built binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// The reference model where `scripts/fetch-model` caches it, if present.
pub fn real_model() -> Option<PathBuf> {
    let path = parity::model_path::cache_dir().join(parity::model_path::DEFAULT_MODEL_FILE);
    path.is_file().then_some(path)
}

/// The real model's path, or return from the test saying it was skipped.
macro_rules! real_model_or_skip {
    () => {
        match common::real_model() {
            Some(p) => p,
            None => {
                println!("SKIPPED: real model not cached");
                return;
            }
        }
    };
}

/// Run the built `parity` binary.
pub fn parity(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parity")).args(args).output().expect("run parity")
}
