//! Pattern tests: what the difference between the engine under test's
//! tensor and the reference's looks like at the divergent stage, each test a
//! model of a bug class that predicts ours from the reference's tensors (and
//! the model's weights, when at hand), with the figure that says how well it
//! predicts. They need no engine, so they serve `parity diff` of any dump.
//!
//! A test holds when its prediction explains the divergence: its worst-row
//! rel-L2 against ours is within the stage's gate, or under a twentieth of
//! the divergence itself (a free-running dump carries its own noise on top
//! of the bug).

use super::{Hypothesis, Kind};
use crate::diff::DiffReport;
use crate::metrics::compare;
use capture::{causal_keys, Capture, Dims, Layout, Stage, StageId, Tensor};
use gguf::GgufFile;

/// The fault-catalogue names some pattern test can name: the faults whose
/// bug class has a test (`parity selftest` scores the pattern tests alone on
/// these).
pub const NAMED_BY_PATTERNS: &[&str] = &[
    "rms-eps",
    "norm-weight-swapped",
    "no-qkv-bias",
    "rope-adjacent",
    "rope-base",
    "rope-pos-offset",
    "rope-decode-pos",
    "gqa-modulo",
    "kv-offset",
    "kv-len-short",
    "no-attn-scale",
    "mask-missing",
    "mask-off-by-one",
    "residual-dropped",
    "residual-wrong-input",
    "final-norm-skipped",
];

/// Everything the tests look at: the divergent stage's two tensors, the
/// reference's whole capture (other stages, other steps), the report (which
/// stages passed) and the model's weights when a model was given.
pub struct Subject<'a> {
    pub at: StageId,
    pub ours: &'a Tensor,
    pub reference: &'a Tensor,
    pub reference_capture: &'a Capture,
    pub report: &'a DiffReport,
    /// The stage's gate (worst-row rel-L2).
    pub gate: f64,
    /// The divergence: worst-row rel-L2 of ours against the reference.
    pub observed: f64,
    pub dims: Dims,
    pub weights: Option<&'a GgufFile>,
}

impl Subject<'_> {
    /// How close a prediction must come to ours to explain the divergence.
    fn explains(&self, residual: f64) -> bool {
        residual <= self.gate.max(0.05 * self.observed)
    }

    /// Worst-row rel-L2 of ours against `predicted` (the gate's metric).
    fn residual(&self, predicted: &Tensor) -> f64 {
        compare(self.at.stage, self.ours, predicted).map_or(f64::INFINITY, |m| if m.non_finite > 0 { f64::INFINITY } else { m.row_rel_l2_max })
    }

    fn width(&self) -> usize {
        self.at.stage.layout().row_width(&self.ours.shape).max(1)
    }

    fn rows(&self) -> usize {
        self.ours.data.len() / self.width()
    }

    /// A tensor of the reference capture at this step: another stage of the
    /// same layer, or a global one.
    fn reference_stage(&self, stage: Stage, layer: Option<usize>) -> Option<&Tensor> {
        let id = match layer {
            Some(l) => StageId::layer(self.at.step, l, stage),
            None => StageId::global(self.at.step, stage),
        };
        self.reference_capture.get(&id)
    }

    /// A weight vector of the model, dequantized.
    fn weight(&self, name: &str) -> Option<Vec<f32>> {
        self.weights?.dequantize(name).ok()
    }
}

