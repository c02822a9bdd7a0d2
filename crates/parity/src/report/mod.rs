//! Renderings of a [`DiffReport`]: terminal tables, JSON, Markdown and a
//! self-contained HTML page with inline SVG pictures.

pub mod html;
mod html_drilldown;
pub mod json;
pub mod markdown;
pub mod table;

pub use html::render_html;
pub use json::render_json;
pub use markdown::render_markdown;
pub use table::render_terminal;

use crate::diff::{DiffReport, FirstProblem, Verdict};
use capture::stage::{Stage, StageId};
use std::collections::{BTreeMap, BTreeSet};

/// "4.1e-1"; "inf" / "NaN" for non-finite values.
pub fn sci(x: f64) -> String {
    format!("{x:.1e}")
}

/// "prefill" or "decode k".
pub fn step_label(step: usize) -> String {
    if step == 0 {
        "prefill".to_string()
    } else {
        format!("decode {step}")
    }
}

/// What the report knows about one checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    /// Compared: index into `rows`.
    Row(usize),
    /// Present on one side only; names the side that lacks it.
    Missing(String),
    ShapeMismatch,
    Unavailable,
    /// Neither side captured it.
    Absent,
}

/// Lookup of every checkpoint of a report.
pub struct Index {
    cells: BTreeMap<StageId, Cell>,
}

impl Index {
    pub fn new(r: &DiffReport) -> Index {
        let mut cells = BTreeMap::new();
        for (i, row) in r.rows.iter().enumerate() {
            cells.insert(row.id, Cell::Row(i));
        }
        for (id, side) in &r.missing {
            cells.insert(*id, Cell::Missing(side.clone()));
        }
        for (id, _) in &r.shape_mismatch {
            cells.insert(*id, Cell::ShapeMismatch);
        }
        for id in &r.unavailable {
            cells.insert(*id, Cell::Unavailable);
        }
        Index { cells }
    }

    pub fn get(&self, id: &StageId) -> Cell {
        self.cells.get(id).cloned().unwrap_or(Cell::Absent)
    }

    pub fn steps(&self) -> Vec<usize> {
        self.cells.keys().map(|id| id.step).collect::<BTreeSet<_>>().into_iter().collect()
    }

