//! `parity capture` (owned by the llama-ref work; placeholder until it lands).
use std::process::ExitCode;
#[derive(clap::Args)]
pub struct Args {}
pub fn run(_args: &Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("capture is not implemented yet")
}