fn hypothesis(claim: String, test: &str, figure: f64, holds: bool, explains: &[&'static str]) -> Hypothesis {
    Hypothesis { claim, test: test.to_string(), figure, holds, kind: Kind::Pattern, explains: explains.to_vec() }
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

/// Every pattern test that applies to the subject's stage.
pub fn run_all(s: &Subject) -> Vec<Hypothesis> {
    if let Some(h) = non_finite(s) {
        return vec![h];
    }
    let mut out = Vec::new();
    out.extend(saturated(s));
    out.extend(scale(s));
    out.extend(row_scale(s));
    out.extend(channel_scale(s));
    out.extend(channel_offset(s));
    out.extend(equals_another_stage(s));
    out.extend(rotation(s));
    out.extend(head_map(s));
    out.extend(causal_leak(s));
    out.extend(softmax_temperature(s));
    out.extend(decode_only(s));
    out.extend(position_structure(s));
    out.extend(rearranged(s));
    out
}

/// NaN or Inf in our tensor, and where the first one is.
fn non_finite(s: &Subject) -> Option<Hypothesis> {
    let n_bad = s.ours.data.iter().filter(|v| !v.is_finite()).count();
    if n_bad == 0 {
        return None;
    }
    let first = s.ours.data.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Some(hypothesis(
        format!("NaN/Inf in our tensor: {n_bad} values, the first at {}", coords(s.at.stage, &s.ours.shape, first)),
        "count of non-finite values",
        n_bad as f64,
        true,
        &[],
    ))
}

/// Values pinned at f16's largest magnitude: a conversion that saturates.
fn saturated(s: &Subject) -> Option<Hypothesis> {
    const F16_MAX: f32 = 65504.0;
    let pinned = s.ours.data.iter().filter(|v| v.abs() == F16_MAX).count();
    let in_reference = s.reference.data.iter().filter(|v| v.abs() >= F16_MAX).count();
    (pinned > 0 && in_reference == 0).then(|| {
        hypothesis(
            format!("{pinned} values pinned at +-65504, f16's largest (the reference has none that large): an f16 conversion that saturates or overflows"),
            "count of values equal to +-65504",
            pinned as f64,
            true,
            &[],
        )
    })
}

/// Known constants a scale bug multiplies by, for naming a fitted scale.
pub(super) fn name_scale(c: f64, head_dim: usize) -> Option<&'static str> {
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
    known.iter().find(|(k, _)| ((c - k) / k).abs() < 1e-2).map(|(_, n)| *n)
}

/// One factor for the whole tensor: ours = c x reference.
fn scale(s: &Subject) -> Option<Hypothesis> {
    let (dot, rr) = s.ours.data.iter().zip(&s.reference.data).fold((0f64, 0f64), |(d, r), (&a, &b)| (d + a as f64 * b as f64, r + (b as f64).powi(2)));
    if rr == 0.0 {
        return None;
    }
    let c = dot / rr;
    let predicted = Tensor::new(s.reference.shape.clone(), s.reference.data.iter().map(|&b| (c * b as f64) as f32).collect());
    let fit = s.residual(&predicted);
    let named = name_scale(c, s.dims.head_dim);
    Some(hypothesis(
        format!("ours = {c:.6} x reference{}", named.map_or(String::new(), |n| format!(" ({n})"))),
        "worst-row rel-L2 of ours against c x reference, c fitted",
        fit,
        s.explains(fit) && (c - 1.0).abs() > 1e-3,
        &[],
    ))
}

/// Each token's row scaled by its own factor: what a normalization with the
/// wrong eps, or the mean instead of the mean square, does.
fn row_scale(s: &Subject) -> Option<Hypothesis> {
    let layout = s.at.stage.layout();
    if !matches!(layout, Layout::Hidden | Layout::Ffn) || s.rows() < 2 {
        return None;
    }
    let width = s.width();
    let mut factors = Vec::new();
    let mut predicted = Vec::with_capacity(s.reference.data.len());
    for (o, r) in s.ours.data.chunks(width).zip(s.reference.data.chunks(width)) {
        let (dot, rr) = o.iter().zip(r).fold((0f64, 0f64), |(d, n), (&a, &b)| (d + a as f64 * b as f64, n + (b as f64).powi(2)));
        let c = if rr > 0.0 { dot / rr } else { 1.0 };
        factors.push(c);
        predicted.extend(r.iter().map(|&b| (c * b as f64) as f32));
    }
    let fit = s.residual(&Tensor::new(s.reference.shape.clone(), predicted));
    let (lo, hi) = factors.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &c| (l.min(c), h.max(c)));
    // One factor for every row is `scale`'s claim, not this one.
    let varies = (hi - lo) > 1e-4 * hi.abs().max(1e-30);
    let is_norm = matches!(s.at.stage, Stage::AttnNorm | Stage::FfnNorm | Stage::FinalNorm);
    let explains: &[&str] = if is_norm { &["rms-eps"] } else { &[] };
    Some(hypothesis(
        format!(
            "each token's row is the reference's times its own factor ({lo:.6} .. {hi:.6}){}",
            if is_norm { ": the normalization's divisor is off (RMSNorm eps, or the mean instead of the mean square)" } else { "" }
        ),
        "worst-row rel-L2 of ours against c_t x reference row t, c_t fitted per row",
        fit,
        s.explains(fit) && varies,
        explains,
    ))
}

/// One factor per channel, the same for every token: a scale vector mixed
/// up (a norm multiplied by another norm's weight). With the model at hand
/// the factors are matched against ratios of the model's norm weights.
fn channel_scale(s: &Subject) -> Option<Hypothesis> {
    if s.at.stage.layout() != Layout::Hidden || s.rows() < 2 {
        return None;
    }
    let width = s.width();
    let (mut dot, mut rr) = (vec![0f64; width], vec![0f64; width]);
    for (o, r) in s.ours.data.chunks(width).zip(s.reference.data.chunks(width)) {
        for c in 0..width {
            dot[c] += o[c] as f64 * r[c] as f64;
            rr[c] += (r[c] as f64).powi(2);
        }
    }
    let factor: Vec<f64> = dot.iter().zip(&rr).map(|(&d, &r)| if r > 0.0 { d / r } else { 1.0 }).collect();
    let predicted: Vec<f32> = s.reference.data.iter().enumerate().map(|(i, &b)| (factor[i % width] * b as f64) as f32).collect();
    let fit = s.residual(&Tensor::new(s.reference.shape.clone(), predicted));
    let (lo, hi) = factor.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &c| (l.min(c), h.max(c)));
    if !(s.explains(fit) && (hi - lo) > 1e-3 * hi.abs().max(1e-30)) {
        return Some(hypothesis(
            "one factor per channel, the same for every token (a scale vector mixed up)".into(),
            "worst-row rel-L2 of ours against f_c x reference, f_c fitted per channel",
            fit,
            false,
            &[],
        ));
    }
    // Which weights' ratio the factors are, when the model is at hand.
    let norms = norm_weight_names(s);
    let mut best: Option<(f64, String)> = None;
    for a in &norms {
        for b in &norms {
            let (Some(wa), Some(wb)) = (s.weight(a), s.weight(b)) else { continue };
            if a == b || wa.len() != width || wb.len() != width {
                continue;
            }
            // Weighted by the channel's energy: a near-zero channel's factor means nothing.
            let (mut d2, mut n2) = (0f64, 0f64);
            for c in 0..width {
                let ratio = wa[c] as f64 / wb[c] as f64;
                if ratio.is_finite() {
                    d2 += rr[c] * (factor[c] - ratio).powi(2);
                    n2 += rr[c] * ratio.powi(2);
                }
            }
            let fit = if n2 > 0.0 { (d2 / n2).sqrt() } else { f64::INFINITY };
            if best.as_ref().is_none_or(|(f, _)| fit < *f) {
                best = Some((fit, format!("{a} / {b}")));
            }
        }
    }
    let named = best.filter(|(f, _)| *f < 1e-2);
    Some(hypothesis(
        match &named {
            Some((f, ratio)) => format!("ours / reference per channel = {ratio} (rel-L2 {f:.1e}), the same for every token: the norm multiplied by another norm's weight"),
            None => format!("one factor per channel ({lo:.4} .. {hi:.4}), the same for every token: a scale vector (a norm weight) mixed up"),
        },
        "worst-row rel-L2 of ours against f_c x reference, f_c fitted per channel",
        fit,
        true,
        if named.is_some() || matches!(s.at.stage, Stage::AttnNorm | Stage::FfnNorm) { &["norm-weight-swapped"] } else { &[] },
    ))
}

