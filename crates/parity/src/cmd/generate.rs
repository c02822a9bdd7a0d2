//! `parity generate`: both engines generate greedily, each from its own
//! tokens; both texts side by side and the first token where they part.
//! Exit 0 when they agree for n tokens or part on a near tie, 1 on a real
//! divergence, 2 on bad input.

use crate::generate::generate_both;
use crate::report::{sci, verdict_lines};
use crate::thresholds::Comparison;
use super::EngineArgs;
use crate::session::Pair;
use crate::verdict::{judge, Gates};
use anyhow::{bail, Result};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Tokens to generate (the prefill's pick is the first).
    #[arg(short = 'n', long = "tokens", default_value_t = 64)]
    pub n: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// A token's text, quoted so that spaces and newlines show.
fn quoted(pair: &mut Pair, token: i32) -> Result<String> {
    Ok(format!("{:?}", pair.token_piece(token)?))
}

fn text(pair: &mut Pair, tokens: &[i32]) -> Result<String> {
    let mut out = String::new();
    for &t in tokens {
        out.push_str(&pair.token_piece(t)?);
    }
    Ok(out)
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if args.n == 0 {
        bail!("-n must be at least 1");
    }
    let model = args.engine.open_model()?;
    let mut pair = args.engine.load_pair(&model)?;
    let g = generate_both(&mut pair, &args.prompt, args.chat, args.n)?;

    let agreed = g.parting.as_ref().map_or(g.ours.len(), |p| p.step);
    println!("prompt: {:?} ({} tokens){}", args.prompt, g.prompt_tokens, if args.chat { ", chat template" } else { "" });
    println!("--- llama.cpp ({} tokens) ---", g.reference.len());
    println!("{}", text(&mut pair, &g.reference)?);
    println!("--- ours ({}, {} tokens) ---", args.engine.backend.name(), g.ours.len());
    println!("{}", text(&mut pair, &g.ours)?);
    println!("---");
    let Some(p) = &g.parting else {
        println!("SAME: both engines generated the same {} tokens", g.ours.len());
        return Ok(ExitCode::SUCCESS);
    };
    println!("first difference: generated token {} (after {agreed} identical tokens)", p.step);
    for (side, pick, top, gap) in [("llama.cpp", p.reference, &p.reference_top5, p.gap_reference), ("ours", p.ours, &p.ours_top5, p.gap_ours)] {
        let mut cells = Vec::new();
        for &(t, logit) in top.iter() {
            cells.push(format!("{} {logit:.4}", quoted(&mut pair, t)?));
        }
        println!("  {side:<9} picks {} (its lead over the other's pick: {}); top-5: {}", quoted(&mut pair, pick)?, sci(gap as f64), cells.join(", "));
    }

    // Near tie or bug: judge the prompt teacher-forced up to that step.
    let req = pair.gate_request(None, None, false);
    let gates = Gates::resolve(&req, Comparison::TeacherForced)?;
    let report = judge(&mut pair, &args.prompt, args.chat, p.step, None, &gates, true)?;
    let chat = if args.chat { " --chat" } else { "" };
    let reproduce = format!("parity run --prompt {:?}{chat} --decode {}", args.prompt, p.step);
    match report.verdict {
        crate::diff::Verdict::Match => {
            println!(
                "NEAR TIE: every op up to that step is within its teacher-forced gate; the candidates are {} logits apart, and rounding picked differently",
                sci(p.gap_reference.abs().max(p.gap_ours.abs()) as f64)
            );
            println!("reproduce: {reproduce}");
            Ok(ExitCode::SUCCESS)
        }
        crate::diff::Verdict::Diverged => {
            for line in verdict_lines(&report).into_iter().take(3) {
                println!("{line}");
            }
            println!("DIVERGED at generated token {}: the teacher-forced comparison up to it names the op above", p.step);
            println!("reproduce: {reproduce}");
            Ok(ExitCode::from(1))
        }
    }
}
