//! The HTML report's drill-down of a stage: the worst elements, a histogram
//! of |ours - reference| and bar charts of the error per token and per head,
//! as inline SVG (no scripts).

use super::html::esc;
use super::{sci, step_label};
use crate::diff::DiffReport;
use crate::drilldown::{Drilldown, GroupError};
use capture::stage::StageId;
use std::fmt::Write;

/// The anchor of a stage's drill-down ("drill-0-3-q_rope", "drill-0-g-logits").
pub fn drill_anchor(id: &StageId) -> String {
    format!("drill-{}-{}-{}", id.step, id.layer.map_or("g".to_string(), |l| l.to_string()), id.stage.name())
}

const BAR: &str = "#3f6fb5";
const NON_FINITE: &str = "#4b0055";

/// One bar of a chart: its label on the x axis, its value, its tooltip.
struct Bar {
    label: String,
    value: f64,
    tip: String,
}

/// A bar chart on a log10 axis. Zero draws no bar (the tooltip says 0);
/// an infinite or NaN value draws a full-height bar in the NaN/Inf colour
/// marked "∞", never a small one.
fn log_bars_svg(title: &str, y_label: &str, bars: &[Bar]) -> String {
    let positive: Vec<f64> = bars.iter().map(|b| b.value).filter(|v| v.is_finite() && *v > 0.0).collect();
    let hi = positive.iter().copied().fold(f64::NEG_INFINITY, f64::max).log10().ceil();
    let lo = positive.iter().copied().fold(f64::INFINITY, f64::min).log10().floor();
    let (lo, hi) = if hi.is_finite() && lo.is_finite() { (lo.max(hi - 8.0), hi) } else { (-1.0, 0.0) };
    let hi = if hi <= lo { lo + 1.0 } else { hi };
    let (left, right, top, bottom) = (52.0, 12.0, 22.0, 34.0);
    let n = bars.len().max(1) as f64;
    let bw = (560.0 / n).clamp(2.0, 28.0);
    let pw = bw * n;
    let ph = 120.0;
    let (w, h) = (left + pw + right, top + ph + bottom);
    let y_of = |v: f64| top + ph - ((v.log10() - lo) / (hi - lo)).clamp(0.0, 1.0) * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="10" role="img" aria-label="{}">"#,
        esc(title)
    );
    let _ = write!(s, r#"<text x="{left}" y="12" font-weight="bold">{}</text>"#, esc(title));
    let mut d = lo as i64;
    while d as f64 <= hi {
        let y = y_of(10f64.powi(d as i32));
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end">1e{d}</text>"##,
            left + pw,
            left - 4.0,
            y + 3.0
        );
        d += 1;
    }
    // Label at most ~20 bars so the labels never overlap.
    let every = (bars.len() / 20).max(1);
    for (i, b) in bars.iter().enumerate() {
        let x = left + bw * i as f64;
        let tip = esc(&b.tip);
        if !b.value.is_finite() {
            let _ = write!(
                s,
                r#"<rect x="{x:.1}" y="{top}" width="{:.1}" height="{ph}" fill="{NON_FINITE}"><title>{tip}</title></rect><text x="{:.1}" y="{}" text-anchor="middle" fill="{NON_FINITE}">∞</text>"#,
                (bw - 1.0).max(1.0),
                x + bw / 2.0,
                top - 2.0
            );
        } else if b.value > 0.0 {
            let y = y_of(b.value);
            let _ = write!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{BAR}"><title>{tip}</title></rect>"#,
                (bw - 1.0).max(1.0),
                (top + ph - y).max(0.5)
            );
        } else {
            // Zero: an invisible hit area that still carries the tooltip.
            let _ = write!(s, r#"<rect x="{x:.1}" y="{top}" width="{bw:.1}" height="{ph}" fill="transparent"><title>{tip}</title></rect>"#);
        }
        if i % every == 0 {
            let _ = write!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#, x + bw / 2.0, top + ph + 12.0, esc(&b.label));
        }
    }
    let _ = write!(
        s,
        r##"<line x1="{left}" x2="{}" y1="{}" y2="{}" stroke="#888"/><text x="{}" y="{}" text-anchor="middle">{}</text>"##,
        left + pw,
        top + ph,
        top + ph,
        left + pw / 2.0,
        h - 4.0,
        esc(y_label)
    );
    s.push_str("</svg>");
    s
}

