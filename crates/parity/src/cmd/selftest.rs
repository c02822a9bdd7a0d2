//! `parity selftest`: prove the localization on this machine: every fault of
//! the catalogue seeded at a random layer (seed printed), one llama.cpp
//! capture per prompt reused for all of them, clean runs beside them; a
//! matrix and a summary line. Exit 0 when every fault is named exactly with
//! its margin and nothing clean diverges, 1 otherwise, 2 on bad input.

use crate::ours::{BackendKind, EngineOptions};
use crate::prompts::read_prompts;
use crate::report::sci;
use crate::selftest::{default_prompts, draw_layers, run_prompt, summarize, Outcome};
use crate::cache::reference_cache;
use crate::session::{ModelFile, Pair};
use crate::verdict::Gates;
use crate::thresholds::Comparison;
use anyhow::{bail, Context, Result};
use comfy_table::Table;
use engine::fault::Fault;
use crate::progress::{Milestones, Progress, Unit};
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
    /// Only these faults (comma-separated names; `parity faults` lists them).
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<String>,
    /// Seed of the layer draws (default: from the clock; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prompt set (default: one prompt, the haiku).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Greedy decode steps per prompt (faults in decode need at least 1).
    #[arg(long, default_value_t = 2)]
    pub decode: usize,
    /// A fault counts as exact only with error / threshold at least this.
    #[arg(long, default_value_t = 10.0)]
    pub min_margin: f64,
    /// Write the matrix and the summary as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Compute llama.cpp's captures afresh: neither read nor write the
    /// reference cache (and hash the model again).
    #[arg(long)]
    pub no_cache: bool,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if args.decode == 0 {
        bail!("--decode must be at least 1: decode-step faults (kv-offset, rope-decode-pos, kv-len-short) need one");
    }
    let faults: Vec<Fault> = if args.faults.is_empty() {
        Fault::all().filter(|&f| f != Fault::None).collect()
    } else {
        args.faults.iter().map(|n| Fault::parse_or_list(n.trim()).map_err(anyhow::Error::msg)).collect::<Result<_>>()?
    };
    let prompts = match &args.prompts {
        Some(p) => read_prompts(p)?,
        None => default_prompts(),
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    let model = ModelFile::open(&crate::model_path::resolve(args.model.as_deref())?)?;
    let specs = draw_layers(&faults, model.cfg.n_layer, seed);
    eprintln!("selftest: seed {seed} ({} faults, {} prompts, backend {})", specs.len(), prompts.len(), args.backend.name());
    let mut pair = Pair::load_with_cache(&model, EngineOptions::new(args.backend), None, reference_cache(args.no_cache))?;
    let req = pair.gate_request(None, None, false);
    let gates = Gates::resolve(&req, Comparison::TeacherForced)?;

    // run_prompt names each run (the clean one, then one per fault) as it starts it.
    let total = (prompts.len() * (specs.len() + 1)) as u64;
    let mut progress = Progress::new("selftest", total, Unit::Items("runs"), Milestones::EveryItem);
    let mut runs_done = 0;
    let mut on_run = |starting: &str| {
        progress.set(runs_done, total, starting);
        runs_done += 1;
    };
    let mut outcomes: Vec<Outcome> = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let reference = pair.reference(&prompt.text, prompt.chat, args.decode, None)?;
        outcomes.extend(run_prompt(&mut pair, &reference, i, &specs, &gates.teacher_forced, &gates.free_running, &mut on_run)?);
    }
    progress.finish(&format!("{total} runs"));
    let summary = summarize(&outcomes, seed, args.min_margin);

    let mut table = Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(vec!["prompt", "fault", "layer", "expected", "found (teacher-forced)", "margin", "exact", "diagnosis", "patterns alone", "free-running (largest jump)", "jump"]);
    for o in &outcomes {
        table.add_row(vec![
            o.prompt.to_string(),
            o.fault.clone(),
            o.layer.map_or("-".into(), |l| l.to_string()),
            o.expected.clone(),
            o.found.clone(),
            o.margin.map_or("-".into(), sci),
            if o.exact { if o.confined { "yes" } else { "yes (spreads)" } } else { "NO" }.to_string(),
            format!("{}{}", o.diagnosis, if o.diagnosed || o.expected == "no divergence" { "" } else { " (wrong)" }),
            format!("{}{}", o.patterns, if o.named_by_patterns == Some(false) { " (wrong)" } else { "" }),
            format!("{}{}", o.free_running_found, if o.free_running_agrees { "" } else { " (differs)" }),
            o.free_running_jump.map_or("-".into(), sci),
        ]);
    }
    println!("{table}");
    for o in outcomes.iter().filter(|o| !o.note.is_empty() && o.prompt == 1) {
        println!("note: {}: {}", o.fault, o.note);
    }
    println!(
        "selftest (seed {seed}): {}/{} faults named exactly teacher-forced (margin >= {}; smallest {}), {}/{} diagnosed as that bug ({}/{} of those with a pattern test named by the patterns alone), {}/{} equivalent variants clean, {}/{} clean runs clean; free-running largest jump at the fault's stage for {}/{}: {}",
        summary.exact,
        summary.faults,
        args.min_margin,
        summary.min_margin.map_or("-".into(), sci),
        summary.diagnosed,
        summary.faults,
        summary.named_by_patterns,
        summary.pattern_faults,
        summary.equivalent_clean,
        summary.equivalent,
        summary.clean_clean,
        summary.clean_runs,
        summary.free_running_agree,
        summary.faults,
        if summary.passed { "PASS" } else { "FAIL" }
    );
    if let Some(path) = &args.json {
        let json = serde_json::json!({ "summary": summary, "outcomes": outcomes });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if summary.passed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
