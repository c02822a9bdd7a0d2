//! `parity run`: llama.cpp and our engine on the same GGUF and prompt,
//! compared stage by stage; names the first divergence. Exit 0 when every
//! stage is within its threshold, 1 when one diverges, 2 on bad input.

use crate::diff::Verdict;
use crate::layers::select_layers;
use crate::ours::{BackendKind, EngineOptions, Kv, NumericsArg};
use crate::report::{render_terminal, write_reports};
use crate::session::{compare, resolve_thresholds, ModelFile, Pair};
use crate::thresholds::Thresholds;
use anyhow::{Context, Result};
use engine::fault::Fault;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model (default: the cached reference model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Backend of our engine.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// Compare one layer only (plus embed, final_norm, logits).
    #[arg(long, conflicts_with = "layers")]
    pub layer: Option<usize>,
    /// Compare these layers: N, A..=B (both ends included), or a list: 0..=3,12.
    #[arg(long)]
    pub layers: Option<String>,
    /// Greedy decode steps after the prefill (both engines get llama.cpp's tokens).
    #[arg(long, default_value_t = 0)]
    pub decode: usize,
    /// How our engine rounds activations: like ggml's CPU backend (q8
    /// activations in matmuls, f16 Q and probabilities), or exact floats.
    #[arg(long, value_enum, default_value = "ggml")]
    pub numerics: NumericsArg,
    /// KV cache element type of both engines (f16: llama.cpp's default).
    #[arg(long, value_enum, default_value = "f16")]
    pub kv: Kv,
    /// Thresholds file (default: fixtures/thresholds/<sha256[..16]>-<backend>.json).
    #[arg(long, conflicts_with = "threshold")]
    pub thresholds: Option<PathBuf>,
    /// One max-abs threshold for every stage instead of a file.
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Isolation: feed llama.cpp's tensor into every stage, so each stage's
    /// error is its own op's, not drift from upstream.
    #[arg(long)]
    pub isolate: bool,
    /// Seed a fault variant into our engine (none, rope-adjacent, gqa-modulo,
    /// no-qkv-bias, swiglu-swapped, no-attn-scale, kv-offset).
    #[arg(long, default_value = "none", value_parser = Fault::parse_or_list)]
    pub fault: Fault,
    /// llama.cpp threads (default: all).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the Markdown report here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write the self-contained HTML report here.
    #[arg(long)]
    pub html: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let model = ModelFile::open(&crate::model_path::resolve(args.model.as_deref())?)?;
    let layers = select_layers(args.layer, args.layers.as_deref(), model.cfg.n_layer)?;
    // Validate the cheap things before the expensive loads.
    if let Some(path) = &args.thresholds {
        Thresholds::load(path).context("reading --thresholds")?;
    }
    let eo = EngineOptions { kv: args.kv.into(), numerics: args.numerics.into(), fault: args.fault, ..EngineOptions::new(args.backend) };
    let mut pair = Pair::load(&model, eo, args.threads)?;
    let thresholds = resolve_thresholds(args.threshold, args.thresholds.as_deref(), &pair.model_sha256, args.backend.name())?;
    let (ours, reference) = pair.capture(&args.prompt, args.chat, args.decode, layers.clone(), args.isolate)?;
    let report = compare(&ours, &reference, &thresholds, layers.as_deref());

    write_reports(&report, args.json.as_deref(), args.markdown.as_deref(), args.html.as_deref())?;
    if args.fault != Fault::None {
        println!("seeded fault: {}", args.fault);
    }
    if args.isolate {
        println!("mode: isolation (every stage fed llama.cpp's inputs), numerics {}", pair.ours.numerics);
    } else {
        println!("mode: free-running, numerics {}", pair.ours.numerics);
    }
    print!("{}", render_terminal(&report, layers.as_deref()));
    Ok(match report.verdict {
        Verdict::Match => ExitCode::SUCCESS,
        Verdict::Diverged => ExitCode::from(1),
    })
}