/// The model's norm weights that could stand in for this stage's.
fn norm_weight_names(s: &Subject) -> Vec<String> {
    let mut names = vec!["output_norm.weight".to_string()];
    if let Some(l) = s.at.layer {
        names.push(format!("blk.{l}.attn_norm.weight"));
        names.push(format!("blk.{l}.ffn_norm.weight"));
    }
    names
}

/// The same difference row for every token: a bias missing (the difference
/// is -bias) or added twice (+bias). With the model at hand the row is
/// matched against the layer's bias vectors.
fn channel_offset(s: &Subject) -> Option<Hypothesis> {
    let layout = s.at.stage.layout();
    if s.rows() < 2 || layout == Layout::Attention || layout == Layout::Vocab {
        return None;
    }
    let width = s.width();
    let rows = s.rows();
    let mut mean = vec![0f64; width];
    for (o, r) in s.ours.data.chunks(width).zip(s.reference.data.chunks(width)) {
        for c in 0..width {
            mean[c] += (o[c] as f64 - r[c] as f64) / rows as f64;
        }
    }
    let predicted: Vec<f32> = s.reference.data.iter().enumerate().map(|(i, &b)| (b as f64 + mean[i % width]) as f32).collect();
    let fit = s.residual(&Tensor::new(s.reference.shape.clone(), predicted));
    let holds = s.explains(fit);
    let offset: Vec<f32> = mean.iter().map(|&x| x as f32).collect();
    let mut named: Option<(f64, String, &str)> = None;
    if holds {
        if let Some(l) = s.at.layer {
            for tensor in ["attn_q.bias", "attn_k.bias", "attn_v.bias"] {
                let name = format!("blk.{l}.{tensor}");
                let Some(bias) = s.weight(&name).filter(|b| b.len() == width) else { continue };
                let negated: Vec<f32> = bias.iter().map(|x| -x).collect();
                for (sign, reference, what) in [("-", &negated, "dropped"), ("+", &bias, "added twice")] {
                    let f = rel_l2(&offset, reference);
                    if f < 1e-2 && named.as_ref().is_none_or(|(g, ..)| f < *g) {
                        named = Some((f, format!("{sign}{name}"), what));
                    }
                }
            }
        }
    }
    Some(hypothesis(
        match &named {
            Some((f, sign_name, what)) => format!("a constant offset per channel equal to {sign_name} (rel-L2 {f:.1e}): the bias was {what}"),
            None => "a constant offset per channel, the same for every token (a bias missing or added twice)".into(),
        },
        "worst-row rel-L2 of ours against reference + the mean difference row",
        fit,
        holds,
        if named.is_some() || matches!(s.at.stage, Stage::QProj | Stage::KProj | Stage::VProj) { &["no-qkv-bias"] } else { &[] },
    ))
}

