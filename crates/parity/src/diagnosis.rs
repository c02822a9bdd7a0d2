//! Name the bug, not only the op: at the first divergence, pattern tests on
//! the two tensors (a scale, a constant offset per channel, where along the
//! tokens the error sits, NaN/Inf) and a what-if replay: the stage's op run
//! again on the reference's input under each bug model of the fault
//! catalogue that acts there, compared with the engine under test's output.
//! A bug model that reproduces it within the stage's gate is named.

use capture::{Stage, StageId, Tensor};
use serde::Serialize;

/// One hypothesis about the divergence, with the test and its figure.
#[derive(Clone, Debug, Serialize)]
pub struct Hypothesis {
    /// What it claims, in one line.
    pub claim: String,
    /// How it was tested.
    pub test: String,
    /// The figure the test produced (smaller is a better fit for replays
    /// and scales; see `test`).
    pub figure: f64,
    pub holds: bool,
}

/// The ranked hypotheses at one divergent stage: those that hold first,
/// then by figure.
#[derive(Clone, Debug, Serialize)]
pub struct Diagnosis {
    pub at: StageId,
    pub hypotheses: Vec<Hypothesis>,
    /// Where the error sits when nothing holds: the worst tokens.
    pub evidence: String,
    /// How much of the difference ggml's rounding could explain: our engine
    /// in exact vs ggml numerics at this stage, against the divergence.
    pub attribution: Option<String>,
}

impl Diagnosis {
    pub fn best(&self) -> Option<&Hypothesis> {
        self.hypotheses.first().filter(|h| h.holds)
    }

    /// One line for the verdict.
    pub fn headline(&self) -> String {
        match self.best() {
            Some(h) => {
                let tied: Vec<&str> = self.hypotheses.iter().skip(1).filter(|x| x.holds && x.figure == h.figure).map(|x| x.claim.as_str()).collect();
                let next = self.hypotheses.iter().skip(1 + tied.len()).find(|x| x.holds).map_or("none".to_string(), |x| x.claim.clone());
                let tie = if tied.is_empty() { String::new() } else { format!("; equally: {}", tied.join("; ")) };
                format!("diagnosis: {} ({}: {:.1e}{tie}; next that holds: {next})", h.claim, h.test, h.figure)
            }
            None => format!("diagnosis: no bug model reproduces it; {}", self.evidence),
        }
    }

    pub fn sort(&mut self) {
        self.hypotheses.sort_by(|a, b| b.holds.cmp(&a.holds).then(a.figure.total_cmp(&b.figure)));
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut d2, mut b2) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        d2 += (x as f64 - y as f64).powi(2);
        b2 += (y as f64).powi(2);
    }
    if b2 > 0.0 {
        (d2 / b2).sqrt()
    } else if d2 == 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

/// Known constants a scale bug multiplies by, for naming a fitted scale.
fn name_scale(c: f64, head_dim: usize) -> Option<String> {
    let hd = head_dim as f64;
    let known = [
        (hd.sqrt(), "sqrt(head_dim)"),
        (1.0 / hd.sqrt(), "1/sqrt(head_dim)"),
        (hd, "head_dim"),
        (1.0 / hd, "1/head_dim"),
        (2.0, "2"),
        (0.5, "1/2"),
        (-1.0, "-1 (sign flipped)"),
    ];
    known.iter().find(|(k, _)| ((c - k) / k).abs() < 1e-3).map(|(_, n)| n.to_string())
}