    /// Layers seen in `step`, in order.
    pub fn layers(&self, step: usize) -> Vec<usize> {
        self.cells
            .keys()
            .filter(|id| id.step == step)
            .filter_map(|id| id.layer)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    pub fn has_global(&self, step: usize) -> bool {
        self.cells.keys().any(|id| id.step == step && id.layer.is_none())
    }
}

/// One character per checkpoint for the heat lines: how close the gated error is to
/// its threshold.
pub fn heat_char(r: &DiffReport, cell: &Cell) -> char {
    match cell {
        Cell::Row(i) => {
            let row = &r.rows[*i];
            if row.metrics.non_finite > 0 {
                return 'X';
            }
            match row.ratio() {
                None => '~',
                Some(x) if x <= 0.01 => '.',
                Some(x) if x <= 0.1 => ':',
                Some(x) if x <= 0.5 => '-',
                Some(x) if x <= 1.0 => '=',
                Some(x) if x <= 10.0 => '!',
                Some(x) if x <= 1000.0 => '#',
                Some(_) => 'X',
            }
        }
        Cell::Missing(_) => '?',
        Cell::ShapeMismatch => 'S',
        Cell::Unavailable => '_',
        Cell::Absent => ' ',
    }
}

pub const HEAT_LEGEND: &str =
    "heat: error/threshold  . <=0.01  : <=0.1  - <=0.5  = <=1 (pass)  ! <=10  # <=1000  X more or NaN/Inf (fail)  ~ no threshold  ? missing  S shape mismatch  _ unavailable";

/// The verdict block: the verdict line, then for a divergence the
/// "look at:" line, the worst element and the largest-jump line.
pub fn verdict_lines(r: &DiffReport) -> Vec<String> {
    let mut out = Vec::new();
    let problem = r.first_problem();
    match &problem {
        None => {
            let mut line = format!("MATCH: {} stages within thresholds", r.rows.len());
            let ungated = r.n_ungated();
            if ungated > 0 {
                line.push_str(&format!(" ({ungated} of them without a threshold, not gated)"));
            }
            out.push(line);
        }
        Some(FirstProblem::Row(i)) => {
            let row = &r.rows[*i];
            let m = &row.metrics;
            let value = if m.non_finite > 0 {
                format!("{} inf ({} NaN/Inf values)", row.metric.label(), m.non_finite)
            } else {
                format!("{} {}", row.metric.label(), sci(row.value()))
            };
            let threshold = row.threshold.map_or("no threshold".to_string(), sci);
            let margin = row.ratio().map_or(String::new(), |x| format!(" ({}x its threshold)", sci(x)));
            out.push(format!("FIRST DIVERGENCE: {}: {value} > {threshold}{margin}", row.id));
            if let Some(d) = r.diagnosis.as_ref().filter(|d| d.at == row.id) {
                out.push(d.headline());
                out.extend(d.attribution.clone());
            }
            out.push(format!("look at: {}", row.id.stage.what_to_check()));
            if let Some(w) = &m.worst {
                out.push(format!(
                    "worst element: {}: ours {} vs reference {} (rel-L2 {}, cosine {:.6})",
                    w.coords, w.ours, w.reference, sci(m.rel_l2), m.cosine
                ));
            }
        }
        Some(FirstProblem::Missing(id, side)) => {
            out.push(format!("FIRST DIVERGENCE: {id}: missing in {side}"));
            out.push(format!("look at: the checkpoint hook of {} in {side}", id.stage));
        }
        Some(FirstProblem::ShapeMismatch(id, msg)) => {
            out.push(format!("FIRST DIVERGENCE: {id}: {msg}"));
            out.push(format!("look at: the canonical layout of {} (engine::stage)", id.stage));
        }
        Some(FirstProblem::LogitsKl(step, kl)) => {
            out.push(format!(
                "FIRST DIVERGENCE: {}, logits: KL max {} > {}",
                step_label(*step),
                sci(*kl),
                r.logits_kl_max.map_or("-".to_string(), sci)
            ));
            out.push(format!("look at: {}", Stage::Logits.what_to_check()));
        }
    }
    if r.verdict == Verdict::Diverged {
        if let Some(line) = jump_line(r) {
            out.push(line);
        }
    }
    out
}

/// "largest jump: prefill, layer 3, q_rope: rel-L2 1.0e0, 830x its input (prefill, layer 3, q_proj: rel-L2 1.2e-3)".
pub fn jump_line(r: &DiffReport) -> Option<String> {
    let row = &r.rows[r.largest_jump?];
    let jump = row.jump?;
    let from = match row.jump_from {
        Some(from) => {
            let input_rel = r.rows.iter().find(|x| x.id == from).map_or(f64::NAN, |x| x.metrics.rel_l2);
            format!("its input ({from}: rel-L2 {})", sci(input_rel))
        }
        None => "its exact input (token ids)".to_string(),
    };
    Some(format!("largest jump: {}: rel-L2 {}, {} x {from}", row.id, sci(row.metrics.rel_l2), sci(jump)))
}

/// Header lines: engines, model, prompt, tokens, KV type, thresholds.
pub fn header_lines(r: &DiffReport) -> Vec<String> {
    let short: String = r.model_sha256.chars().take(16).collect();
    let mut prompt: String = r.prompt.chars().take(80).collect();
    if r.prompt.chars().count() > 80 {
        prompt.push('…');
    }
    let fed = if r.comparison == "teacher-forced" {
        "teacher-forced: each of our ops fed the reference's input, so each stage's error is its own op's"
    } else {
        "free-running: each engine on its own outputs (errors accumulate)"
    };
    let numerics = if r.numerics.is_empty() { "not recorded".to_string() } else { r.numerics.clone() };
    // How the comparison was run, where it changes what the report holds.
    let notes = r.configuration.iter().filter(|(k, _)| crate::chunked::HEADER_NOTES.contains(&k.as_str())).map(|(k, v)| format!("{k}: {v}"));
    let mut lines = vec![
        format!("ours: {}   reference: {}", r.ours_engine, r.reference_engine),
        format!("comparison: {fed}   numerics: {numerics}"),
        format!("model: {short}   kv cache: {}   prompt: {prompt:?} ({} tokens)", r.kv_type, r.tokens.len()),
        format!(
            "thresholds: {}   compared: {}   failed: {}   missing: {}   unavailable: {}",
            r.thresholds_source,
            r.rows.len(),
            r.n_failed(),
            r.missing.len(),
            r.unavailable.len()
        ),
    ];
    lines.extend(notes);
    lines
}

/// The free-running comparison beside a teacher-forced verdict, as lines:
/// its verdict under the free-running gates, the error growth per layer, the logits.
pub fn free_running_lines(r: &DiffReport) -> Vec<String> {
    let Some(fr) = &r.free_running else { return Vec::new() };
    let mut out = vec![format!("free-running (each engine on its own outputs; gates: {})", fr.thresholds_source)];
    match &fr.first_over_gate {
        None => out.push(format!("  within the free-running gates ({})", match fr.verdict {
            crate::diff::Verdict::Match => "match",
            crate::diff::Verdict::Diverged => "logits KL over its gate",
        })),
        Some((id, v, t)) => out.push(format!("  first over its gate: {id}: worst-row rel-L2 {} > {}", sci(*v), sci(*t))),
    }
    let growth: Vec<String> = fr
        .per_layer
        .iter()
        .map(|(l, v, s)| format!("{}:{}({})", l.map_or("head".to_string(), |l| l.to_string()), sci(*v), s))
        .collect();
    out.push(format!("  worst-row rel-L2 per layer (stage): {}", growth.join(" ")));
    if let Some(last) = fr.ended_after_layer {
        let tail_compared = r.rows.iter().any(|row| row.id.stage == Stage::Logits);
        out.push(if tail_compared {
            format!("  the free-running pass ended after layer {last}, the last asked for: final_norm and logits compared teacher-forced only (run without --layer/--layers for end-to-end agreement)")
        } else {
            format!("  the free-running pass ended after layer {last}, the last asked for, as did the teacher-forced one: final_norm and logits not compared (run without --layer/--layers for end-to-end agreement)")
        });
    }
    for (step, m) in &fr.logits {
        out.push(format!(
            "  logits {}: top-1 agree {}/{}, KL(ref||ours) mean {} max {}{}",
            step_label(*step),
            m.top1_agree,
            m.rows,
            sci(m.kl_mean),
            sci(m.kl_max),
            fr.logits_kl_max.map_or(String::new(), |g| format!(" (gate {})", sci(g)))
        ));
    }
    out
}

/// The row of `rows` with the largest max_abs/threshold among `ids` (ties: the first).
pub fn worst_of(r: &DiffReport, index: &Index, ids: impl Iterator<Item = StageId>) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for id in ids {
        if let Cell::Row(i) = index.get(&id) {
            let key = r.rows[i].ratio().unwrap_or(if r.rows[i].metrics.non_finite > 0 { f64::INFINITY } else { 0.0 });
            if best.is_none_or(|(_, b)| key > b) {
                best = Some((i, key));
            }
        }
    }
    best.map(|(i, _)| i)
}