/// The histogram: one bar per |diff| bin, height log10(1 + count), the count printed above.
fn histogram_svg(d: &Drilldown) -> String {
    let max = d.histogram.iter().map(|b| b.count).max().unwrap_or(0) as f64;
    let (left, top, ph, bw) = (8.0, 30.0, 110.0, 34.0);
    let pw = bw * d.histogram.len() as f64;
    let (w, h) = (left + pw + 8.0, top + ph + 48.0);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="9" role="img" aria-label="histogram of |ours - reference|">"#
    );
    let _ = write!(s, r#"<text x="{left}" y="12" font-size="10" font-weight="bold">|ours − reference|: elements per bin (log height)</text>"#);
    for (i, b) in d.histogram.iter().enumerate() {
        let x = left + bw * i as f64;
        let frac = if max > 0.0 { (1.0 + b.count as f64).log10() / (1.0 + max).log10() } else { 0.0 };
        let bh = frac * ph;
        let fill = if b.label == "NaN/Inf" { NON_FINITE } else { BAR };
        let tip = format!("{}: {} elements", b.label, b.count);
        let _ = write!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{fill}"><title>{}</title></rect>"#,
            x + 1.0,
            top + ph - bh,
            bw - 2.0,
            esc(&tip)
        );
        if b.count > 0 {
            let _ = write!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, x + bw / 2.0, top + ph - bh - 2.0, b.count);
        }
        // Bin labels turned, so "1e-10..1e-9" fits under a narrow bar.
        let (lx, ly) = (x + bw / 2.0 + 3.0, top + ph + 6.0);
        let _ = write!(s, r#"<text x="{lx:.1}" y="{ly:.1}" transform="rotate(-40 {lx:.1} {ly:.1})" text-anchor="end">{}</text>"#, esc(&b.label));
    }
    let _ = write!(s, r##"<line x1="{left}" x2="{}" y1="{}" y2="{}" stroke="#888"/>"##, left + pw, top + ph, top + ph);
    s.push_str("</svg>");
    s
}

fn group_tip(kind: &str, g: &GroupError) -> String {
    let mut t = format!("{kind} {}", g.index);
    if let Some(p) = g.position {
        let _ = write!(t, " (position {p}");
        if let Some(id) = g.token_id {
            let _ = write!(t, ", token id {id}");
        }
        t.push(')');
    }
    let _ = write!(t, ": rel-L2 {}, max-abs {}", sci(g.rel_l2), sci(g.max_abs));
    if g.non_finite > 0 {
        let _ = write!(t, ", {} NaN/Inf", g.non_finite);
    }
    t
}

fn group_bars(kind: &str, groups: &[GroupError]) -> Vec<Bar> {
    groups.iter().map(|g| Bar { label: g.index.to_string(), value: g.rel_l2, tip: group_tip(kind, g) }).collect()
}

/// "1.23456e-1", with NaN and inf spelled out.
fn value(x: f32) -> String {
    if x.is_finite() {
        format!("{x:.6e}")
    } else {
        x.to_string()
    }
}

/// One stage's drill-down as a `<details>` block (open for the first).
pub fn drilldown_html(r: &DiffReport, d: &Drilldown, open: bool) -> String {
    let mut out = String::new();
    let gate = r.rows.iter().find(|row| row.id == d.id).map_or(String::new(), |row| {
        format!(
            ": {} {} / threshold {} ({})",
            row.metric.label(),
            sci(row.value()),
            row.threshold.map_or("-".into(), sci),
            if row.pass { "pass" } else { "FAIL" }
        )
    });
    let _ = writeln!(
        out,
        "<details class=\"drill\" id=\"{}\"{}><summary><b>{}</b> — {}{}</summary>",
        drill_anchor(&d.id),
        if open { " open" } else { "" },
        esc(&d.id.to_string()),
        esc(&d.why),
        esc(&gate)
    );
    let _ = writeln!(
        out,
        "<p>{} elements compared of shape [{}] ({}){}.</p>",
        d.compared,
        d.shape.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "),
        esc(&d.axes.join(", ")),
        if d.id.stage == capture::Stage::AttnScores { "; the causal part only" } else { "" }
    );
    let token_axis = if d.axes.first().map(String::as_str) == Some("head") { "query" } else { "token" };
    out.push_str("<div class=\"drill-grid\"><div><table><tr><th>#</th><th>where</th><th>token id</th><th>position</th><th>ours</th><th>reference</th><th>|diff|</th></tr>");
    for (k, e) in d.worst.iter().enumerate() {
        let diff = if e.abs_diff.is_finite() { format!("{:.3e}", e.abs_diff) } else { "inf (NaN/Inf)".to_string() };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td{}>{}</td></tr>",
            k + 1,
            esc(&e.coords),
            e.token_id.map_or("-".into(), |t| t.to_string()),
            e.position.map_or("-".into(), |p| p.to_string()),
            value(e.ours),
            value(e.reference),
            if e.abs_diff.is_finite() { "" } else { " class=\"fail\"" },
            diff
        );
    }
    out.push_str("</table></div><div>");
    out.push_str(&histogram_svg(d));
    out.push_str("</div></div>\n<div class=\"drill-grid\">");
    out.push_str(&log_bars_svg(
        &format!("rel-L2 per {token_axis} ({})", step_label(d.id.step)),
        &format!("{token_axis} (row of the pass)"),
        &group_bars(token_axis, &d.per_token),
    ));
    if !d.per_head.is_empty() {
        out.push_str(&log_bars_svg("rel-L2 per head", "head", &group_bars("head", &d.per_head)));
    }
    out.push_str("</div></details>\n");
    out
}
