//! `parity diff OURS_DIR REF_DIR`: compare two capture dumps stage by stage.
//! Exit 0 when they match within thresholds, 1 when they diverge, 2 on bad
//! input (returned as `Err`).

use crate::diff::{check_comparable, diff_captures, Verdict};
use crate::report::{render_terminal, write_reports};
use crate::thresholds::Thresholds;
use anyhow::{bail, Context};
use capture::read_dump;
use capture::stage::StageId;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dump of the engine under test (a directory with manifest.json).
    pub ours: PathBuf,
    /// Dump of the reference (usually llama.cpp).
    pub reference: PathBuf,
    /// Calibrated thresholds file. Default: fixtures/thresholds/<sha256[..16]>-<backend>.json
    /// for the model and backend of OURS (fixtures/ overridable by $PARITY_FIXTURES).
    #[arg(long, value_name = "FILE", conflicts_with = "threshold")]
    pub thresholds: Option<PathBuf>,
    /// One max-abs threshold for every stage instead of a thresholds file.
    #[arg(long, value_name = "X")]
    pub threshold: Option<f64>,
    /// Compare only this layer.
    #[arg(long, value_name = "N", conflicts_with = "layers")]
    pub layer: Option<usize>,
    /// Compare only these layers: A..B (B excluded) or A..=B.
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
}

/// Parse "A..B" (B excluded) or "A..=B" into the list of layers.
pub fn parse_layer_range(s: &str) -> anyhow::Result<Vec<usize>> {
    let parse = |x: &str| x.trim().parse::<usize>().with_context(|| format!("--layers {s:?}: {x:?} is not a layer number"));
    let (a, b) = if let Some((a, b)) = s.split_once("..=") {
        (parse(a)?, parse(b)?.checked_add(1).context("--layers: range end overflows")?)
    } else if let Some((a, b)) = s.split_once("..") {
        (parse(a)?, parse(b)?)
    } else {
        bail!("--layers {s:?}: expected A..B or A..=B");
    };
    if a >= b {
        bail!("--layers {s:?} is empty");
    }
    Ok((a..b).collect())
}

/// The fixtures directory: $PARITY_FIXTURES, else the repository's fixtures/.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("PARITY_FIXTURES") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"),
    }
}

/// "ours-cpu" -> "cpu", "ours-cuda" -> "cuda"; other names unchanged.
pub fn backend_of(engine: &str) -> &str {
    engine.strip_prefix("ours-").unwrap_or(engine)
}

fn load_thresholds(args: &Args, model_sha256: &str, engine: &str) -> anyhow::Result<Thresholds> {
    if args.threshold.is_none() && args.thresholds.is_none() && model_sha256.is_empty() {
        bail!("no thresholds: the dump has no model sha256 to look a thresholds file up by; pass --thresholds FILE or --threshold X");
    }
    crate::cmd::common::resolve_thresholds(args.threshold, args.thresholds.as_deref(), model_sha256, backend_of(engine))
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
    let thresholds = load_thresholds(args, &ours.model_sha256, &ours.engine)?;

    let layers: Option<Vec<usize>> = match (args.layer, &args.layers) {
        (Some(l), _) => Some(vec![l]),
        (None, Some(range)) => Some(parse_layer_range(range)?),
        (None, None) => None,
    };
    if let Some(selected) = &layers {
        let n_layer = ours.config.n_layer.max(reference.config.n_layer);
        if n_layer > 0 {
            if let Some(bad) = selected.iter().find(|&&l| l >= n_layer) {
                bail!("layer {bad} does not exist: the model has {n_layer} layers");
            }
        }
    }
    let filter = layers.clone().map(|selected| move |id: &StageId| id.layer.is_some_and(|l| selected.contains(&l)));
    let filter_ref: Option<&dyn Fn(&StageId) -> bool> = filter.as_ref().map(|f| f as &dyn Fn(&StageId) -> bool);
    let report = diff_captures(&ours, &reference, &thresholds, filter_ref);
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
