//! `parity bench`: how fast our engine runs the model, with every checkpoint
//! captured and with none. Prints medians; not a test.

use crate::ours::{BackendKind, EngineOptions, Mode, NumericsArg, OurEngine};
use crate::session::{check_context, ModelFile};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model (default: the cached reference model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// How our engine rounds activations (ggml numerics round on the host).
    #[arg(long, value_enum, default_value = "ggml")]
    pub numerics: NumericsArg,
    /// Prompt length in tokens (synthetic ids, deterministic).
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Decode steps after the prefill.
    #[arg(long, default_value_t = 0)]
    pub decode: usize,
    /// Timed repetitions per mode (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if args.tokens == 0 || args.repeat == 0 {
        bail!("--tokens and --repeat must be at least 1");
    }
    let model_file = ModelFile::open(&crate::model_path::resolve(args.model.as_deref())?)?;
    let (model, gguf, cfg) = (&model_file.path, &model_file.gguf, &model_file.cfg);
    check_context(args.tokens, args.decode, cfg.n_ctx_train)?;
    let started = Instant::now();
    let eo = EngineOptions { numerics: args.numerics.into(), max_ctx: args.tokens + args.decode, ..EngineOptions::new(args.backend) };
    let mut engine = OurEngine::load(gguf, cfg, eo)?;
    let load_s = started.elapsed().as_secs_f64();
    // Token ids spread over the vocabulary; fixed, so runs are comparable.
    let tokens: Vec<i32> = (0..args.tokens).map(|i| ((i * 7919 + 13) % cfg.n_vocab) as i32).collect();
    println!("model {} on {}: weights loaded in {load_s:.2} s", model.display(), args.backend.name());
    for (label, layers) in [("global stages only", Some(vec![])), ("all stages captured", None)] {
        let mut times = Vec::new();
        for i in 0..=args.repeat {
            let t = Instant::now();
            let capture = engine.run(&tokens, args.decode, None, layers.clone(), Mode::Observe)?;
            let secs = t.elapsed().as_secs_f64();
            if i > 0 {
                times.push(secs);
            }
            if i == args.repeat {
                println!(
                    "{label:>20}: {} tokens + {} decode steps: median {:.3} s over {} runs ({} checkpoints)",
                    args.tokens,
                    args.decode,
                    median(times.clone()),
                    args.repeat,
                    capture.tensors.len()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
