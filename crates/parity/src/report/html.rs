//! Self-contained HTML report, the place an investigation happens: the
//! verdict linked to the first divergent cell of the heatmap, the first
//! divergence with its diagnosis beside it, the drill-down of a few stages
//! (`html_drilldown`), per step an inline SVG heatmap of log10(error /
//! threshold) over layers × stages, line charts of max-abs per layer for
//! each stage family and the Markdown report's tables, then the run's
//! configuration. No scripts, no external resources.

use super::html_drilldown::{drill_anchor, drilldown_html};
use super::markdown::step_grid;
use super::{divergence_facts, free_running_lines, header_lines, sci, step_label, verdict_lines, Cell, Index};
use crate::diff::{DiffReport, FirstProblem};
use capture::stage::{Family, Stage, StageId};
use std::fmt::Write;

pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn lerp(a: (f64, f64, f64), b: (f64, f64, f64), t: f64) -> String {
    let t = t.clamp(0.0, 1.0);
    let c = |x: f64, y: f64| (x + (y - x) * t).round() as u8;
    format!("#{:02x}{:02x}{:02x}", c(a.0, b.0), c(a.1, b.1), c(a.2, b.2))
}

/// Fill colour and tooltip for one checkpoint.
fn heat_fill(r: &DiffReport, id: &StageId, cell: &Cell) -> (String, String) {
    match cell {
        Cell::Row(i) => {
            let row = &r.rows[*i];
            let m = &row.metrics;
            let tip = format!(
                "{id}: {} {} / threshold {} ({})",
                row.metric.label(),
                sci(row.value()),
                row.threshold.map_or("-".into(), sci),
                if row.pass { "pass" } else { "FAIL" }
            );
            if m.non_finite > 0 {
                return ("#4b0055".into(), tip);
            }
            let Some(ratio) = row.ratio() else { return ("#9fb3c8".into(), tip) };
            let v = if ratio > 0.0 { ratio.log10() } else { -4.0 };
            let fill = if v <= 0.0 {
                // -4 (far below) dark green .. 0 (at the threshold) yellow
                lerp((26.0, 120.0, 60.0), (240.0, 220.0, 60.0), (v + 4.0) / 4.0)
            } else {
                // 0 orange .. 3 and beyond dark red
                lerp((240.0, 140.0, 40.0), (140.0, 0.0, 0.0), v / 3.0)
            };
            (fill, tip)
        }
        Cell::Missing(side) => ("#d000d0".into(), format!("{id}: missing in {side}")),
        Cell::ShapeMismatch => ("#d000d0".into(), format!("{id}: shape mismatch")),
        Cell::Unavailable => ("#dddddd".into(), format!("{id}: unavailable")),
        Cell::Absent => ("#ffffff".into(), format!("{id}: not captured")),
    }
}

