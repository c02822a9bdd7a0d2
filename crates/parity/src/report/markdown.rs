//! Markdown report: summary, verdict, first-divergence detail and one table
//! per step of layers × key stages.

use super::{divergence_facts, free_running_lines, header_lines, sci, step_label, verdict_lines, worst_of, Cell, Index};
use crate::diff::{DiffReport, FirstProblem};
use capture::stage::{Stage, StageId};

/// One cell of the per-step tables: text and whether it is a failure.
pub(crate) struct GridCell {
    pub text: String,
    pub fail: bool,
}

fn grid_cell(r: &DiffReport, cell: &Cell) -> GridCell {
    match cell {
        Cell::Row(i) => {
            let row = &r.rows[*i];
            GridCell { text: sci(row.metrics.max_abs), fail: !row.pass }
        }
        Cell::Missing(side) => GridCell { text: format!("missing in {side}"), fail: true },
        Cell::ShapeMismatch => GridCell { text: "shape mismatch".into(), fail: true },
        Cell::Unavailable => GridCell { text: "n/a".into(), fail: false },
        Cell::Absent => GridCell { text: String::new(), fail: false },
    }
}

/// Per step: header and rows (a row per layer, then one per global stage)
/// with max-abs of the key stages, the worst stage by max-abs/threshold and
/// the number of failing checkpoints.
pub(crate) fn step_grid(r: &DiffReport, index: &Index, step: usize) -> (Vec<String>, Vec<Vec<GridCell>>) {
    let key_stages: Vec<Stage> = Stage::key_stages().collect();
    let mut header = vec!["layer".to_string()];
    header.extend(key_stages.iter().map(|s| s.name().to_string()));
    header.push("worst stage (error / threshold)".into());
    header.push("failed".into());
    let mut rows = Vec::new();
    let plain = |t: String| GridCell { text: t, fail: false };
    let mut push_group = |label: String, key: Vec<Option<StageId>>, all: Vec<StageId>| {
        let mut cells = vec![plain(label)];
        cells.extend(key.iter().map(|id| id.map_or(plain(String::new()), |id| grid_cell(r, &index.get(&id)))));
        let failed = all
            .iter()
            .filter(|id| match index.get(id) {
                Cell::Row(i) => !r.rows[i].pass,
                Cell::Missing(_) | Cell::ShapeMismatch => true,
                _ => false,
            })
            .count();
        let worst = worst_of(r, index, all.iter().copied()).map_or(String::new(), |i| {
            let row = &r.rows[i];
            format!("{} ({})", row.id.stage, row.ratio().map_or("-".into(), sci))
        });
        cells.push(plain(worst));
        cells.push(GridCell { text: failed.to_string(), fail: failed > 0 });
        rows.push(cells);
    };
    for layer in index.layers(step) {
        let key = key_stages.iter().map(|&s| Some(StageId::layer(step, layer, s))).collect();
        let all = Stage::PER_LAYER.iter().map(|&s| StageId::layer(step, layer, s)).collect();
        push_group(layer.to_string(), key, all);
    }
    for s in Stage::GLOBAL {
        let id = StageId::global(step, s);
        if index.get(&id) == Cell::Absent {
            continue;
        }
        // A global stage's value goes in the first column.
        let mut key = vec![None; key_stages.len()];
        key[0] = Some(id);
        push_group(s.name().to_string(), key, vec![id]);
    }
    (header, rows)
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

pub fn render_markdown(r: &DiffReport) -> String {
    let index = Index::new(r);
    let mut out = format!("# Parity diff: {} vs {}\n\n", md_escape(&r.ours_engine), md_escape(&r.reference_engine));
    for line in header_lines(r) {
        out.push_str(&format!("- {}\n", md_escape(&line)));
    }
    out.push_str(&format!("- model sha256: `{}`\n", r.model_sha256));
    out.push_str("\n## Verdict\n\n```\n");
    for line in verdict_lines(r) {
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str("```\n\n");
    let fr = free_running_lines(r);
    if !fr.is_empty() {
        out.push_str("## Free-running\n\n```\n");
        for line in fr {
            out.push_str(&line);
            out.push('\n');
        }
        out.push_str("```\n\n");
    }

    if let Some(FirstProblem::Row(i)) = r.first_problem() {
        let row = &r.rows[i];
        out.push_str(&format!("## First divergence: {}\n\n", row.id));
        out.push_str("| metric | value |\n|---|---|\n");
        let mut kv = divergence_facts(row);
        kv.push(("ours provenance", format!("`{}`", md_escape(&row.ours_provenance))));
        kv.push(("reference provenance", format!("`{}`", md_escape(&row.ref_provenance))));
        for (k, v) in kv {
            out.push_str(&format!("| {k} | {v} |\n"));
        }
        out.push_str(&format!("\nLook at: {}\n\n", row.id.stage.what_to_check()));
        if let Some(d) = r.diagnosis.as_ref().filter(|d| d.at == row.id) {
            out.push_str(&diagnosis_markdown(d));
        }
    }

    for step in index.steps() {
        let (header, rows) = step_grid(r, &index, step);
        out.push_str(&format!("## {} (max-abs per stage)\n\n", step_label(step)));
        out.push_str(&format!("| {} |\n", header.join(" | ")));
        out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
        for cells in rows {
            let texts: Vec<String> = cells
                .iter()
                .map(|c| if c.fail { format!("**{} ✗**", md_escape(&c.text)) } else { md_escape(&c.text) })
                .collect();
            out.push_str(&format!("| {} |\n", texts.join(" | ")));
        }
        out.push('\n');
    }

    if !r.logits.is_empty() {
        out.push_str("## Logits\n\n| step | top-1 agree | KL mean | KL max |\n|---|---|---|---|\n");
        for (step, m) in &r.logits {
            out.push_str(&format!("| {} | {}/{} | {} | {} |\n", step_label(*step), m.top1_agree, m.rows, sci(m.kl_mean), sci(m.kl_max)));
        }
        out.push('\n');
    }
    if !r.missing.is_empty() || !r.shape_mismatch.is_empty() {
        out.push_str("## Missing or incomparable checkpoints\n\n");
        for (id, side) in &r.missing {
            out.push_str(&format!("- {id}: missing in {side}\n"));
        }
        for (id, msg) in &r.shape_mismatch {
            out.push_str(&format!("- {id}: {}\n", md_escape(msg)));
        }
        out.push('\n');
    }
    if !r.unavailable.is_empty() {
        out.push_str(&format!("{} checkpoints are not observable in this configuration (unavailable).\n", r.unavailable.len()));
    }
    out
}

/// The diagnosis's ranked hypotheses as a table, with the evidence.
fn diagnosis_markdown(d: &crate::diagnosis::Diagnosis) -> String {
    let named = d.named();
    let mut out = format!(
        "## Diagnosis: {}\n\n{}\n\n| # | kind | claim | names | test | figure | holds |\n|---|---|---|---|---|---|---|\n",
        d.at,
        if named.is_empty() { "No bug model or pattern explains it.".to_string() } else { format!("Names: **{}**.", named.join(" = ")) }
    );
    for (k, h) in d.hypotheses.iter().enumerate() {
        let kind = match h.kind {
            crate::diagnosis::Kind::Replay => "replay",
            crate::diagnosis::Kind::Pattern => "pattern",
        };
        out.push_str(&format!(
            "| {} | {kind} | {} | {} | {} | {} | {} |\n",
            k + 1,
            md_escape(&h.claim),
            h.explains.join(", "),
            md_escape(&h.test),
            sci(h.figure),
            if h.holds { "**yes**" } else { "no" }
        ));
    }
    out.push_str(&format!("\nEvidence: {}\n\n", md_escape(&d.evidence)));
    if let Some(a) = &d.attribution {
        out.push_str(&format!("{}\n\n", md_escape(a)));
    }
    out
}
