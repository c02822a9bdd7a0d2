//! `parity diff OURS_DIR REF_DIR`: compare two capture dumps stage by stage.
//! Exit 0 when they match within thresholds, 1 when they diverge, 2 on bad
//! input (returned as `Err`).

use crate::diff::{check_comparable, diff_captures, Verdict};
use crate::report::{render_terminal, write_reports};
use crate::layers::select_layers;
use crate::session::{backend_of, resolve_thresholds};
use crate::thresholds::Thresholds;
use anyhow::{bail, Context};
use capture::read_dump;
use capture::stage::StageId;
use std::path::PathBuf;
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
}

fn load_thresholds(args: &Args, model_sha256: &str, engine: &str) -> anyhow::Result<Thresholds> {
    if args.threshold.is_none() && args.thresholds.is_none() && model_sha256.is_empty() {
        bail!("no thresholds: the dump has no model sha256 to look a thresholds file up by; pass --thresholds FILE or --threshold X");
    }
    resolve_thresholds(args.threshold, args.thresholds.as_deref(), model_sha256, backend_of(engine))
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

    // A hand-written dump may not record its layer count: then the layers it holds bound the range.
    let n_layer = match ours.config.n_layer.max(reference.config.n_layer) {
        0 => ours.tensors.keys().chain(reference.tensors.keys()).filter_map(|id| id.layer).max().map_or(0, |l| l + 1),
        n => n,
    };
    let layers = select_layers(args.layer, args.layers.as_deref(), n_layer)?;
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
