//! `parity capture`: run one engine on a prompt and dump every checkpoint
//! (`.npy` per stage + `manifest.json`).

use crate::layers::select_layers;
use crate::ours::{BackendKind, EngineOptions, Kv, NumericsArg};
use crate::session::{check_context, ModelFile};
use anyhow::{bail, Context, Result};
use capture::write_dump;
use llama_ref::{KvType, LlamaRef, RefOptions};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// llama.cpp in-process (CPU).
    Llama,
    /// Our engine.
    Ours,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Which engine to run.
    #[arg(long, value_enum, default_value = "llama")]
    pub engine: Engine,
    /// Backend of our engine (`--engine ours`); llama.cpp runs on the CPU.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// GGUF model (default: the cached reference model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt text (special tokens such as <|im_start|> are parsed).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template (one user turn + assistant prefix).
    #[arg(long)]
    pub chat: bool,
    /// Greedy decode steps after the prefill.
    #[arg(long, default_value_t = 0)]
    pub decode: usize,
    /// KV cache element type (f16: llama.cpp's default; f32: exact).
    #[arg(long, value_enum, default_value = "f16")]
    pub kv: Kv,
    /// How our engine rounds activations (`--engine ours`): like ggml's CPU backend, or exact floats.
    #[arg(long, value_enum, default_value = "ggml")]
    pub numerics: NumericsArg,
    /// Flash attention (attention scores/probs become unavailable).
    #[arg(long)]
    pub flash_attn: bool,
    /// llama.cpp threads (default: the cores, at most 4: a captured run is faster with few).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Capture one layer only.
    #[arg(long, conflicts_with = "layers")]
    pub layer: Option<usize>,
    /// Capture these layers: N, A..=B (both ends included), or a list: 0..=3,12.
    #[arg(long)]
    pub layers: Option<String>,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    match args.engine {
        Engine::Llama => run_llama(args),
        Engine::Ours => run_ours(args),
    }
}

/// Once the inputs are checked and before the run: from here until the new
/// dump is complete, `--out` is no dump at all (an interrupted capture
/// leaves nothing `diff` accepts, not even the dump it was replacing).
fn retire(out: &std::path::Path) -> Result<()> {
    capture::retire_dump(out).with_context(|| format!("preparing {}", out.display()))
}

fn run_llama(args: &Args) -> Result<ExitCode> {
    if args.backend == BackendKind::Cuda {
        bail!("--backend cuda applies to --engine ours: llama.cpp runs on the CPU here");
    }
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let model = crate::model_path::resolve(args.model.as_deref())?;
    let llama = LlamaRef::load(&model)?;
    let layers = select_layers(args.layer, args.layers.as_deref(), llama.n_layer())?;
    let tokens = llama.tokenize(&args.prompt, args.chat)?;
    check_context(tokens.len(), args.decode, llama.n_ctx_train())?;
    let sha = crate::cache::model_sha256(&model, false)?;

    let mut opts = RefOptions {
        kv_type: args.kv.into(),
        flash_attn: args.flash_attn,
        layers,
        capture: true,
        ..RefOptions::default()
    };
    if let Some(t) = args.threads {
        opts.threads = t;
    }
    retire(&args.out)?;
    let mut capture = crate::progress::llama_capture(&llama, &tokens, args.decode, &opts)?;
    capture.prompt = args.prompt.clone();
    capture.chat = args.chat;
    capture.model_sha256 = sha;
    write_dump(&capture, &args.out).with_context(|| format!("writing the dump to {}", args.out.display()))?;
    println!(
        "llama.cpp: {} prompt tokens, {} steps, {} stages written ({} unavailable) to {}",
        capture.tokens.len(),
        args.decode + 1,
        capture.tensors.len(),
        capture.unavailable.len(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Our engine alone. Decode steps feed our own greedy tokens (there is no
/// reference here); `parity run` feeds llama.cpp's instead.
fn run_ours(args: &Args) -> Result<ExitCode> {
    if args.flash_attn {
        bail!("--flash-attn applies to --engine llama: our engine always computes attention explicitly");
    }
    let model_file = ModelFile::open(&crate::model_path::resolve(args.model.as_deref())?)?;
    let (model, cfg) = (&model_file.path, &model_file.cfg);
    let layers = select_layers(args.layer, args.layers.as_deref(), cfg.n_layer)?;
    // Tokenization is llama.cpp's: both engines must see the same ids.
    let llama = LlamaRef::load(model)?;
    let tokens = llama.tokenize(&args.prompt, args.chat)?;
    check_context(tokens.len(), args.decode, cfg.n_ctx_train)?;
    let sha = crate::cache::model_sha256(model, false)?;
    let backend = args.backend;
    let kv = KvType::from(args.kv);
    let eo = EngineOptions { kv, numerics: args.numerics.into(), max_ctx: tokens.len() + args.decode, ..EngineOptions::new(backend) };
    let mut engine = crate::ours::OurEngine::load(&model_file.gguf, cfg, eo)?;
    retire(&args.out)?;
    let mut capture = engine.run(&tokens, args.decode, None, layers, crate::ours::Mode::Observe)?;
    capture.prompt = args.prompt.clone();
    capture.chat = args.chat;
    capture.model_sha256 = sha;
    write_dump(&capture, &args.out).with_context(|| format!("writing the dump to {}", args.out.display()))?;
    println!(
        "{}: {} prompt tokens, {} steps, {} stages written to {}",
        capture.engine,
        capture.tokens.len(),
        args.decode + 1,
        capture.tensors.len(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