/// Ours equals another tensor of the reference (the stage's input: an op
/// skipped), or ours - reference equals +-another (an add with the wrong
/// operand). Candidates: the stages of this layer and step with the same
/// shape, and the layer's input.
fn equals_another_stage(s: &Subject) -> Vec<Hypothesis> {
    let mut candidates: Vec<(String, Stage, &Tensor)> = Vec::new();
    let same_layer = Stage::all().filter(|st| st.is_global() == s.at.layer.is_none() && *st != s.at.stage);
    for st in same_layer {
        if let Some(t) = s.reference_stage(st, s.at.layer).filter(|t| t.shape == s.ours.shape) {
            candidates.push((st.name().to_string(), st, t));
        }
    }
    // The layer's input (or, for final_norm, the last layer's output).
    let input = match s.at.layer {
        Some(0) => s.reference_stage(Stage::Embed, None).map(|t| ("the layer input (embed)".to_string(), t)),
        Some(l) => s.reference_stage(Stage::LayerOut, Some(l - 1)).map(|t| (format!("the layer input (layer {} layer_out)", l - 1), t)),
        None => s.dims.n_layer.checked_sub(1).and_then(|last| s.reference_stage(Stage::LayerOut, Some(last))).map(|t| ("the last layer's layer_out".to_string(), t)),
    };
    if let Some((name, t)) = input.filter(|(_, t)| t.shape == s.ours.shape) {
        candidates.push((name, Stage::LayerOut, t));
    }
    let difference: Vec<f32> = s.ours.data.iter().zip(&s.reference.data).map(|(a, b)| a - b).collect();
    let mut best_equal: Option<(f64, String, Stage)> = None;
    let mut best_difference: Option<(f64, String, &'static str, Stage)> = None;
    for (name, stage, t) in &candidates {
        let f = s.residual(t);
        if best_equal.as_ref().is_none_or(|(g, ..)| f < *g) {
            best_equal = Some((f, name.clone(), *stage));
        }
        for (sign, factor) in [("+", 1f32), ("-", -1f32)] {
            let signed: Vec<f32> = t.data.iter().map(|x| factor * x).collect();
            let f = rel_l2(&difference, &signed);
            if best_difference.as_ref().is_none_or(|(g, ..)| f < *g) {
                best_difference = Some((f, name.clone(), sign, *stage));
            }
        }
    }
    let mut out = Vec::new();
    if let Some((f, name, stage)) = best_equal {
        let explains: &[&str] = match (s.at.stage, stage) {
            (Stage::AttnResidual, Stage::AttnOut) => &["residual-dropped"],
            (Stage::FinalNorm, Stage::LayerOut) => &["final-norm-skipped"],
            _ => &[],
        };
        out.push(hypothesis(
            format!("ours equals the reference's {name}: this op's work was skipped, or it read the wrong operand"),
            "worst-row rel-L2 of ours against the other tensor",
            f,
            s.explains(f),
            explains,
        ));
    }
    if let Some((f, name, sign, stage)) = best_difference {
        let explains: &[&str] = match (s.at.stage, stage, sign) {
            (Stage::LayerOut, Stage::AttnOut, "-") => &["residual-wrong-input"],
            _ => &[],
        };
        out.push(hypothesis(
            format!("ours - reference = {sign}{name}: an add with the wrong operand (or one added twice, or dropped)"),
            "rel-L2 of the difference against the other tensor",
            f,
            f <= 0.05,
            explains,
        ));
    }
    out
}

/// RoPE bugs turn each head vector without changing its length. Which
/// tokens and which frequency pairs stay exact tells position, base and
/// pairing apart: at position 0 every rotation is the identity, and the
/// first frequency (theta_0 = 1) does not depend on the base.
fn rotation(s: &Subject) -> Option<Hypothesis> {
    let layout = s.at.stage.layout();
    if !matches!(layout, Layout::QHeads | Layout::KvHeads) {
        return None;
    }
    let hd = s.dims.head_dim.max(1);
    let (o, r) = (&s.ours.data, &s.reference.data);
    let n_vec = o.len() / hd;
    let (mut d2, mut n2) = (0f64, 0f64);
    for v in 0..n_vec {
        let norm = |x: &[f32]| x[v * hd..(v + 1) * hd].iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
        let (no, nr) = (norm(o), norm(r));
        d2 += (no - nr).powi(2);
        n2 += nr * nr;
    }
    let length_change = if n2 > 0.0 { (d2 / n2).sqrt() } else { 0.0 };
    let holds = s.explains(length_change) && s.observed > s.gate;
    let rotary = matches!(s.at.stage, Stage::QRope | Stage::KRope);
    if !holds {
        return Some(hypothesis(
            "each head vector keeps its length and turns: a rotation bug (RoPE)".into(),
            "rel-L2 of the head vectors' lengths, ours against the reference",
            length_change,
            false,
            &[],
        ));
    }
    let width = s.width();
    let rows = s.rows();
    let row_exact = |t: usize| s.explains(rel_l2(&o[t * width..(t + 1) * width], &r[t * width..(t + 1) * width]));
    // NEOX pair 0: dims 0 and head_dim/2 of every head, over every token.
    let (mut p_o, mut p_r) = (Vec::new(), Vec::new());
    for v in 0..n_vec {
        for d in [0, hd / 2] {
            p_o.push(o[v * hd + d]);
            p_r.push(r[v * hd + d]);
        }
    }
    let first_pair_exact = s.explains(rel_l2(&p_o, &p_r));
    let decode = s.at.step > 0;
    let (why, explains): (String, &[&str]) = if !rotary {
        ("".into(), &[])
    } else if decode && prefill_passed(s) {
        (": only the decode step turns (the position of the new token)".into(), &["rope-decode-pos"])
    } else if !row_exact(0) {
        (": token 0 is turned too, so the positions are off (position 0 must be the identity)".into(), &["rope-pos-offset"])
    } else if first_pair_exact {
        (": token 0 and the first frequency pair are exact, the higher pairs turn: the base (rope_freq_base) is wrong".into(), &["rope-base"])
    } else {
        (": token 0 is exact and even the first frequency pair turns: the dimensions are paired wrongly (adjacent vs NEOX halves)".into(), &["rope-adjacent"])
    };
    let exact_rows = (0..rows).filter(|&t| row_exact(t)).count();
    Some(hypothesis(
        format!("each head vector keeps its length and turns{why} ({exact_rows} of {rows} token rows exact)"),
        "rel-L2 of the head vectors' lengths, ours against the reference",
        length_change,
        true,
        explains,
    ))
}

/// Whether the report compared this stage at the prefill and every such
/// row passed.
fn prefill_passed(s: &Subject) -> bool {
    let prefill: Vec<_> = s.report.rows.iter().filter(|r| r.id.step == 0 && r.id.stage == s.at.stage).collect();
    !prefill.is_empty() && prefill.iter().all(|r| r.pass)
}

/// The reference's K or V rows of one layer for every cache position up to
/// this step's last (prefill rows, then one per decode step), rounded as
/// the cache stores them: `[n_kv, n_head_kv, head_dim]` flattened.
fn cache_rows(s: &Subject, stage: Stage, layer: usize) -> Option<Vec<f32>> {
    let mut out = Vec::new();
    for step in 0..=s.at.step {
        out.extend_from_slice(&s.reference_capture.get(&StageId::layer(step, layer, stage))?.data);
    }
    if s.reference_capture.config.kv_type == "f16" {
        out.iter_mut().for_each(|x| *x = half::f16::from_f32(*x).to_f32());
    }
    Some(out)
}

/// Which KV head each query head reads: attn_scores (Q·K^T) and attn_ctx
/// (probs·V) recomputed from the reference's own Q, K, probs and V for
/// every (q head, KV head) pairing, and the best pairing per q head found.
fn head_map(s: &Subject) -> Option<Hypothesis> {
    let layer = s.at.layer?;
    let d = &s.dims;
    let (n_head, n_kv_head, hd) = (d.n_head, d.n_head_kv, d.head_dim);
    if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
        return None;
    }
    let group = n_head / n_kv_head;
    // predicted(h, j): ours' head-h block as if q head h read KV head j.
    let predict: Box<dyn Fn(usize, usize) -> Vec<f32>> = match s.at.stage {
        Stage::AttnScores => {
            let [_, n_t, n_kv] = s.ours.shape[..] else { return None };
            let q = s.reference_stage(Stage::QRope, Some(layer))?.data.clone();
            let k = cache_rows(s, Stage::KRope, layer)?;
            if q.len() != n_t * n_head * hd || k.len() != n_kv * n_kv_head * hd {
                return None;
            }
            let round_q = s.reference_capture.config.kv_type == "f16";
            Box::new(move |h, j| {
                let mut out = vec![0f32; n_t * n_kv];
                for t in 0..n_t {
                    let qv: Vec<f64> = (0..hd).map(|e| {
                        let x = q[(t * n_head + h) * hd + e];
                        (if round_q { half::f16::from_f32(x).to_f32() } else { x }) as f64
                    }).collect();
                    for key in 0..causal_keys(n_t, n_kv, t) {
                        let kv = &k[(key * n_kv_head + j) * hd..(key * n_kv_head + j + 1) * hd];
                        out[t * n_kv + key] = qv.iter().zip(kv).map(|(a, &b)| a * b as f64).sum::<f64>() as f32;
                    }
                }
                out
            })
        }
        Stage::AttnCtx => {
            let probs = s.reference_stage(Stage::AttnProbs, Some(layer))?.clone();
            let [_, n_t, n_kv] = probs.shape[..] else { return None };
            let v = cache_rows(s, Stage::VProj, layer)?;
            if v.len() != n_kv * n_kv_head * hd {
                return None;
            }
            Box::new(move |h, j| {
                let mut out = vec![0f32; n_t * hd];
                for t in 0..n_t {
                    let p = &probs.data[(h * n_t + t) * n_kv..(h * n_t + t + 1) * n_kv];
                    for e in 0..hd {
                        out[t * hd + e] = (0..n_kv).map(|key| p[key] as f64 * v[(key * n_kv_head + j) * hd + e] as f64).sum::<f64>() as f32;
                    }
                }
                out
            })
        }
        _ => return None,
    };
    // Ours' block of head h, in the same order as `predict`.
    let ours_block = |h: usize| -> Vec<f32> {
        match s.at.stage {
            Stage::AttnScores => {
                let n = s.ours.data.len() / n_head;
                let mut block = s.ours.data[h * n..(h + 1) * n].to_vec();
                let [_, n_t, n_kv] = s.ours.shape[..] else { return block };
                for (t, row) in block.chunks_mut(n_kv).enumerate() {
                    row[causal_keys(n_t, n_kv, t)..].iter_mut().for_each(|x| *x = 0.0);
                }
                block
            }
            _ => s.ours.data.chunks(hd).skip(h).step_by(n_head).flatten().copied().collect(),
        }
    };
    let mut reads = Vec::with_capacity(n_head);
    let mut worst_fit = 0f64;
    for h in 0..n_head {
        let mine = ours_block(h);
        let (fit, j) = (0..n_kv_head).map(|j| (rel_l2(&mine, &predict(h, j)), j)).min_by(|a, b| a.0.total_cmp(&b.0))?;
        worst_fit = worst_fit.max(fit);
        reads.push(j);
    }
    let moved: Vec<String> = (0..n_head).filter(|&h| reads[h] != h / group).map(|h| format!("q head {h} reads KV head {}, expected {}", reads[h], h / group)).collect();
    let fits = s.explains(worst_fit);
    let modulo = (0..n_head).all(|h| reads[h] == h % n_kv_head);
    Some(hypothesis(
        if moved.is_empty() {
            "the query heads read other KV heads (a GQA head map)".into()
        } else {
            format!(
                "{} of {n_head} query heads read another KV head{}: {}",
                moved.len(),
                if modulo { " (the map is h % n_head_kv, expected h / (n_head / n_head_kv))" } else { "" },
                moved.iter().take(4).cloned().collect::<Vec<_>>().join("; ")
            )
        },
        "worst rel-L2 over q heads of ours against the head recomputed from the reference's Q/K (or probs/V) with the best-fitting KV head",
        worst_fit,
        fits && !moved.is_empty(),
        if modulo && !moved.is_empty() { &["gqa-modulo"] } else { &[] },
    ))
}

