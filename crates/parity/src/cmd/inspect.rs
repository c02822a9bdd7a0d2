//! `parity inspect` (owned by the gguf work; placeholder until it lands).
use std::process::ExitCode;
#[derive(clap::Args)]
pub struct Args {}
pub fn run(_args: &Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("inspect is not implemented yet")
}
