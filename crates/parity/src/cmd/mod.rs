//! One module per CLI verb. Each has `Args` (clap) and `run(&Args) -> anyhow::Result<ExitCode>`:
//! `Ok` carries the verdict's exit code (0 pass, 1 gate failed); `Err` is
//! a usage or input error, printed on one line with exit code 2.

pub mod bench;
pub mod calibrate;
pub mod capture;
pub mod diff;
pub mod faults;
pub mod gate;
pub mod generate;
pub mod inspect;
pub mod run;
pub mod selftest;
pub mod variant;
pub mod weights;