/// Weight on positions a query may not see: a mask missing, or off by one.
fn causal_leak(s: &Subject) -> Option<Hypothesis> {
    if s.at.stage != Stage::AttnProbs {
        return None;
    }
    let [_, n_t, n_kv] = s.ours.shape[..] else { return None };
    let (mut leaked, mut reach, mut rows) = (0f64, 0usize, 0usize);
    for (i, row) in s.ours.data.chunks(n_kv).enumerate() {
        let limit = causal_keys(n_t, n_kv, i % n_t);
        let mass: f64 = row[limit..].iter().map(|&p| p as f64).sum();
        if mass > 1e-6 {
            rows += 1;
            leaked = leaked.max(mass);
            let last = row[limit..].iter().rposition(|&p| p > 1e-6).map_or(0, |k| k + 1);
            reach = reach.max(last);
        }
    }
    if rows == 0 {
        return Some(hypothesis("future positions receive weight (the causal mask)".into(), "largest weight on positions past the query's", 0.0, false, &[]));
    }
    let (why, explains): (String, &[&str]) = if reach == 1 {
        ("each query also sees the next position: the causal mask is off by one".into(), &["mask-off-by-one"])
    } else {
        (format!("queries see up to {reach} positions ahead: the causal mask is missing"), &["mask-missing"])
    };
    Some(hypothesis(
        format!("{why} ({rows} query rows put up to {leaked:.3} of their weight past their own position)"),
        "largest weight on positions past the query's",
        leaked,
        true,
        explains,
    ))
}

