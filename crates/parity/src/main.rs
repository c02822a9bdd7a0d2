//! `parity`: run a Qwen2 engine and llama.cpp side by side and find where they diverge.

use clap::{Parser, Subcommand};
use parity::cmd;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "parity", version, about = "Stage-by-stage parity of a Qwen2 engine against llama.cpp")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a GGUF's architecture, config, metadata and tensors.
    Inspect(cmd::inspect::Args),
    /// Check our dequantization of every tensor against ggml's own, bit for bit.
    Weights(cmd::weights::Args),
    /// Run one engine and dump every checkpoint (.npy + manifest.json).
    Capture(cmd::capture::Args),
    /// Run llama.cpp and our engine on one prompt; name the first divergence.
    Run(cmd::run::Args),
    /// Gate every prompt of a set (CI): summary table, JUnit XML, shards; exit 1 on any divergence.
    Gate(cmd::gate::Args),
    /// Both engines generate greedily; the texts side by side and the first token where they part.
    Generate(cmd::generate::Args),
    /// Calibrate per-stage thresholds on clean prompts.
    Calibrate(cmd::calibrate::Args),
    /// Time our engine (all checkpoints, none), or whole verdicts cold and warm (--verdict).
    Bench(cmd::bench::Args),
    /// Compare two capture dumps stage by stage: first divergence, largest jump, reports.
    Diff(cmd::diff::Args),
    /// List the fault catalogue: each bug, the op it changes, where it must be named.
    Faults(cmd::faults::Args),
    /// Seed every fault at a random layer and check each is named exactly; clean runs must match.
    Selftest(cmd::selftest::Args),
    /// Make (once, cached beside the model) an F32 copy or a llama.cpp quantization of the model.
    Variant(cmd::variant::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Weights(args) => cmd::weights::run(args),
        Command::Capture(args) => cmd::capture::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::Gate(args) => cmd::gate::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Calibrate(args) => cmd::calibrate::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Diff(args) => cmd::diff::run(args),
        Command::Variant(args) => cmd::variant::run(args),
        Command::Faults(args) => cmd::faults::run(args),
        Command::Selftest(args) => cmd::selftest::run(args),
    };
    parity::verdict_bench::print_peak_rss_if_asked();
    match result {
        Ok(code) => code,
        Err(err) => {
            // One line: the whole context chain, no backtrace.
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
