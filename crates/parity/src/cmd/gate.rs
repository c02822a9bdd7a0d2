//! `parity gate`: every prompt of a set against its gates on one model load.
//! Exit 0 all match, 1 any divergence, 2 bad input.

use crate::gate::{junit_xml, select, summary_json, summary_markdown, summary_table, Judged, Shard};
use crate::layers::select_layers;
use crate::prompts::read_prompts;
use crate::thresholds::{Comparison, Thresholds};
use super::EngineArgs;
use crate::verdict::{judge, Gates};
use anyhow::{Context, Result};
use crate::progress::{Milestones, Progress, Unit};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Prompt set: one prompt per line, `# ` comments, `chat: ` prefix.
    #[arg(long)]
    pub prompts: PathBuf,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Greedy decode steps after each prefill.
    #[arg(long, default_value_t = 0)]
    pub decode: usize,
    /// Compare these layers only: N, A..=B, or a list (default: all).
    #[arg(long)]
    pub layers: Option<String>,
    /// A calibrated thresholds file (default: the built-in gates).
    #[arg(long, conflicts_with = "threshold")]
    pub thresholds: Option<PathBuf>,
    /// One max-abs threshold for every teacher-forced stage.
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Gate only the I-th of N deterministic shards (round-robin by line).
    #[arg(long, value_parser = Shard::parse)]
    pub shard: Option<Shard>,
    /// Stop at the first diverging prompt.
    #[arg(long)]
    pub fail_fast: bool,
    /// Write JUnit XML here (one test case per prompt).
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// Write the JSON summary (with each prompt's report) here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the Markdown summary here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    capture::files::write_atomically(path, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let prompts = select(read_prompts(&args.prompts)?, args.shard)?;
    let model = args.engine.open_model()?;
    let layers = select_layers(None, args.layers.as_deref(), model.cfg.n_layer)?;
    if let Some(path) = &args.thresholds {
        Thresholds::load(path).context("reading --thresholds")?;
    }
    let mut pair = args.engine.load_pair(&model)?;
    let req = pair.gate_request(args.threshold, args.thresholds.as_deref(), false);
    let gates = Gates::resolve(&req, Comparison::TeacherForced)?;

    let started = Instant::now();
    let total = prompts.len();
    let mut progress = Progress::new("gate", total as u64, Unit::Items("prompts"), Milestones::EveryItem);
    let mut results: Vec<Judged> = Vec::with_capacity(total);
    for (done, (position, prompt)) in prompts.into_iter().enumerate() {
        let t = Instant::now();
        let report = judge(&mut pair, &prompt.text, prompt.chat, args.decode, layers.clone(), &gates, true)
            .with_context(|| format!("prompt #{} of {}", position + 1, args.prompts.display()))?;
        let judged = Judged { position, prompt, report, seconds: t.elapsed().as_secs_f64() };
        let status = if judged.diverged() { "DIVERGED" } else { "match" };
        progress.set(done as u64 + 1, total as u64, &format!("{}: {status}", judged.label()));
        let stop = judged.diverged() && args.fail_fast;
        results.push(judged);
        if stop {
            break;
        }
    }
    progress.finish(&format!("{} of {total} prompts judged", results.len()));

    let suite = format!("parity gate {}", args.prompts.display());
    if let Some(path) = &args.junit {
        write_atomically(path, &junit_xml(&results, &suite))?;
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&summary_json(&results, args.shard)).context("serializing the summary")?;
        write_atomically(path, &json)?;
    }
    if let Some(path) = &args.markdown {
        write_atomically(path, &summary_markdown(&results))?;
    }
    println!("{}", summary_table(&results));
    let diverged = results.iter().filter(|r| r.diverged()).count();
    let shard = args.shard.map_or(String::new(), |s| format!(" (shard {}/{})", s.index, s.count));
    if diverged == 0 {
        println!("MATCH: {} prompts within their gates{shard} in {:.1} s", results.len(), started.elapsed().as_secs_f64());
        Ok(ExitCode::SUCCESS)
    } else {
        let stopped = if results.len() < total { format!(", stopped after {} of {total} (--fail-fast)", results.len()) } else { String::new() };
        println!("DIVERGED: {diverged} of {} prompts{shard}{stopped}", results.len());
        Ok(ExitCode::from(1))
    }
}