/// Pattern tests that need only the two tensors (and the stage's gate).
pub fn patterns(stage: Stage, ours: &Tensor, reference: &Tensor, gate: f64, head_dim: usize) -> (Vec<Hypothesis>, String) {
    let mut out = Vec::new();
    let n_bad = ours.data.iter().chain(&reference.data).filter(|v| !v.is_finite()).count();
    if n_bad > 0 {
        let first = ours.data.iter().position(|v| !v.is_finite());
        out.push(Hypothesis {
            claim: format!("NaN/Inf in our tensor ({n_bad} values{})", first.map_or(String::new(), |i| format!(", first at flat index {i}"))),
            test: "count of non-finite values".into(),
            figure: n_bad as f64,
            holds: true,
        });
        return (out, String::new());
    }
    // A scale: ours = c * reference.
    let (dot, rr) = ours.data.iter().zip(&reference.data).fold((0f64, 0f64), |(d, r), (&a, &b)| (d + a as f64 * b as f64, r + (b as f64).powi(2)));
    if rr > 0.0 {
        let c = dot / rr;
        let scaled: Vec<f32> = reference.data.iter().map(|&b| (c * b as f64) as f32).collect();
        let fit = rel_l2(&ours.data, &scaled);
        let named = name_scale(c, head_dim);
        out.push(Hypothesis {
            claim: format!("ours = {c:.6} x reference{}", named.map_or(String::new(), |n| format!(" ({n})"))),
            test: "rel-L2 of ours - c x reference, c fitted".into(),
            figure: fit,
            holds: fit <= gate && (c - 1.0).abs() > 1e-3,
        });
    }
    // A constant offset per channel: the difference is the same row for every token.
    let width = stage.layout().row_width(&ours.shape).max(1);
    let rows = ours.data.len() / width;
    if rows >= 2 && stage.layout() != capture::Layout::Attention {
        let diff: Vec<f32> = ours.data.iter().zip(&reference.data).map(|(a, b)| a - b).collect();
        let first = &diff[..width];
        let spread = diff.chunks(width).skip(1).map(|r| rel_l2(r, first)).fold(0f64, f64::max);
        let size = rel_l2(&diff, &reference.data);
        out.push(Hypothesis {
            claim: "a constant offset per channel (the same difference row for every token: a bias missing or added twice)".into(),
            test: "largest rel-L2 of a token's difference row against token 0's".into(),
            figure: spread,
            holds: spread <= 1e-3 && size > gate,
        });
    }
    // Where along the tokens the error sits.
    let per_row: Vec<f64> = ours.data.chunks(width).zip(reference.data.chunks(width)).map(|(a, b)| rel_l2(a, b)).collect();
    let bad: Vec<usize> = per_row.iter().enumerate().filter(|(_, &e)| e > gate).map(|(i, _)| i).collect();
    let evidence = if bad.is_empty() {
        String::new()
    } else {
        let worst = per_row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
        format!("{} of {rows} rows over the gate, worst row {worst} (rel-L2 {:.1e}), first bad row {}", bad.len(), per_row[worst], bad[0])
    };
    if rows >= 2 && stage.layout() != capture::Layout::Attention {
        let clean_prefix = bad.first().copied().unwrap_or(rows);
        if clean_prefix > 0 && clean_prefix < rows {
            out.push(Hypothesis {
                claim: format!("tokens 0..{clean_prefix} match and later ones do not (a position-dependent bug: RoPE position, base or pairing)"),
                test: "first token row over the gate".into(),
                figure: clean_prefix as f64,
                holds: true,
            });
        }
    }
    (out, evidence)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: Vec<usize>, f: impl Fn(usize) -> f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(shape, (0..n).map(f).collect())
    }

    #[test]
    fn a_scale_is_fitted_and_named() {
        let r = t(vec![4, 8], |i| ((i * 7 % 13) as f32 - 6.0) * 0.1);
        let o = Tensor::new(r.shape.clone(), r.data.iter().map(|x| x * 8.0).collect());
        let (h, _) = patterns(Stage::AttnScores, &o, &r, 1e-4, 64);
        let scale = h.iter().find(|h| h.claim.contains("x reference")).unwrap();
        assert!(scale.holds && scale.claim.contains("sqrt(head_dim)"), "{scale:?}");
    }

    #[test]
    fn an_offset_per_channel_is_seen() {
        let r = t(vec![5, 8], |i| ((i * 5 % 11) as f32 - 5.0) * 0.3);
        let bias: Vec<f32> = (0..8).map(|c| c as f32 * 0.2 - 0.7).collect();
        let o = Tensor::new(r.shape.clone(), r.data.iter().enumerate().map(|(i, x)| x + bias[i % 8]).collect());
        let (h, _) = patterns(Stage::QProj, &o, &r, 1e-4, 4);
        assert!(h.iter().any(|h| h.holds && h.claim.contains("offset per channel")), "{h:?}");
    }

    #[test]
    fn position_structure_and_nan() {
        let r = t(vec![4, 8], |i| (i as f32 * 0.37).sin());
        let mut o = r.clone();
        for v in &mut o.data[16..] {
            *v += 0.5;
        }
        let (h, e) = patterns(Stage::QRope, &o, &r, 1e-4, 4);
        assert!(h.iter().any(|h| h.holds && h.claim.starts_with("tokens 0..2 match")), "{h:?}");
        assert!(e.contains("first bad row 2"), "{e}");
        o.data[5] = f32::NAN;
        let (h, _) = patterns(Stage::QRope, &o, &r, 1e-4, 4);
        assert!(h[0].claim.starts_with("NaN/Inf"));
    }
}

