//! `parity run`: llama.cpp and our engine on the same GGUF and prompt,
//! compared stage by stage; names the first divergence. Exit 0 when every
//! stage is within its threshold, 1 when one diverges, 2 on bad input.

use crate::cmd::capture::Kv;
use crate::cmd::common;
use crate::diff::{diff_captures, DiffReport, Verdict};
use crate::ours::{open_model, BackendKind, Mode, OurEngine};
use crate::report::{render_terminal, write_reports};
use crate::thresholds::Thresholds;
use anyhow::{bail, Context, Result};
use capture::KvType;
use capture::Capture;
use engine::fault::Fault;
use capture::stage::StageId;
use llama_ref::{LlamaRef, RefOptions};
use std::path::{Path, PathBuf};
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
    /// Compare layers A..B (both included).
    #[arg(long)]
    pub layers: Option<String>,
    /// Greedy decode steps after the prefill (both engines get llama.cpp's tokens).
    #[arg(long, default_value_t = 0)]
    pub decode: usize,
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
    #[arg(long, default_value = "none", value_parser = parse_fault)]
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

pub fn parse_fault(s: &str) -> Result<Fault, String> {
    Fault::parse(s).ok_or_else(|| {
        let names: Vec<_> = Fault::ALL.iter().map(|f| f.name()).collect();
        format!("unknown fault {s:?}; one of: {}", names.join(", "))
    })
}

/// Thresholds from `--threshold`, `--thresholds`, or the calibrated file for this model and backend.
pub fn load_thresholds(threshold: Option<f64>, file: Option<&Path>, model_sha256: &str, backend: BackendKind) -> Result<Thresholds> {
    common::resolve_thresholds(threshold, file, model_sha256, backend.name())
}

/// Everything both engines need for a series of prompts on one model.
pub struct Pair {
    pub llama: LlamaRef,
    pub ours: OurEngine,
    pub model_sha256: String,
    pub n_layer: usize,
    pub n_ctx_train: usize,
    pub kv: Kv,
    pub threads: Option<usize>,
}

impl Pair {
    pub fn load(model: &Path, backend: BackendKind, kv: Kv, fault: Fault, max_ctx: usize, threads: Option<usize>) -> Result<Pair> {
        let (gguf, cfg) = open_model(model)?;
        if backend == BackendKind::Cuda {
            crate::ours::cuda_available().map_err(anyhow::Error::msg)?;
        }
        let model_sha256 = common::sha256_file(model)?;
        let llama = LlamaRef::load(model)?;
        let ctx = max_ctx.min(cfg.n_ctx_train.max(1));
        let ours = OurEngine::load(&gguf, &cfg, backend, KvType::from(kv), ctx, fault)?;
        Ok(Pair { llama, ours, model_sha256, n_layer: cfg.n_layer, n_ctx_train: cfg.n_ctx_train, kv, threads })
    }

    /// Both engines on one prompt: (ours, llama.cpp).
    pub fn capture(&mut self, prompt: &str, chat: bool, n_decode: usize, layers: Option<Vec<usize>>, isolate: bool) -> Result<(Capture, Capture)> {
        let tokens = self.llama.tokenize(prompt, chat)?;
        common::check_context(tokens.len(), n_decode, self.n_ctx_train)?;
        let mut opts = RefOptions { kv_type: self.kv.into(), layers: layers.clone(), ..RefOptions::default() };
        if let Some(t) = self.threads {
            opts.threads = t;
        }
        let mut reference = self.llama.run(&tokens, n_decode, &opts)?;
        // Our engine decodes llama.cpp's tokens, so both see the same inputs.
        let forced = &reference.generated[..n_decode];
        let mode = if isolate { Mode::Isolate(&reference) } else { Mode::Observe };
        let mut ours = self.ours.run(&tokens, n_decode, Some(forced), layers, mode)?;
        for c in [&mut ours, &mut reference] {
            c.prompt = prompt.to_string();
            c.chat = chat;
            c.model_sha256 = self.model_sha256.clone();
        }
        Ok((ours, reference))
    }
}

/// Compare with `layers` selected (global stages always kept).
pub fn compare(ours: &Capture, reference: &Capture, thresholds: &Thresholds, layers: Option<&[usize]>) -> DiffReport {
    let filter = |id: &StageId| match (layers, id.layer) {
        (Some(sel), Some(l)) => sel.contains(&l),
        _ => true,
    };
    diff_captures(ours, reference, thresholds, Some(&filter))
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let model = crate::model_path::resolve(args.model.as_deref())?;
    let (_, cfg) = open_model(&model)?;
    let layers = common::parse_layers(args.layer, args.layers.as_deref(), cfg.n_layer)?;
    // Validate the cheap things before the expensive loads.
    if let Some(path) = &args.thresholds {
        Thresholds::load(path).context("reading --thresholds")?;
    }
    let mut pair = Pair::load(&model, args.backend, args.kv, args.fault, usize::MAX, args.threads)?;
    let thresholds = load_thresholds(args.threshold, args.thresholds.as_deref(), &pair.model_sha256, args.backend)?;
    let (ours, reference) = pair.capture(&args.prompt, args.chat, args.decode, layers.clone(), args.isolate)?;
    let report = compare(&ours, &reference, &thresholds, layers.as_deref());

    write_reports(&report, args.json.as_deref(), args.markdown.as_deref(), args.html.as_deref())?;
    if args.fault != Fault::None {
        println!("seeded fault: {}", args.fault);
    }
    if args.isolate {
        println!("mode: isolation (every stage fed llama.cpp's inputs)");
    }
    print!("{}", render_terminal(&report, layers.as_deref()));
    Ok(match report.verdict {
        Verdict::Match => ExitCode::SUCCESS,
        Verdict::Diverged => ExitCode::from(1),
    })
}
