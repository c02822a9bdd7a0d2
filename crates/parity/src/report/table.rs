//! Terminal report: per-layer stage tables, an all-layers summary with heat
//! lines, and the verdict block.

use super::{free_running_lines, header_lines, heat_char, sci, step_label, verdict_lines, worst_of, Cell, Index, HEAT_LEGEND};
use crate::diff::DiffReport;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell as TCell, ContentArrangement, Table};
use capture::stage::{Stage, StageId};

fn new_table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_content_arrangement(ContentArrangement::Disabled).set_header(header.to_vec());
    t
}

fn status(r: &DiffReport, cell: &Cell) -> String {
    match cell {
        Cell::Row(i) => {
            let row = &r.rows[*i];
            match (row.pass, row.threshold) {
                (false, _) => "FAIL".into(),
                (true, None) => "no threshold".into(),
                (true, Some(_)) => "PASS".into(),
            }
        }
        Cell::Missing(side) => format!("MISSING in {side}"),
        Cell::ShapeMismatch => "SHAPE MISMATCH".into(),
        Cell::Unavailable => "unavailable".into(),
        Cell::Absent => String::new(),
    }
}

/// One table for the stages of `ids`: one row per stage.
fn stage_table(r: &DiffReport, index: &Index, ids: &[StageId]) -> Table {
    let mut t = new_table(&["stage", "max-abs", "mean-abs", "rel-L2", "worst row rel-L2", "cosine", "worst element", "ours", "ref", "threshold", "status"]);
    for id in ids {
        let cell = index.get(id);
        match &cell {
            Cell::Row(i) => {
                let row = &r.rows[*i];
                let m = &row.metrics;
                let (coords, ours, reference) = match &m.worst {
                    Some(w) => (w.coords.clone(), format!("{:.6e}", w.ours), format!("{:.6e}", w.reference)),
                    None => (String::new(), String::new(), String::new()),
                };
                t.add_row(vec![
                    TCell::new(id.stage.name()),
                    TCell::new(sci(m.max_abs)),
                    TCell::new(sci(m.mean_abs)),
                    TCell::new(sci(m.rel_l2)),
                    TCell::new(format!("{} ({})", sci(m.row_rel_l2_max), m.worst_row)),
                    TCell::new(format!("{:.6}", m.cosine)),
                    TCell::new(coords),
                    TCell::new(ours),
                    TCell::new(reference),
                    TCell::new(row.threshold.map_or("-".to_string(), |t| format!("{} {}", row.metric.label(), sci(t)))),
                    TCell::new(status(r, &cell)),
                ]);
            }
            Cell::Absent => {}
            _ => {
                let mut cells = vec![TCell::new(id.stage.name())];
                cells.extend((0..9).map(|_| TCell::new("")));
                cells.push(TCell::new(status(r, &cell)));
                t.add_row(cells);
            }
        }
    }
    t
}

fn layer_ids(step: usize, layer: usize) -> Vec<StageId> {
    Stage::PER_LAYER.iter().map(|&s| StageId::layer(step, layer, s)).collect()
}

fn global_ids(step: usize) -> Vec<StageId> {
    Stage::GLOBAL.iter().map(|&s| StageId::global(step, s)).collect()
}

