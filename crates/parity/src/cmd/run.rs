//! `parity run`: llama.cpp and our engine on the same GGUF and prompt,
//! compared stage by stage; names the first divergence. Exit 0 when every
//! stage is within its threshold, 1 when one diverges, 2 on bad input.

use crate::diff::Verdict;
use crate::verdict::{judge, Gates};
use crate::layers::select_layers;
use crate::ours::{BackendKind, EngineOptions, Kv, NumericsArg};
use crate::report::{render_terminal, write_reports};
use crate::cache::reference_cache;
use crate::session::{ModelFile, Pair};
use crate::thresholds::{Comparison, Thresholds};
use anyhow::{Context, Result};
use engine::fault::{Fault, FaultSpec};
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
    /// Default: ggml against `--reference llama`, exact against `llama-f32`.
    #[arg(long, value_enum)]
    pub numerics: Option<NumericsArg>,
    /// KV cache element type of both engines. Default: f16 (llama.cpp's)
    /// against `--reference llama`, f32 against `llama-f32`.
    #[arg(long, value_enum)]
    pub kv: Option<Kv>,
    /// The reference: llama.cpp on this GGUF (production numerics), or
    /// llama.cpp on an F32 copy of it (written with our bit-exact
    /// dequantization, cached beside the model) with an f32 KV cache: a
    /// float reference for engines that keep activations in float; or
    /// `oracle`: our CPU engine in the same numerics and KV type (judges the
    /// CUDA backend against the oracle it was written from).
    #[arg(long, value_enum, default_value = "llama")]
    pub reference: ReferenceArg,
    /// A calibrated thresholds file, for the comparison it records (default:
    /// the built-in worst-row rel-L2 gates of the numerics mode).
    #[arg(long, conflicts_with = "threshold")]
    pub thresholds: Option<PathBuf>,
    /// One max-abs threshold for every stage of the verdict's comparison.
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Which comparison gives the verdict: teacher-forced (each of our ops
    /// fed llama.cpp's input, so each stage's error is its own op's) or
    /// free-running (each engine on its own outputs). Both are reported.
    #[arg(long, value_enum, default_value = "teacher-forced")]
    pub verdict: VerdictArg,
    /// Same as `--verdict teacher-forced` (the default); kept for old scripts.
    #[arg(long, hide = true)]
    pub isolate: bool,
    /// Seed a fault of the catalogue into our engine, in every layer or at
    /// one: NAME or NAME@LAYER (`parity faults` lists them).
    #[arg(long, default_value = "none", value_parser = FaultSpec::parse)]
    pub fault: FaultSpec,
    /// llama.cpp threads (default: the cores, at most 4: a captured run is faster with few).
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
    /// Compute llama.cpp's captures afresh: neither read nor write the
    /// reference cache (and hash the model again).
    #[arg(long)]
    pub no_cache: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReferenceArg {
    Llama,
    LlamaF32,
    Oracle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VerdictArg {
    TeacherForced,
    FreeRunning,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let float_reference = args.reference == ReferenceArg::LlamaF32;
    let mut model_path = crate::model_path::resolve(args.model.as_deref())?;
    if float_reference {
        model_path = crate::variants::variant(&model_path, "f32")?;
    }
    let model = ModelFile::open(&model_path)?;
    let layers = select_layers(args.layer, args.layers.as_deref(), model.cfg.n_layer)?;
    // Validate the cheap things before the expensive loads.
    if let Some(path) = &args.thresholds {
        Thresholds::load(path).context("reading --thresholds")?;
    }
    let (default_kv, default_numerics) = if float_reference { (Kv::F32, NumericsArg::Exact) } else { (Kv::F16, NumericsArg::Ggml) };
    let eo = EngineOptions {
        kv: args.kv.unwrap_or(default_kv).into(),
        numerics: args.numerics.unwrap_or(default_numerics).into(),
        fault: args.fault,
        ..EngineOptions::new(args.backend)
    };
    let mut pair = Pair::load_with_cache(&model, eo, args.threads, reference_cache(args.no_cache))?;
    // One prompt: llama.cpp is not needed once its capture is taken.
    pair.release_llama_after_reference = true;
    if args.reference == ReferenceArg::Oracle {
        pair.use_oracle_reference(&model)?;
    }
    let verdict = match args.verdict {
        _ if args.isolate => Comparison::TeacherForced,
        VerdictArg::TeacherForced => Comparison::TeacherForced,
        VerdictArg::FreeRunning => Comparison::FreeRunning,
    };
    let req = pair.gate_request(args.threshold, args.thresholds.as_deref(), float_reference);
    let gates = Gates::resolve(&req, verdict)?;
    let mut report = judge(&mut pair, &args.prompt, args.chat, args.decode, layers.clone(), &gates, true)?;
    report.configuration.extend(invocation(args, &model_path, layers.as_deref()));

    write_reports(&report, args.json.as_deref(), args.markdown.as_deref(), args.html.as_deref())?;
    if args.fault.fault != Fault::None {
        println!("seeded fault: {}", args.fault);
    }
    print!("{}", render_terminal(&report, layers.as_deref()));
    Ok(match report.verdict {
        Verdict::Match => ExitCode::SUCCESS,
        Verdict::Diverged => ExitCode::from(1),
    })
}

/// What this invocation chose, for the reports' configuration section.
fn invocation(args: &Args, model_path: &std::path::Path, layers: Option<&[usize]>) -> Vec<(String, String)> {
    let reference_model = match args.reference {
        ReferenceArg::Llama => "the GGUF itself (production numerics)",
        ReferenceArg::LlamaF32 => "an F32 copy of the GGUF (a float reference)",
        ReferenceArg::Oracle => "nothing but the tokenizer: the reference is our CPU oracle (--reference oracle)",
    };
    vec![
        ("model file".into(), model_path.display().to_string()),
        ("backend (ours)".into(), flag_value(&args.backend)),
        ("llama.cpp ran on".into(), reference_model.into()),
        ("llama.cpp build".into(), llama_ref::LLAMA_CPP_BUILD.into()),
        ("layers compared".into(), layers.map_or("all".to_string(), |l| format!("{l:?}"))),
        ("verdict from".into(), if args.isolate { "teacher-forced".into() } else { flag_value(&args.verdict) }),
        ("seeded fault".into(), args.fault.to_string()),
        ("reference cache".into(), if args.no_cache { "off (--no-cache)" } else { "on" }.into()),
    ]
}

/// A value as it is spelled on the command line ("teacher-forced").
fn flag_value(v: &impl clap::ValueEnum) -> String {
    v.to_possible_value().map_or_else(String::new, |p| p.get_name().to_string())
}
