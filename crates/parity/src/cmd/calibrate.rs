//! `parity calibrate`: run clean prompts through llama.cpp and our engine,
//! take the largest max-abs-diff seen per stage and layer, multiply by a
//! safety factor and write the thresholds `parity run` gates on.

use crate::ours::{BackendKind, EngineOptions, Kv, NumericsArg};
use crate::prompts::read_prompts;
use crate::session::{compare, ModelFile, Pair};
use crate::report::sci;
use crate::thresholds::{calibrate, Thresholds};
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
    /// Thresholds = safety factor x the largest clean max-abs-diff.
    #[arg(long, default_value_t = 4.0)]
    pub safety_factor: f64,
    /// No threshold below this (stages that match bit for bit on clean runs).
    #[arg(long, default_value_t = 1e-6)]
    pub floor: f64,
    /// Output file (default: fixtures/thresholds/<sha256[..16]>-<backend>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
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
    let mut pair = Pair::load(&model, eo, None)?;
    let observe_all = Thresholds::uniform(f64::MAX);

    let mut observed: Vec<(StageId, f64)> = Vec::new();
    let mut kl_max = 0f64;
    for (i, prompt) in prompts.iter().enumerate() {
        let (ours, reference) = pair.capture(&prompt.text, prompt.chat, args.decode, None, false)?;
        let report = compare(&ours, &reference, &observe_all, None);
        if let Some((id, _)) = report.missing.first() {
            bail!("prompt {}: checkpoint {id} is missing on one side; cannot calibrate", i + 1);
        }
        for row in &report.rows {
            if row.metrics.non_finite > 0 {
                bail!("prompt {}: {} has NaN or Inf; a clean run must be finite", i + 1, row.id);
            }
            observed.push((row.id, row.metrics.max_abs));
        }
        for (_, m) in &report.logits {
            kl_max = kl_max.max(m.kl_max);
        }
        let top1: usize = report.logits.iter().map(|(_, m)| m.top1_agree).sum();
        let rows: usize = report.logits.iter().map(|(_, m)| m.rows).sum();
        eprintln!(
            "calibrate: prompt {}/{} ({} tokens): logits top-1 {top1}/{rows}, KL max {}",
            i + 1,
            prompts.len(),
            ours.tokens.len(),
            sci(report.logits.iter().map(|(_, m)| m.kl_max).fold(0.0, f64::max))
        );
    }

    let mut thresholds = calibrate(&observed, args.safety_factor, args.floor, pair.n_layer);
    thresholds.model_sha256 = pair.model_sha256.clone();
    thresholds.backend = args.backend.name().to_string();
    thresholds.kv_type = capture::KvType::from(args.kv).name().to_string();
    thresholds.prompts = prompts.len();
    thresholds.logits_kl_max = Some((kl_max * args.safety_factor).max(args.floor));
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
        observed
            .iter()
            .filter(|(id, _)| id.stage == stage && id.layer == layer)
            .map(|(_, v)| *v)
            .fold(0.0, f64::max)
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
        "calibrated on {} prompts x {} steps (kv {}), safety factor {}, logits KL max {} -> gate {}",
        prompts.len(),
        args.decode + 1,
        thresholds.kv_type,
        args.safety_factor,
        sci(kl_max),
        sci(thresholds.logits_kl_max.unwrap_or(0.0))
    );
    println!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}