/// The what-if replay at `at`: every bug model of the fault catalogue that
/// acts at that stage, run as our engine with that fault at that layer,
/// teacher-forced on `reference`; its tensor at `at` compared with `eut`,
/// the engine under test's. Holds when it reproduces `eut` within `gate`
/// (worst-row rel-L2). Our engine is left with the fault it had.
pub fn replay(
    pair: &mut crate::session::Pair,
    reference: &capture::Capture,
    at: StageId,
    eut: &Tensor,
    gate: f64,
) -> anyhow::Result<Vec<Hypothesis>> {
    use engine::fault::{Expect, FaultSpec, Scope, FAULTS};
    let candidates = FAULTS.iter().filter(|f| {
        matches!(f.expect, Some(Expect::At(_, stage)) if stage == at.stage)
            && (f.scope == Scope::Global) == at.layer.is_none()
    });
    let mut out = Vec::new();
    let under_test = pair.fault();
    for info in candidates {
        pair.set_fault(FaultSpec { fault: info.fault, layer: at.layer })?;
        let layers = at.layer.map(|l| vec![l]);
        let replayed = pair.ours(reference, layers, true);
        let replayed = replayed?;
        let Some(model_out) = replayed.get(&at) else { continue };
        let figure = match crate::metrics::compare(at.stage, eut, model_out) {
            Ok(m) => m.row_rel_l2_max,
            Err(_) => f64::INFINITY,
        };
        out.push(Hypothesis {
            claim: format!("{}: {}", info.name, info.models),
            test: "worst-row rel-L2 of yours against the replay of this bug".into(),
            figure,
            holds: figure <= gate,
        });
    }
    pair.set_fault(under_test)?;
    Ok(out)
}

/// The diagnosis at a report's first failing stage: pattern tests on the
/// two tensors, plus the what-if replay when our engine is at hand (`pair`;
/// `parity diff` of dumps has none). `None` when nothing diverged.
pub fn diagnose(
    pair: Option<&mut crate::session::Pair>,
    reference: &capture::Capture,
    ours: &capture::Capture,
    report: &crate::diff::DiffReport,
) -> anyhow::Result<Option<Diagnosis>> {
    let Some(i) = report.first_divergence else { return Ok(None) };
    let row = &report.rows[i];
    let (Some(r), Some(o)) = (reference.get(&row.id), ours.get(&row.id)) else { return Ok(None) };
    let gate = match row.metric {
        crate::thresholds::GateMetric::RowRelL2 => row.threshold.unwrap_or(1e-4),
        // A max-abs gate says nothing relative: use the built-in teacher-forced one.
        crate::thresholds::GateMetric::MaxAbs => 1e-4,
    };
    let (mut hypotheses, evidence) = patterns(row.id.stage, o, r, gate, reference.config.head_dim.max(1));
    let mut attribution = None;
    if let Some(pair) = pair {
        hypotheses.extend(replay(pair, reference, row.id, o, gate)?);
        attribution = attribute(pair, reference, ours, row.id, row.metrics.row_rel_l2_max)?;
    }
    let mut d = Diagnosis { at: row.id, hypotheses, evidence, attribution };
    d.sort();
    Ok(Some(d))
}

/// Attribution: the stage recomputed by our engine (with the fault it
/// carries) in exact numerics, teacher-forced, against the same in ggml
/// numerics: how far ggml's rounding alone moves this stage, set beside the
/// divergence (`observed`, worst-row rel-L2). `None` in exact numerics.
/// `under_test` is reused as the ggml side when it is that very pass (our
/// engine, teacher-forced, ggml numerics): no need to run it again.
fn attribute(
    pair: &mut crate::session::Pair,
    reference: &capture::Capture,
    under_test: &capture::Capture,
    at: StageId,
    observed: f64,
) -> anyhow::Result<Option<String>> {
    use engine::numerics::Numerics;
    if pair.ours.numerics() != Numerics::Ggml {
        return Ok(None);
    }
    let layers = at.layer.map(|l| vec![l]);
    let same_pass = under_test.engine.starts_with("ours-")
        && under_test.config.fed == "teacher-forced"
        && under_test.config.numerics == Numerics::Ggml.name();
    let rerun;
    let ggml = if same_pass {
        under_test
    } else {
        rerun = pair.ours(reference, layers.clone(), true)?;
        &rerun
    };
    pair.ours.set_numerics(Numerics::Exact);
    let exact = pair.ours(reference, layers, true);
    pair.ours.set_numerics(Numerics::Ggml);
    let exact = exact?;
    let (Some(g), Some(e)) = (ggml.get(&at), exact.get(&at)) else { return Ok(None) };
    let rounding = crate::metrics::compare(at.stage, e, g).map(|m| m.row_rel_l2_max).unwrap_or(f64::NAN);
    Ok(Some(format!(
        "attribution: ggml's rounding moves {at} by {rounding:.1e} (worst-row rel-L2, our engine exact vs ggml numerics); the divergence is {observed:.1e}, {} what rounding explains",
        if rounding > 0.0 { format!("{:.1e}x", observed / rounding) } else { "beyond".to_string() }
    )))
}