fn summary(r: &DiffReport, index: &Index) -> String {
    let mut out = String::new();
    let mut t = new_table(&["step", "layer", "compared", "failed", "worst stage", "error", "/ threshold", "heat (stages in execution order)"]);
    for step in index.steps() {
        let mut groups: Vec<(String, Vec<StageId>)> = Vec::new();
        let globals = global_ids(step);
        if index.has_global(step) {
            groups.push(("embed".into(), vec![globals[0]]));
        }
        for layer in index.layers(step) {
            groups.push((layer.to_string(), layer_ids(step, layer)));
        }
        if index.has_global(step) {
            groups.push(("head".into(), globals[1..].to_vec()));
        }
        for (label, ids) in groups {
            let cells: Vec<Cell> = ids.iter().map(|id| index.get(id)).collect();
            let compared = cells.iter().filter(|c| matches!(c, Cell::Row(_))).count();
            let failed = cells
                .iter()
                .filter(|c| match c {
                    Cell::Row(i) => !r.rows[*i].pass,
                    Cell::Missing(_) | Cell::ShapeMismatch => true,
                    _ => false,
                })
                .count();
            let (stage, max_abs, ratio) = match worst_of(r, index, ids.iter().copied()) {
                Some(i) => {
                    let row = &r.rows[i];
                    (row.id.stage.name().to_string(), sci(row.value()), row.ratio().map_or("-".into(), sci))
                }
                None => (String::new(), String::new(), String::new()),
            };
            let heat: String = cells.iter().map(|c| heat_char(r, c)).collect();
            t.add_row(vec![
                step_label(step),
                label,
                compared.to_string(),
                failed.to_string(),
                stage,
                max_abs,
                ratio,
                heat,
            ]);
        }
    }
    out.push_str(&t.to_string());
    out.push('\n');
    let names: Vec<&str> = Stage::PER_LAYER.iter().map(|s| s.name()).collect();
    out.push_str(&format!("layer heat columns: {}\n", names.join(" ")));
    out.push_str(HEAT_LEGEND);
    out.push('\n');
    out
}

/// The terminal report. With `layers`, one detailed table per selected layer
/// (and step); without, the all-layers summary plus the detailed table of the
/// layer (or global stages) holding the first divergence.
pub fn render_terminal(r: &DiffReport, layers: Option<&[usize]>) -> String {
    let index = Index::new(r);
    let mut out = String::new();
    for line in header_lines(r) {
        out.push_str(&line);
        out.push('\n');
    }
    out.push('\n');
    let detail = |out: &mut String, title: String, ids: &[StageId]| {
        out.push_str(&title);
        out.push('\n');
        out.push_str(&stage_table(r, &index, ids).to_string());
        out.push_str("\n\n");
    };
    match layers {
        Some(selected) => {
            for step in index.steps() {
                for &layer in selected {
                    let ids = layer_ids(step, layer);
                    if ids.iter().any(|id| index.get(id) != Cell::Absent) {
                        detail(&mut out, format!("{}, layer {layer}", step_label(step)), &ids);
                    }
                }
            }
        }
        None => {
            out.push_str(&summary(r, &index));
            out.push('\n');
            let focus = r.first_divergence.map(|i| r.rows[i].id).or_else(|| r.missing.first().map(|(id, _)| *id));
            if let Some(id) = focus {
                match id.layer {
                    Some(layer) => detail(&mut out, format!("{}, layer {layer}", step_label(id.step)), &layer_ids(id.step, layer)),
                    None => detail(&mut out, format!("{}, global stages", step_label(id.step)), &global_ids(id.step)),
                }
            }
        }
    }
    for (id, side) in r.missing.iter().take(10) {
        out.push_str(&format!("missing in {side}: {id}\n"));
    }
    if r.missing.len() > 10 {
        out.push_str(&format!("... and {} more missing\n", r.missing.len() - 10));
    }
    for (id, msg) in &r.shape_mismatch {
        out.push_str(&format!("shape mismatch: {id}: {msg}\n"));
    }
    if !r.unavailable.is_empty() {
        out.push_str(&format!("unavailable (not observable in this configuration): {} checkpoints\n", r.unavailable.len()));
    }
    for (step, m) in &r.logits {
        out.push_str(&format!(
            "logits {}: top-1 agree {}/{}, KL(ref||ours) mean {} max {}{}\n",
            step_label(*step),
            m.top1_agree,
            m.rows,
            sci(m.kl_mean),
            sci(m.kl_max),
            r.logits_kl_max.map_or(String::new(), |g| format!(" (gate {})", sci(g)))
        ));
    }
    out.push('\n');
    for line in free_running_lines(r) {
        out.push_str(&line);
        out.push('\n');
    }
    for line in verdict_lines(r) {
        out.push_str(&line);
        out.push('\n');
    }
    out
}