/// Ours = softmax(c x the reference's logits): the scale in front of the
/// softmax is off by c. On each row's causal part, log(ours) is fitted as
/// c log(reference) + a constant.
fn softmax_temperature(s: &Subject) -> Option<Hypothesis> {
    if s.at.stage != Stage::AttnProbs {
        return None;
    }
    let [_, n_t, n_kv] = s.ours.shape[..] else { return None };
    let mut slopes = Vec::new();
    for (i, (o, r)) in s.ours.data.chunks(n_kv).zip(s.reference.data.chunks(n_kv)).enumerate() {
        let limit = causal_keys(n_t, n_kv, i % n_t);
        let pts: Vec<(f64, f64)> = o[..limit].iter().zip(&r[..limit]).filter(|&(&a, &b)| a > 1e-20 && b > 1e-20).map(|(&a, &b)| ((b as f64).ln(), (a as f64).ln())).collect();
        if pts.len() < 3 {
            continue;
        }
        let n = pts.len() as f64;
        let (mx, my) = (pts.iter().map(|p| p.0).sum::<f64>() / n, pts.iter().map(|p| p.1).sum::<f64>() / n);
        let (sxy, sxx) = pts.iter().fold((0f64, 0f64), |(a, b), p| (a + (p.0 - mx) * (p.1 - my), b + (p.0 - mx).powi(2)));
        if sxx > 1e-12 {
            slopes.push(sxy / sxx);
        }
    }
    if slopes.is_empty() {
        return None;
    }
    slopes.sort_by(f64::total_cmp);
    let c = slopes[slopes.len() / 2];
    // The prediction: softmax over each row's causal part of c log(reference).
    let mut predicted = s.reference.data.clone();
    for (i, row) in predicted.chunks_mut(n_kv).enumerate() {
        let limit = causal_keys(n_t, n_kv, i % n_t);
        let logits: Vec<f64> = row[..limit].iter().map(|&p| if p > 0.0 { c * (p as f64).ln() } else { f64::NEG_INFINITY }).collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = logits.iter().map(|&z| (z - max).exp()).sum();
        for (x, z) in row[..limit].iter_mut().zip(&logits) {
            *x = ((z - max).exp() / sum) as f32;
        }
    }
    let fit = s.residual(&Tensor::new(s.reference.shape.clone(), predicted));
    let named = name_scale(c, s.dims.head_dim);
    let scale_missing = named == Some("sqrt(head_dim)");
    Some(hypothesis(
        format!(
            "ours = softmax({c:.4} x the reference's logits){}",
            match named {
                Some("sqrt(head_dim)") => " = the 1/sqrt(head_dim) scale missing".to_string(),
                Some(n) => format!(": the scale before the softmax is off by {n}"),
                None => ": the scale before the softmax is off".to_string(),
            }
        ),
        "worst-row rel-L2 of ours against softmax(c log(reference)), c fitted (median over rows)",
        fit,
        s.explains(fit) && (c - 1.0).abs() > 1e-2,
        if scale_missing { &["no-attn-scale"] } else { &[] },
    ))
}

/// The prefill passed at this stage in every layer and a decode step does
/// not: the decode path (cache write and read, the new token's position).
/// In attention, which key positions carry the error says more.
fn decode_only(s: &Subject) -> Option<Hypothesis> {
    if s.at.step == 0 || !prefill_passed(s) {
        return None;
    }
    let mut claim = format!("the prefill passed at {} in every layer and decode step {} does not: the decode path", s.at.stage, s.at.step);
    let mut explains: &[&str] = &[];
    if s.at.stage.layout() == Layout::Attention {
        let [_, n_t, n_kv] = s.ours.shape[..] else { return None };
        // Per key position: the largest error over heads and queries.
        let mut per_key = vec![0f64; n_kv];
        for (i, (o, r)) in s.ours.data.chunks(n_kv).zip(s.reference.data.chunks(n_kv)).enumerate() {
            let limit = causal_keys(n_t, n_kv, i % n_t);
            let scale = r[..limit].iter().map(|x| x.abs()).fold(0f32, f32::max).max(1e-30) as f64;
            for k in 0..limit {
                per_key[k] = per_key[k].max((o[k] as f64 - r[k] as f64).abs() / scale);
            }
        }
        let worst = per_key.iter().copied().fold(0f64, f64::max);
        let bad: Vec<usize> = (0..n_kv).filter(|&k| per_key[k] > 0.05 * worst).collect();
        if bad == [n_kv - 1] {
            claim.push_str(&format!(
                ": only the newest key (cache position {}) is wrong, the older ones are exact: the slot this token's K/V was written to, or the read length",
                n_kv - 1
            ));
            explains = &["kv-offset", "kv-len-short"];
        } else {
            claim.push_str(&format!(": {} of {n_kv} key positions wrong, first {}", bad.len(), bad.first().copied().unwrap_or(0)));
        }
    } else if matches!(s.at.stage, Stage::QRope | Stage::KRope) {
        claim.push_str(": the new token's RoPE position");
        explains = &["rope-decode-pos"];
    }
    Some(hypothesis(claim, "every prefill row of this stage passed; this decode row failed", 0.0, true, explains))
}

