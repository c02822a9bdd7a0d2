//! `parity faults`: the fault catalogue, the one place every fault is
//! described (the engine, the tests and `selftest` read the same table).

use anyhow::Result;
use comfy_table::Table;
use engine::fault::{Expect, FirstStep, Scope, FAULTS};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print the catalogue as JSON.
    #[arg(long)]
    pub json: bool,
}

fn expected(e: Option<Expect>) -> String {
    match e {
        None => "-".into(),
        Some(Expect::NoDivergence) => "no divergence (equivalent)".into(),
        Some(Expect::At(step, stage)) => format!(
            "{}, {}",
            match step {
                FirstStep::Prefill => "prefill",
                FirstStep::FirstDecode => "decode 1",
            },
            stage
        ),
    }
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let rows = FAULTS.iter().skip(1);
    if args.json {
        let v: Vec<_> = rows
            .map(|f| {
                serde_json::json!({
                    "name": f.name, "models": f.models, "op": f.op, "expected": expected(f.expect),
                    "scope": match f.scope { Scope::Layer => "layer", Scope::Global => "global" },
                    "subtle": f.subtle,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(vec!["fault", "acts", "op", "first divergence", "the bug it models"]);
    for f in rows {
        table.add_row(vec![
            f.name.to_string(),
            match f.scope {
                Scope::Layer => "NAME@LAYER".into(),
                Scope::Global => "global".to_string(),
            },
            f.op.to_string(),
            expected(f.expect) + if f.subtle.is_some() { " (subtle)" } else { "" },
            f.models.to_string(),
        ]);
    }
    println!("{table}");
    for f in FAULTS.iter().filter(|f| f.subtle.is_some()) {
        println!("subtle: {}: {}", f.name, f.subtle.unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}
