//! Shared by the parity crate's integration tests: the cached real model and
//! the built binary.
#![allow(dead_code)]

use std::process::{Command, Output};

/// The real model's path, or return from the test after recording the skip.
#[allow(unused_macros)]
macro_rules! real_model_or_skip {
    () => {
        testkit::real_model_or_skip!()
    };
}

/// Run the built `parity` binary.
pub fn parity(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parity")).args(args).output().expect("run parity")
}
