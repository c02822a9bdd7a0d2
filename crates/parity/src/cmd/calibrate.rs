//! `parity calibrate`: run clean prompts through llama.cpp and our engine,
//! take the largest error seen per stage and layer, multiply by a safety
//! factor and write thresholds `parity run --thresholds` can gate on (the
//! built-in gates need none: calibration only tightens them).

use crate::ours::{BackendKind, EngineOptions, Kv, NumericsArg};
use crate::prompts::read_prompts;
use crate::cache::reference_cache;
use crate::session::{ModelFile, Pair};
use crate::report::sci;
use crate::calibration::{run_calibration, Calibration, CalibrationOptions};
use crate::cmd::run::VerdictArg;
use crate::thresholds::{Comparison, GateMetric, Thresholds};
use anyhow::{bail, Context, Result};
use comfy_table::Table;
use capture::stage::{Stage, StageId};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model (default: the cached reference model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Backend of our engine.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// Prompt set: one prompt per line, '#' comments, "\n" for a newline
    /// (default: fixtures/prompts/calibration.txt).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Greedy decode steps per prompt.
    #[arg(long, default_value_t = 4)]
    pub decode: usize,
    /// How our engine rounds activations (ggml: like ggml's CPU backend).
    #[arg(long, value_enum, default_value = "ggml")]
    pub numerics: NumericsArg,
    /// KV cache element type of both engines.
    #[arg(long, value_enum, default_value = "f16")]
    pub kv: Kv,
    /// Which comparison the thresholds gate.
    #[arg(long, value_enum, default_value = "teacher-forced")]
    pub comparison: VerdictArg,
    /// The metric they bound: the worst row's rel-L2 (scale-free) or max-abs.
    #[arg(long, value_enum, default_value = "row-rel-l2")]
    pub metric: MetricArg,
    /// Thresholds = safety factor x the largest clean error.
    #[arg(long, default_value_t = 4.0)]
    pub safety_factor: f64,
    /// No threshold below this (stages that match bit for bit on clean runs).
    #[arg(long, default_value_t = 1e-6)]
    pub floor: f64,
    /// Output file (default: fixtures/thresholds/<sha256[..16]>-<backend>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Compute llama.cpp's captures afresh: neither read nor write the
    /// reference cache (and hash the model again).
    #[arg(long)]
    pub no_cache: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricArg {
    RowRelL2,
    MaxAbs,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if !(args.safety_factor.is_finite() && args.safety_factor >= 1.0) {
        bail!("--safety-factor {}: must be at least 1", args.safety_factor);
    }
    if !(args.floor.is_finite() && args.floor > 0.0) {
        bail!("--floor {}: must be a positive number", args.floor);
    }
    let prompts_path = match &args.prompts {
        Some(p) => p.clone(),
        None => crate::fixtures::fixtures_dir()?.join("prompts/calibration.txt"),
    };
    let prompts = read_prompts(&prompts_path)?;
    let model = ModelFile::open(&crate::model_path::resolve(args.model.as_deref())?)?;
    let eo = EngineOptions { kv: args.kv.into(), numerics: args.numerics.into(), ..EngineOptions::new(args.backend) };
    let mut pair = Pair::load_with_cache(&model, eo, None, reference_cache(args.no_cache))?;
    let opts = CalibrationOptions {
        comparison: match args.comparison {
            VerdictArg::TeacherForced => Comparison::TeacherForced,
            VerdictArg::FreeRunning => Comparison::FreeRunning,
        },
        metric: match args.metric {
            MetricArg::RowRelL2 => GateMetric::RowRelL2,
            MetricArg::MaxAbs => GateMetric::MaxAbs,
        },
        decode: args.decode,
        safety_factor: args.safety_factor,
        floor: args.floor,
    };
    let Calibration { mut thresholds, observed, kl_max } = run_calibration(&mut pair, &prompts, &opts)?;
    thresholds.model_sha256 = pair.model_sha256.clone();
    thresholds.backend = args.backend.name().to_string();
    thresholds.kv_type = capture::KvType::from(args.kv).name().to_string();
    thresholds.numerics = pair.ours.numerics().name().to_string();
    thresholds.llama_cpp = llama_ref::LLAMA_CPP_BUILD.to_string();
    thresholds.prompts = prompts.len();
    let out = args
        .out
        .clone()
        .map_or_else(
            || crate::fixtures::fixtures_dir().map(|f| Thresholds::default_path(&f, &pair.model_sha256, args.backend.name())),
            Ok,
        )?;
    thresholds.save(&out).with_context(|| format!("writing {}", out.display()))?;

    // The clean noise floor: what the thresholds were made from.
    let layers = [0, pair.n_layer / 2, pair.n_layer - 1];
    let floor_at = |stage: Stage, layer: Option<usize>| {
        observed.iter().filter(|o| o.id.stage == stage && o.id.layer == layer).map(|o| o.value).fold(0.0, f64::max)
    };
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    let mut header = vec!["stage".to_string()];
    header.extend(layers.iter().map(|l| format!("layer {l} noise")));
    header.extend(layers.iter().map(|l| format!("layer {l} threshold")));
    table.set_header(header);
    for stage in Stage::PER_LAYER {
        let mut row = vec![stage.name().to_string()];
        row.extend(layers.iter().map(|&l| sci(floor_at(stage, Some(l)))));
        row.extend(layers.iter().map(|&l| {
            thresholds.for_stage(&StageId::layer(0, l, stage)).map_or("-".to_string(), sci)
        }));
        table.add_row(row);
    }
    for stage in Stage::GLOBAL {
        let mut row = vec![stage.name().to_string(), sci(floor_at(stage, None))];
        row.extend(["".to_string(), "".to_string()]);
        row.push(thresholds.for_stage(&StageId::global(0, stage)).map_or("-".to_string(), sci));
        row.extend(["".to_string(), "".to_string()]);
        table.add_row(row);
    }
    println!("{table}");
    println!(
        "calibrated on {} prompts x {} steps ({}, {} numerics, {}, kv {}), safety factor {}, logits KL max {} -> gate {}",
        prompts.len(),
        args.decode + 1,
        opts.comparison.name(),
        thresholds.numerics,
        thresholds.metric.label(),
        thresholds.kv_type,
        args.safety_factor,
        sci(kl_max),
        sci(thresholds.logits_kl_max.unwrap_or(0.0))
    );
    println!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}