/// Write the JSON, Markdown and HTML reports that were asked for.
pub fn write_reports(
    report: &crate::diff::DiffReport,
    json: Option<&std::path::Path>,
    markdown: Option<&std::path::Path>,
    html: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&render_json(report)).context("serializing the JSON report")?;
        capture::files::write_atomically(path, (text + "\n").as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = markdown {
        capture::files::write_atomically(path, render_markdown(report).as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = html {
        capture::files::write_atomically(path, render_html(report).as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The numbers that prove a divergence, as (label, value) pairs in the order
/// every report shows them; each renderer adds the provenance in its own markup.
pub fn divergence_facts(row: &crate::diff::StageRow) -> Vec<(&'static str, String)> {
    let m = &row.metrics;
    let mut kv = vec![
        ("gated on", row.metric.label().to_string()),
        ("threshold", row.threshold.map_or("-".into(), sci)),
        ("margin (value / threshold)", row.ratio().map_or("-".into(), sci)),
        ("worst-row rel-L2", format!("{} ({})", sci(m.row_rel_l2_max), m.worst_row)),
        ("median row rel-L2", sci(m.row_rel_l2_median)),
        ("max-abs", sci(m.max_abs)),
        ("mean-abs", sci(m.mean_abs)),
        ("rel-L2", sci(m.rel_l2)),
        ("cosine", format!("{:.6}", m.cosine)),
        ("NMSE", sci(m.nmse)),
        ("reference max-abs (scale)", sci(m.ref_max_abs)),
        ("NaN/Inf values", m.non_finite.to_string()),
        ("shape", format!("{:?}", m.shape)),
    ];
    if let Some(w) = &m.worst {
        kv.push(("worst element", format!("{} (flat {})", w.coords, w.flat_index)));
        kv.push(("ours", format!("{:.8e}", w.ours)));
        kv.push(("reference", format!("{:.8e}", w.reference)));
    }
    kv
}