/// Where along the tokens the error sits: a clean prefix (a position-
/// dependent bug), or only the last row.
fn position_structure(s: &Subject) -> Option<Hypothesis> {
    let layout = s.at.stage.layout();
    let rows = s.rows();
    if rows < 2 || layout == Layout::Attention {
        return None;
    }
    let width = s.width();
    let bad: Vec<usize> = (0..rows)
        .filter(|&t| !s.explains(rel_l2(&s.ours.data[t * width..(t + 1) * width], &s.reference.data[t * width..(t + 1) * width])))
        .collect();
    let first = *bad.first()?;
    if bad == [rows - 1] {
        return Some(hypothesis(
            format!("only the last token's row ({}) differs: a path taken for the last token only", rows - 1),
            "token rows over the gate",
            1.0,
            true,
            &[],
        ));
    }
    (first > 0).then(|| {
        hypothesis(
            format!("tokens 0..{first} match and later ones do not: a position-dependent bug (RoPE position, base or pairing)"),
            "first token row over the gate",
            first as f64,
            true,
            &[],
        )
    })
}

/// The same values in another layout: a transpose of the canonical axes
/// (the values sorted agree, in place they do not), or a permutation of
/// heads.
fn rearranged(s: &Subject) -> Option<Hypothesis> {
    let mut a = s.ours.data.clone();
    let mut b = s.reference.data.clone();
    a.sort_by(f32::total_cmp);
    b.sort_by(f32::total_cmp);
    let multiset = rel_l2(&a, &b);
    if !s.explains(multiset) {
        return Some(hypothesis(
            "the same values in another layout (a transpose or a permutation)".into(),
            "rel-L2 of the sorted values",
            multiset,
            false,
            &[],
        ));
    }
    let shape = &s.reference.shape;
    let axes = s.at.stage.layout().axes();
    for perm in axis_permutations(shape.len()) {
        let moved = transpose(&s.reference.data, shape, &perm);
        let fit = rel_l2(&s.ours.data, &moved);
        if s.explains(fit) {
            let names: Vec<&str> = perm.iter().map(|&p| axes.get(p).copied().unwrap_or("?")).collect();
            return Some(hypothesis(
                format!("ours holds the reference's values laid out as [{}] (a transpose; canonical [{}])", names.join(", "), axes.join(", ")),
                "rel-L2 of ours against the reference with its axes permuted",
                fit,
                true,
                &[],
            ));
        }
    }
    if let Some(h) = head_permutation(s) {
        return Some(h);
    }
    if let Some(h) = channel_permutation(s) {
        return Some(h);
    }
    Some(hypothesis(
        "the same values as the reference in another order (no transpose or head order found)".into(),
        "rel-L2 of the sorted values",
        multiset,
        true,
        &[],
    ))
}

/// One head's values of a tensor, in a fixed order.
type HeadBlock = dyn Fn(&[f32], usize) -> Vec<f32>;

/// Ours' heads are the reference's in another order: each of our head
/// blocks matched to its best reference head.
fn head_permutation(s: &Subject) -> Option<Hypothesis> {
    let layout = s.at.stage.layout();
    let (n_heads, block_of): (usize, Box<HeadBlock>) = match layout {
        Layout::QHeads | Layout::KvHeads => {
            let [_, n_h, hd] = s.ours.shape[..] else { return None };
            (n_h, Box::new(move |x: &[f32], h| x.chunks(hd).skip(h).step_by(n_h).flatten().copied().collect()))
        }
        Layout::Attention => {
            let n_h = s.ours.shape[0];
            let n = s.ours.data.len() / n_h.max(1);
            (n_h, Box::new(move |x: &[f32], h| x[h * n..(h + 1) * n].to_vec()))
        }
        _ => return None,
    };
    let blocks: Vec<Vec<f32>> = (0..n_heads).map(|h| block_of(&s.reference.data, h)).collect();
    let mut map = Vec::new();
    let mut worst = 0f64;
    for h in 0..n_heads {
        let mine = block_of(&s.ours.data, h);
        let (fit, from) = blocks.iter().enumerate().map(|(j, b)| (rel_l2(&mine, b), j)).min_by(|a, b| a.0.total_cmp(&b.0))?;
        worst = worst.max(fit);
        map.push(from);
    }
    let moved: Vec<String> = (0..n_heads).filter(|&h| map[h] != h).map(|h| format!("our head {h} = reference head {}", map[h])).collect();
    (s.explains(worst) && !moved.is_empty()).then(|| {
        hypothesis(
            format!("the heads are in another order ({} of {n_heads} moved): {}", moved.len(), moved.iter().take(4).cloned().collect::<Vec<_>>().join("; ")),
            "worst rel-L2 of our head blocks against their best-matching reference heads",
            worst,
            true,
            &[],
        )
    })
}

/// Ours' channels (columns of a row) are the reference's in another order:
/// each of our columns matched, over the tokens, to its best reference
/// column. Needs a few rows for the columns to be told apart.
fn channel_permutation(s: &Subject) -> Option<Hypothesis> {
    let (width, rows) = (s.width(), s.rows());
    if rows < 3 || s.at.stage.layout() == Layout::Attention || width > 8192 {
        return None;
    }
    let column = |x: &[f32], c: usize| -> Vec<f32> { (0..rows).map(|t| x[t * width + c]).collect() };
    let columns: Vec<Vec<f32>> = (0..width).map(|c| column(&s.reference.data, c)).collect();
    let mut map = Vec::with_capacity(width);
    let mut worst = 0f64;
    for c in 0..width {
        let mine = column(&s.ours.data, c);
        let (fit, from) = columns.iter().enumerate().map(|(j, col)| (rel_l2(&mine, col), j)).min_by(|a, b| a.0.total_cmp(&b.0))?;
        worst = worst.max(fit);
        map.push(from);
    }
    let moved: Vec<usize> = (0..width).filter(|&c| map[c] != c).collect();
    (s.explains(worst) && !moved.is_empty()).then(|| {
        let examples: Vec<String> = moved.iter().take(4).map(|&c| format!("our channel {c} = reference channel {}", map[c])).collect();
        hypothesis(
            format!("the channels are in another order ({} of {width} moved): {}", moved.len(), examples.join("; ")),
            "worst rel-L2 of our columns against their best-matching reference columns",
            worst,
            true,
            &[],
        )
    })
}