/// A heatmap cell's identity for readers and tests (`data-*`), and for the
/// first divergence its anchor (the verdict links to it).
fn cell_attributes(id: &StageId, first: Option<StageId>) -> String {
    let mut a = format!(
        r#" data-step="{}" data-layer="{}" data-stage="{}""#,
        id.step,
        id.layer.map_or("global".to_string(), |l| l.to_string()),
        id.stage.name()
    );
    if first == Some(*id) {
        a.push_str(r#" id="first-divergence-cell" data-first-divergence="true""#);
    }
    a
}

/// `svg` wrapped in a link to the stage's drill-down, when it has one.
fn linked(svg: String, id: &StageId, drilled: &[StageId]) -> String {
    if drilled.contains(id) {
        format!(r##"<a href="#{}">{svg}</a>"##, drill_anchor(id))
    } else {
        svg
    }
}

fn heatmap_svg(r: &DiffReport, index: &Index, step: usize) -> String {
    let first = r.first_problem_id();
    let drilled: &[StageId] = &r.drilldowns.iter().map(|d| d.id).collect::<Vec<_>>();
    let mut marks: Vec<(f64, f64, f64)> = Vec::new();
    let layers = index.layers(step);
    let globals: Vec<StageId> =
        Stage::GLOBAL.iter().map(|&s| StageId::global(step, s)).filter(|id| index.get(id) != Cell::Absent).collect();
    let (cw, ch, left, top) = (22.0, 14.0, 70.0, 90.0);
    let cols = Stage::PER_LAYER.len();
    let grid_h = ch * layers.len() as f64;
    let global_top = top + grid_h + if globals.is_empty() { 0.0 } else { 16.0 };
    let height = global_top + if globals.is_empty() { 0.0 } else { ch + 8.0 } + 40.0;
    let width = left + cw * cols as f64 + 20.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="10" role="img" aria-label="heatmap of log10(max-abs/threshold), {}">"#,
        esc(&step_label(step))
    );
    for (c, stage) in Stage::PER_LAYER.iter().enumerate() {
        let x = left + cw * c as f64 + cw / 2.0;
        let _ = write!(s, r#"<text x="{x}" y="{}" transform="rotate(-60 {x} {})">{}</text>"#, top - 4.0, top - 4.0, stage.name());
    }
    for (row, &layer) in layers.iter().enumerate() {
        let y = top + ch * row as f64;
        let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="end">layer {layer}</text>"#, left - 4.0, y + ch - 3.0);
        for (c, &stage) in Stage::PER_LAYER.iter().enumerate() {
            let id = StageId::layer(step, layer, stage);
            let (fill, tip) = heat_fill(r, &id, &index.get(&id));
            let x = left + cw * c as f64;
            let rect = format!(
                r##"<rect class="cell"{} x="{x}" y="{y}" width="{cw}" height="{ch}" fill="{fill}" stroke="#ffffff" stroke-width="0.5"><title>{}</title></rect>"##,
                cell_attributes(&id, first),
                esc(&tip)
            );
            s.push_str(&linked(rect, &id, drilled));
            if first == Some(id) {
                marks.push((x, y, cw));
            }
        }
    }
    if !globals.is_empty() {
        let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="end">global</text>"#, left - 4.0, global_top + ch - 3.0);
        let gw = cw * 3.0;
        for (c, id) in globals.iter().enumerate() {
            let (fill, tip) = heat_fill(r, id, &index.get(id));
            let x = left + gw * c as f64;
            let rect = format!(
                r##"<rect class="cell"{} x="{x}" y="{global_top}" width="{gw}" height="{ch}" fill="{fill}" stroke="#ffffff"><title>{}</title></rect>"##,
                cell_attributes(id, first),
                esc(&tip)
            );
            s.push_str(&linked(rect, id, drilled));
            let _ = write!(s, r#"<text x="{}" y="{}" font-size="8" pointer-events="none">{}</text>"#, x + 2.0, global_top + ch - 4.0, id.stage.name());
            if first == Some(*id) {
                marks.push((x, global_top, gw));
            }
        }
    }
    // The first divergence's outline, drawn over its neighbours.
    for (x, y, w) in marks {
        let _ = write!(
            s,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#000000" stroke-width="3" pointer-events="none"/>"##,
            x - 1.0,
            y - 1.0,
            w + 2.0,
            ch + 2.0
        );
    }
    let ly = height - 20.0;
    let legend = [
        ("#1a783c", "≤1e-4"),
        ("#85cd4e", "1e-2"),
        ("#f0dc3c", "=threshold"),
        ("#f08c28", ">threshold"),
        ("#8c0000", "≥1e3×"),
        ("#4b0055", "NaN/Inf"),
        ("#d000d0", "missing"),
        ("#dddddd", "n/a"),
        ("#9fb3c8", "no threshold"),
    ];
    for (i, (color, label)) in legend.iter().enumerate() {
        let x = 4.0 + 84.0 * (i % 5) as f64;
        let y = ly - 12.0 * (1 - i / 5) as f64;
        let _ = write!(s, r#"<rect x="{x}" y="{}" width="10" height="9" fill="{color}"/><text x="{}" y="{}">{}</text>"#, y - 8.0, x + 13.0, y, esc(label));
    }
    s.push_str("</svg>");
    s
}

const PALETTE: [&str; 9] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"];

/// max-abs per layer (log scale) for each stage of one family, for one step.
fn family_chart_svg(r: &DiffReport, index: &Index, step: usize, family: &str, stages: &[Stage]) -> Option<String> {
    let layers = index.layers(step);
    let series: Vec<(Stage, Vec<(usize, f64)>)> = stages
        .iter()
        .map(|&stage| {
            let pts = layers
                .iter()
                .filter_map(|&l| match index.get(&StageId::layer(step, l, stage)) {
                    Cell::Row(i) => Some((l, r.rows[i].metrics.max_abs)),
                    _ => None,
                })
                .collect();
            (stage, pts)
        })
        .filter(|(_, pts): &(Stage, Vec<(usize, f64)>)| !pts.is_empty())
        .collect();
    if series.is_empty() {
        return None;
    }
    let logs: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().map(|&(_, y)| y)).filter(|y| y.is_finite() && *y > 0.0).map(f64::log10).collect();
    let (mut lo, mut hi) = (
        logs.iter().copied().fold(f64::INFINITY, f64::min).floor(),
        logs.iter().copied().fold(f64::NEG_INFINITY, f64::max).ceil(),
    );
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (-8.0, 0.0);
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    let (w, h, left, right, top, bottom) = (560.0, 240.0, 56.0, 130.0, 24.0, 30.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let (lmin, lmax) = (*layers.first()? as f64, *layers.last()? as f64);
    let xs = |l: usize| left + if lmax > lmin { (l as f64 - lmin) / (lmax - lmin) * pw } else { pw / 2.0 };
    // Zero maps to the bottom, non-finite values to the top (marked).
    let ys = |y: f64| {
        if !y.is_finite() {
            top - 8.0
        } else if y <= 0.0 {
            top + ph
        } else {
            top + ph - ((y.log10() - lo) / (hi - lo)).clamp(0.0, 1.0) * ph
        }
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="10" role="img" aria-label="max-abs per layer, {} ({})">"#,
        esc(family),
        esc(&step_label(step))
    );
    let _ = write!(s, r#"<text x="{left}" y="12" font-weight="bold">{} — max-abs per layer ({})</text>"#, esc(family), esc(&step_label(step)));
    let mut d = lo as i64;
    while d as f64 <= hi {
        let y = ys(10f64.powi(d as i32));
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y}" y2="{y}" stroke="#e0e0e0"/><text x="{}" y="{}" text-anchor="end">1e{d}</text>"##,
            left + pw,
            left - 4.0,
            y + 3.0
        );
        d += 1;
    }
    for &l in &layers {
        let x = xs(l);
        let _ = write!(s, r#"<text x="{x}" y="{}" text-anchor="middle">{l}</text>"#, top + ph + 12.0);
    }
    let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="middle">layer</text>"#, left + pw / 2.0, h - 4.0);
    for (k, (stage, pts)) in series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let coords: Vec<String> = pts.iter().map(|&(l, y)| format!("{:.1},{:.1}", xs(l), ys(y))).collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#, coords.join(" "));
        for &(l, y) in pts {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2" fill="{color}"><title>layer {l}, {}: max-abs {}</title></circle>"#,
                xs(l),
                ys(y),
                stage.name(),
                sci(y)
            );
        }
        let ly = top + 12.0 * k as f64;
        let _ = write!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            left + pw + 8.0,
            left + pw + 22.0,
            left + pw + 26.0,
            ly + 3.0,
            stage.name()
        );
    }
    s.push_str("</svg>");
    Some(s)
}

/// The configuration section: everything the report knows about the run.
fn configuration_html(r: &DiffReport) -> String {
    let mut rows: Vec<(String, String)> = vec![
        ("ours".into(), r.ours_engine.clone()),
        ("reference".into(), r.reference_engine.clone()),
        ("comparison (verdict)".into(), r.comparison.clone()),
        ("numerics (ours)".into(), if r.numerics.is_empty() { "not recorded".into() } else { r.numerics.clone() }),
        ("KV cache".into(), r.kv_type.clone()),
        ("thresholds".into(), r.thresholds_source.clone()),
        ("gated metric".into(), r.rows.first().map_or("-".into(), |row| row.metric.label().to_string())),
        ("logits KL gate".into(), r.logits_kl_max.map_or("none".into(), sci)),
    ];
    if let Some(fr) = &r.free_running {
        rows.push(("free-running thresholds".into(), fr.thresholds_source.clone()));
    }
    rows.push(("model sha256".into(), r.model_sha256.clone()));
    rows.extend(r.configuration.iter().cloned());
    rows.push(("prompt tokens".into(), format!("{} {:?}", r.tokens.len(), r.tokens)));
    let mut out = String::from("<h2 id=\"configuration\">Configuration</h2>\n<table class=\"config\">");
    for (k, v) in rows {
        let _ = write!(out, "<tr><td>{}</td><td><code>{}</code></td></tr>", esc(&k), esc(&v));
    }
    let _ = writeln!(out, "<tr><td>prompt</td><td><pre>{}</pre></td></tr></table>", esc(&r.prompt));
    out
}

/// The diagnosis of the first divergence: its ranked hypotheses, the
/// evidence and the attribution to ggml's rounding.
fn diagnosis_html(d: &crate::diagnosis::Diagnosis) -> String {
    let mut out = format!("<section id=\"diagnosis\"><h2>Diagnosis: {}</h2>", esc(&d.at.to_string()));
    let _ = write!(out, "<p><b>{}</b></p>", esc(&d.headline()));
    let named = d.named();
    if !named.is_empty() {
        let _ = write!(out, "<p>Names: <b>{}</b> (<code>parity faults</code> describes each)</p>", esc(&named.join(" = ")));
    }
    out.push_str("<table class=\"text\"><tr><th>#</th><th>kind</th><th>claim</th><th>names</th><th>test</th><th>figure</th><th>holds</th></tr>");
    for (k, h) in d.hypotheses.iter().enumerate() {
        let _ = write!(
            out,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if h.holds { " class=\"holds\"" } else { "" },
            k + 1,
            match h.kind {
                crate::diagnosis::Kind::Replay => "replay",
                crate::diagnosis::Kind::Pattern => "pattern",
            },
            esc(&h.claim),
            esc(&h.explains.join(", ")),
            esc(&h.test),
            sci(h.figure),
            if h.holds { "yes" } else { "no" }
        );
    }
    out.push_str("</table>");
    let _ = write!(out, "<p>Evidence: {}</p>", esc(&d.evidence));
    // The attribution line names itself ("attribution: ...").
    if let Some(line) = &d.attribution {
        let _ = write!(out, "<p>{}</p>", esc(line));
    }
    out.push_str("</section>");
    out
}

fn step_anchor(step: usize) -> String {
    format!("step-{step}")
}

/// Links to the sections, and to every step with how many of its stages failed.
fn contents_html(r: &DiffReport, index: &Index) -> String {
    let mut out = String::from("<nav class=\"toc\"><b>Contents</b><ul><li><a href=\"#verdict\">Verdict</a></li>");
    if r.first_problem().is_some() {
        out.push_str("<li><a href=\"#first-divergence\">First divergence</a></li>");
    }
    if r.diagnosis.is_some() {
        out.push_str("<li><a href=\"#diagnosis\">Diagnosis</a></li>");
    }
    if !r.drilldowns.is_empty() {
        out.push_str("<li><a href=\"#drilldown\">Drill-down</a></li>");
    }
    out.push_str("<li>Steps:");
    for step in index.steps() {
        let failed = r.rows.iter().filter(|row| row.id.step == step && !row.pass).count();
        let mark = if failed > 0 { format!(" <span class=\"bad\">({failed} failed)</span>") } else { String::new() };
        let _ = write!(out, " <a href=\"#{}\">{}</a>{mark}", step_anchor(step), esc(&step_label(step)));
    }
    out.push_str("</li>");
    if !r.logits.is_empty() {
        out.push_str("<li><a href=\"#logits\">Logits</a></li>");
    }
    out.push_str("<li><a href=\"#configuration\">Configuration</a></li></ul></nav>\n");
    out
}

pub fn render_html(r: &DiffReport) -> String {
    let index = Index::new(r);
    let mut out = String::new();
    let title = format!("Parity diff: {} vs {}", r.ours_engine, r.reference_engine);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>\
         body{{font-family:sans-serif;margin:1.5em;color:#222}} pre{{background:#f4f4f4;padding:.6em;white-space:pre-wrap}}\
         table{{border-collapse:collapse;margin:.5em 0;font-size:12px}} td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}\
         td:first-child,th{{text-align:left}} td.fail{{background:#f8d0d0;font-weight:bold}} tr.holds td{{background:#dff3df}}\
         .charts svg,.drill svg{{margin:4px;border:1px solid #eee}} .bad{{color:#a00000}}\
         .verdict-match{{color:#17702f}} .verdict-diverged{{color:#a00000}} .side{{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}}\
         .side>section{{flex:1 1 32em;min-width:0}} .drill{{margin:.6em 0;padding:.3em .6em;border:1px solid #ddd}} .drill summary{{cursor:pointer}}\
         .drill-grid{{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}} .config td:first-child{{white-space:nowrap}}\
         .config td{{text-align:left;word-break:break-word}} .config pre{{margin:0}} table.text td{{text-align:left}} .toc ul{{margin:.2em 0}}</style></head><body>\n<h1>{}</h1>\n<ul>",
        esc(&title),
        esc(&title)
    );
    for line in header_lines(r) {
        let _ = write!(out, "<li>{}</li>", esc(&line));
    }
    let _ = writeln!(out, "<li>model sha256: <code>{}</code></li></ul>", esc(&r.model_sha256));
    if index.steps().len() > 1 {
        out.push_str(&contents_html(r, &index));
    }
    let class = match r.verdict {
        crate::diff::Verdict::Match => "verdict-match",
        crate::diff::Verdict::Diverged => "verdict-diverged",
    };
    let _ = writeln!(out, "<h2 id=\"verdict\">Verdict</h2><pre class=\"{class}\">{}</pre>", esc(&verdict_lines(r).join("\n")));
    if let Some(id) = r.first_problem_id() {
        let _ = write!(out, "<p>See <a href=\"#first-divergence-cell\">{} in the heatmap</a>", esc(&id.to_string()));
        if r.drilldowns.iter().any(|d| d.id == id) {
            let _ = write!(out, ", <a href=\"#{}\">its drill-down</a>", drill_anchor(&id));
        }
        if r.diagnosis.is_some() {
            out.push_str(", <a href=\"#diagnosis\">the diagnosis</a>");
        }
        out.push_str(".</p>\n");
    }
    let fr = free_running_lines(r);
    if !fr.is_empty() {
        let _ = writeln!(out, "<h2>Free-running</h2><pre>{}</pre>", esc(&fr.join("\n")));
    }

    // The first divergence's numbers with the diagnosis beside them.
    let first_facts = match r.first_problem() {
        Some(FirstProblem::Row(i)) => {
            let row = &r.rows[i];
            let mut s = format!("<section id=\"first-divergence\"><h2>First divergence: {}</h2><table>", esc(&row.id.to_string()));
            let mut kv = divergence_facts(row);
            kv.push(("ours provenance", row.ours_provenance.clone()));
            kv.push(("reference provenance", row.ref_provenance.clone()));
            for (k, v) in kv {
                let _ = write!(s, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(&v));
            }
            let _ = write!(s, "</table><p>Look at: {}</p></section>", esc(row.id.stage.what_to_check()));
            Some(s)
        }
        Some(_) => Some("<section id=\"first-divergence\"><h2>First divergence</h2><p>See the verdict above.</p></section>".to_string()),
        None => None,
    };
    let diagnosis = r.diagnosis.as_ref().map(diagnosis_html);
    if first_facts.is_some() || diagnosis.is_some() {
        let _ = writeln!(out, "<div class=\"side\">{}{}</div>", first_facts.unwrap_or_default(), diagnosis.unwrap_or_default());
    }

    if !r.drilldowns.is_empty() {
        out.push_str("<h2 id=\"drilldown\">Drill-down</h2>\n<p>The worst elements with both values, where the error sits \
                      (|ours − reference| per bin), and rel-L2 per token and per head: a bug confined to one token or one \
                      head stands out as one bar. NaN/Inf is drawn as a full purple bar (∞).</p>\n");
        for (k, d) in r.drilldowns.iter().enumerate() {
            out.push_str(&drilldown_html(r, d, k == 0));
        }
    }

    for step in index.steps() {
        let _ = write!(out, "<h2 id=\"{}\">{}</h2>\n<h3>log10(error / threshold)</h3>\n", step_anchor(step), esc(&step_label(step)));
        out.push_str(&heatmap_svg(r, &index, step));
        out.push_str("\n<div class=\"charts\">");
        for family in Family::CHARTED {
            let stages: Vec<Stage> = Stage::of_family(family).collect();
            if let Some(svg) = family_chart_svg(r, &index, step, family.title(), &stages) {
                out.push_str(&svg);
            }
        }
        out.push_str("</div>\n<h3>max-abs per stage</h3>\n<table><tr>");
        let (header, rows) = step_grid(r, &index, step);
        for h in header {
            let _ = write!(out, "<th>{}</th>", esc(&h));
        }
        out.push_str("</tr>");
        for cells in rows {
            out.push_str("<tr>");
            for c in cells {
                let _ = write!(out, "<td{}>{}</td>", if c.fail { " class=\"fail\"" } else { "" }, esc(&c.text));
            }
            out.push_str("</tr>");
        }
        out.push_str("</table>\n");
    }

    if !r.logits.is_empty() {
        out.push_str("<h2 id=\"logits\">Logits</h2><table><tr><th>step</th><th>top-1 agree</th><th>KL mean</th><th>KL max</th></tr>");
        for (step, m) in &r.logits {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td></tr>",
                esc(&step_label(*step)),
                m.top1_agree,
                m.rows,
                sci(m.kl_mean),
                sci(m.kl_max)
            );
        }
        out.push_str("</table>\n");
    }
    if !r.missing.is_empty() || !r.shape_mismatch.is_empty() {
        out.push_str("<h2>Missing or incomparable checkpoints</h2><ul>");
        for (id, side) in &r.missing {
            let _ = write!(out, "<li>{}: missing in {}</li>", esc(&id.to_string()), esc(side));
        }
        for (id, msg) in &r.shape_mismatch {
            let _ = write!(out, "<li>{}: {}</li>", esc(&id.to_string()), esc(msg));
        }
        out.push_str("</ul>\n");
    }
    if !r.unavailable.is_empty() {
        let _ = writeln!(out, "<p>{} checkpoints are not observable in this configuration (unavailable).</p>", r.unavailable.len());
    }
    out.push_str(&configuration_html(r));
    out.push_str("</body></html>\n");
    out
}
