//! `parity weights`: our dequantization of every tensor against ggml's own, bit for bit.

use anyhow::{Context, Result};
use comfy_table::{presets::UTF8_FULL, Cell, CellAlignment, Table};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model (default: the cached reference model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let path = crate::model_path::resolve(args.model.as_deref())?;
    let report = crate::weights::check(&path)?;
    let mut table = Table::new();
    table.load_preset(UTF8_FULL).set_header(vec!["type", "tensors", "elements", "max abs diff", "mismatched tensors"]);
    for (name, s) in &report.by_type {
        table.add_row(vec![
            Cell::new(name),
            Cell::new(s.tensors).set_alignment(CellAlignment::Right),
            Cell::new(s.elements).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:e}", s.max_abs_diff)).set_alignment(CellAlignment::Right),
            Cell::new(s.mismatched).set_alignment(CellAlignment::Right),
        ]);
    }
    println!("{table}");
    for m in &report.mismatched_tensors {
        println!("MISMATCH {m}");
    }
    println!(
        "{} tensors, {} elements: {} bit for bit with ggml, {} mismatched",
        report.tensors_checked,
        report.elements_checked,
        report.tensors_checked - report.tensors_mismatched,
        report.tensors_mismatched
    );
    if let Some(json) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        capture::files::write_atomically(json, text.as_bytes()).with_context(|| format!("cannot write {}", json.display()))?;
    }
    Ok(if report.tensors_mismatched == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