/// Every non-identity permutation of `n` axes (n <= 3 in the catalogue).
fn axis_permutations(n: usize) -> Vec<Vec<usize>> {
    fn permute(prefix: &mut Vec<usize>, n: usize, out: &mut Vec<Vec<usize>>) {
        if prefix.len() == n {
            out.push(prefix.clone());
            return;
        }
        for a in 0..n {
            if !prefix.contains(&a) {
                prefix.push(a);
                permute(prefix, n, out);
                prefix.pop();
            }
        }
    }
    let mut out = Vec::new();
    if n <= 4 {
        permute(&mut Vec::new(), n, &mut out);
    }
    out.retain(|p| p.iter().enumerate().any(|(i, &a)| i != a));
    out
}

/// `data` of `shape` with its axes reordered as `perm` (out axis i = in
/// axis perm[i]), flattened in C order.
fn transpose(data: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let n = shape.len();
    let mut strides = vec![1usize; n];
    for i in (0..n.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let mut out = Vec::with_capacity(data.len());
    let mut index = vec![0usize; n];
    for _ in 0..data.len() {
        let src: usize = (0..n).map(|i| index[i] * strides[perm[i]]).sum();
        out.push(data[src]);
        for i in (0..n).rev() {
            index[i] += 1;
            if index[i] < out_shape[i] {
                break;
            }
            index[i] = 0;
        }
    }
    out
}

/// Where the error sits, whatever its cause: the rows (tokens, or head and
/// query for attention) over the gate, the heads and the channels that
/// carry most of the squared error.
pub fn evidence(s: &Subject) -> String {
    let width = s.width();
    let rows = s.rows();
    let per_row: Vec<f64> =
        s.ours.data.chunks(width).zip(s.reference.data.chunks(width)).map(|(a, b)| rel_l2(a, b)).collect();
    let bad: Vec<usize> = (0..rows).filter(|&t| per_row[t] > s.gate).collect();
    let Some(&first_bad) = bad.first() else { return "no row over the gate".into() };
    let worst = (0..rows).max_by(|&a, &b| per_row[a].total_cmp(&per_row[b])).unwrap_or(0);
    // A row is a token, or (attention) a head and a query.
    let row_axes = if s.at.stage.layout() == Layout::Attention { 2 } else { 1 };
    let row_name = |r: usize| coords(s.at.stage, &s.ours.shape, r * width).split(", ").take(row_axes).collect::<Vec<_>>().join(", ");
    let mut parts = vec![format!(
        "{} of {rows} rows over the gate, first {}, worst {} (rel-L2 {:.1e})",
        bad.len(),
        row_name(first_bad),
        row_name(worst),
        per_row[worst]
    )];
    // Shares of the squared error by head and by channel (column).
    let squared: Vec<f64> = s.ours.data.iter().zip(&s.reference.data).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).collect();
    let total: f64 = squared.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let share = |sums: Vec<f64>, label: &str| -> String {
        let mut ranked: Vec<(usize, f64)> = sums.into_iter().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let top: Vec<String> = ranked.iter().take(3).map(|(i, e)| format!("{label} {i} {:.0}%", 100.0 * e / total)).collect();
        top.join(", ")
    };
    let layout = s.at.stage.layout();
    let n_heads = match layout {
        Layout::QHeads | Layout::KvHeads | Layout::Attention => Some(if layout == Layout::Attention { s.ours.shape[0] } else { s.ours.shape[1] }),
        _ => None,
    };
    if let Some(n_h) = n_heads.filter(|&n| n > 1) {
        let mut by_head = vec![0f64; n_h];
        for (i, e) in squared.iter().enumerate() {
            let h = match layout {
                Layout::Attention => i / (squared.len() / n_h),
                _ => (i / s.dims.head_dim.max(1)) % n_h,
            };
            by_head[h] += e;
        }
        parts.push(format!("error by head: {}", share(by_head, "head")));
    }
    if layout != Layout::Attention {
        let mut by_channel = vec![0f64; width];
        for (i, e) in squared.iter().enumerate() {
            by_channel[i % width] += e;
        }
        parts.push(format!("by channel: {}", share(by_channel, "channel")));
    }
    parts.join("; ")
}

/// A flat index as the stage layout's named coordinates.
pub(super) fn coords(stage: Stage, shape: &[usize], flat: usize) -> String {
    let axes = stage.layout().axes();
    let mut rest = flat;
    let mut parts = Vec::new();
    for (i, &dim) in shape.iter().enumerate().rev() {
        let dim = dim.max(1);
        parts.push(format!("{} {}", axes.get(i).copied().unwrap_or("index"), rest % dim));
        rest /= dim;
    }
    parts.reverse();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_are_found_by_axis_permutation() {
        let data: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let t = transpose(&data, &[2, 3, 4], &[1, 0, 2]);
        // out[j][i][k] = in[i][j][k]
        assert_eq!(t[4], data[12]);
        assert_eq!(t[8], data[4]);
        assert_eq!(axis_permutations(3).len(), 5);
        assert_eq!(axis_permutations(2), vec![vec![1, 0]]);
    }

    #[test]
    fn coordinates_follow_the_layout() {
        assert_eq!(coords(Stage::QRope, &[3, 14, 64], 64 * 15 + 2), "token 1, head 1, dim 2");
        assert_eq!(coords(Stage::AttnScores, &[14, 5, 5], 26), "head 1, query 0, key 1");
    }
}
