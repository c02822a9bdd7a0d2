//! `parity diff OURS_DIR REF_DIR`: compare two capture dumps stage by stage.
//! Exit 0 when they match within thresholds, 1 when they diverge, 2 on bad
//! input (returned as `Err`).

use crate::diff::{check_comparable, Verdict};
use crate::report::{render_terminal, write_reports};
use crate::diagnosis::{diagnose, Tools};
use crate::layers::select_layers;
use crate::ours::{BackendKind, EngineOptions};
use crate::session::{ModelFile, Pair};
use crate::session::{backend_of, compare, resolve_thresholds, GateRequest};
use crate::thresholds::Comparison;
use anyhow::{bail, Context};
use capture::read_dump;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dump of the engine under test (a directory with manifest.json).
    pub ours: PathBuf,
    /// Dump of the reference (usually llama.cpp).
    pub reference: PathBuf,
    /// Calibrated thresholds file (checked against the dump's model, backend,
    /// KV type and numerics). Default: the built-in worst-row rel-L2 gates.
    #[arg(long, value_name = "FILE", conflicts_with = "threshold")]
    pub thresholds: Option<PathBuf>,
    /// One max-abs threshold for every stage instead of a thresholds file.
    #[arg(long, value_name = "X")]
    pub threshold: Option<f64>,
    /// Compare only this layer.
    #[arg(long, value_name = "N", conflicts_with = "layers")]
    pub layer: Option<usize>,
    /// Compare only these layers: N, A..=B (both ends included), or a list: 0..=3,12.
    #[arg(long, value_name = "A..B")]
    pub layers: Option<String>,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the Markdown report here.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Write the self-contained HTML report here.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// The GGUF both dumps ran: the diagnosis then also replays every bug
    /// model of the fault catalogue with our engine on the reference dump's
    /// input at the divergent stage, and names the weights a pattern equals.
    #[arg(long, value_name = "GGUF")]
    pub model: Option<PathBuf>,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    for (dir, what) in [(&args.ours, "OURS_DIR"), (&args.reference, "REF_DIR")] {
        if !dir.is_dir() {
            bail!("{what} {} is not a directory", dir.display());
        }
    }
    let ours = read_dump(&args.ours).with_context(|| format!("reading {}", args.ours.display()))?;
    let reference = read_dump(&args.reference).with_context(|| format!("reading {}", args.reference.display()))?;
    check_comparable(&ours, &reference).map_err(anyhow::Error::msg)?;
    // A dump written teacher-forced says so; anything else (every other
    // engine's dump) is free-running and gated by the free-running defaults.
    let comparison = if ours.config.fed == "teacher-forced" { Comparison::TeacherForced } else { Comparison::FreeRunning };
    let req = GateRequest {
        threshold: args.threshold,
        file: args.thresholds.as_deref(),
        model_sha256: &ours.model_sha256,
        backend: backend_of(&ours.engine),
        kv_type: &ours.config.kv_type,
        numerics: &ours.config.numerics,
        // A float reference's dump records an f32 KV cache and no quantized
        // matmul; the dump format does not say so, so assume production.
        float_reference: false,
    };
    let thresholds = resolve_thresholds(&req, comparison, comparison)?;

    // A hand-written dump may not record its layer count: then the layers it holds bound the range.
    let n_layer = match ours.config.n_layer.max(reference.config.n_layer) {
        0 => ours.tensors.keys().chain(reference.tensors.keys()).filter_map(|id| id.layer).max().map_or(0, |l| l + 1),
        n => n,
    };
    let layers = select_layers(args.layer, args.layers.as_deref(), n_layer)?;
    let mut report = compare(&ours, &reference, &thresholds, layers.as_deref());
    crate::drilldown::attach(&mut report, &ours, &reference);
    report.configuration.push(("dumps".into(), format!("ours {}, reference {}", args.ours.display(), args.reference.display())));
    if report.first_divergence.is_some() {
        report.diagnosis = match &args.model {
            // Pattern tests only: no engine to replay bug models on.
            None => diagnose(Tools::default(), &reference, &ours, &report)?,
            Some(path) => {
                let model = ModelFile::open(path)?;
                let mut pair = replay_engine(&model, &reference)?;
                report.configuration.push(("replay model".into(), path.display().to_string()));
                diagnose(Tools { pair: Some(&mut pair), weights: Some(&model.gguf) }, &reference, &ours, &report)?
            }
        };
    }
    if report.rows.is_empty() && report.missing.is_empty() && report.shape_mismatch.is_empty() {
        bail!("nothing to compare: no checkpoint is present in either dump{}", if layers.is_some() { " for the selected layers" } else { "" });
    }

    write_reports(&report, args.json.as_deref(), args.markdown.as_deref(), args.html.as_deref())?;
    print!("{}", render_terminal(&report, layers.as_deref()));
    Ok(match report.verdict {
        Verdict::Match => ExitCode::SUCCESS,
        Verdict::Diverged => ExitCode::from(1),
    })
}

/// Our engine on `model`, as the reference dump ran it (its KV type), for
/// the diagnosis's replays; refused when the dump is of another model.
fn replay_engine(model: &ModelFile, reference: &capture::Capture) -> anyhow::Result<Pair> {
    let kv = capture::KvType::parse(&reference.config.kv_type).unwrap_or(capture::KvType::F16);
    let eo = EngineOptions { kv, ..EngineOptions::new(BackendKind::Cpu) };
    let pair = Pair::load_with_cache(model, eo, None, Some(crate::cache::RefCache::from_env()))?;
    if !reference.model_sha256.is_empty() && !reference.model_sha256.eq_ignore_ascii_case(&pair.model_sha256) {
        bail!(
            "--model {}: sha256 {} but the dumps are of model {}",
            model.path.display(),
            pair.model_sha256,
            reference.model_sha256
        );
    }
    Ok(pair)
}
