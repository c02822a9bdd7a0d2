//! Drill-down of a few stages for the people investigating a divergence:
//! the worst elements with both values and where they sit (token, head,
//! position), a histogram of |ours - reference|, and the error per token and
//! per head, so that "only token 0" or "only head 5" shows at a glance.
//!
//! It needs both tensors, which exist only while the captures are in memory:
//! the verbs that hold them (`run`, `gate`, `generate` through `verdict::judge`,
//! and `diff`) call [`attach`] and the reports carry the result. The set of
//! stages is bounded ([`MAX_STAGES`]), so a long decode run does not make a
//! long report.
//!
//! NaN and Inf are never folded into a small error: an element with a
//! non-finite value on either side has an infinite difference, ranks first
//! among the worst elements, has its own histogram bin, and makes its token's
//! and head's errors infinite.

use crate::diff::DiffReport;
use capture::stage::{Layout, Stage, StageId};
use capture::{Capture, Tensor};
use serde::Serialize;

/// The worst elements kept per stage.
pub const WORST_ELEMENTS: usize = 10;
/// At most this many stages per report.
pub const MAX_STAGES: usize = 8;
/// Stages added beside the first divergence and its inputs: those nearest
/// (or furthest over) their gates.
pub const NEAREST_GATE: usize = 3;
/// The histogram's decades: [10^k, 10^(k+1)) for k in HIST_LO..HIST_HI,
/// with a bin below and one above.
pub const HIST_LO: i32 = -10;
pub const HIST_HI: i32 = 4;

#[derive(Clone, Debug, Serialize)]
pub struct Drilldown {
    pub id: StageId,
    /// Why this stage was chosen ("first divergence", "input of the first
    /// divergence", "nearest its gate", "over its gate").
    pub why: String,
    /// The canonical shape the indices refer to.
    pub shape: Vec<usize>,
    /// What each axis indexes (the stage's layout), outermost first.
    pub axes: Vec<String>,
    /// Elements compared: for `attn_scores` only the causal part.
    pub compared: usize,
    /// The largest |ours - reference| first (non-finite first of all).
    pub worst: Vec<ElementDiff>,
    pub histogram: Vec<HistogramBin>,
    /// One per token of the pass (per query for attention layouts).
    pub per_token: Vec<GroupError>,
    /// One per head, for layouts with heads; empty otherwise.
    pub per_head: Vec<GroupError>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ElementDiff {
    /// Multi-index in `shape`.
    pub index: Vec<usize>,
    /// "token 3, head 5, dim 17", from the layout's axes.
    pub coords: String,
    /// The token's row within the pass (the query for attention).
    pub token: usize,
    /// Its position in the sequence (the KV-cache slot), when known.
    pub position: Option<usize>,
    /// The token id fed at that position, when known.
    pub token_id: Option<i32>,
    pub ours: f32,
    pub reference: f32,
    /// |ours - reference|; INFINITY when either value is not finite.
    pub abs_diff: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HistogramBin {
    /// "0", "<1e-10", "1e-3..1e-2", ">=1e4", "NaN/Inf".
    pub label: String,
    pub count: usize,
}

/// The error of one token (or one head): over its elements.
#[derive(Clone, Debug, Serialize)]
pub struct GroupError {
    pub index: usize,
    /// For tokens: the position in the sequence, when known.
    pub position: Option<usize>,
    /// For tokens: the token id, when known.
    pub token_id: Option<i32>,
    /// INFINITY when a value is not finite.
    pub max_abs: f64,
    /// ||ours - ref|| / ||ref|| over the group (0 when both are zero,
    /// INFINITY when only the reference is, or a value is not finite).
    pub rel_l2: f64,
    pub non_finite: usize,
}

/// Which axis of a layout holds tokens and which holds heads.
fn token_and_head_axes(layout: Layout) -> (usize, Option<usize>) {
    match layout {
        Layout::Attention => (1, Some(0)),
        Layout::QHeads | Layout::KvHeads => (0, Some(1)),
        Layout::Hidden | Layout::Ffn | Layout::Vocab => (0, None),
    }
}

/// The bin of one |diff| (index into the bins of [`histogram_labels`]).
fn histogram_bin(abs_diff: f64) -> usize {
    let decades = (HIST_HI - HIST_LO) as usize;
    if !abs_diff.is_finite() {
        decades + 3
    } else if abs_diff == 0.0 {
        0
    } else {
        let k = abs_diff.log10().floor() as i64;
        if k < HIST_LO as i64 {
            1
        } else if k >= HIST_HI as i64 {
            decades + 2
        } else {
            2 + (k - HIST_LO as i64) as usize
        }
    }
}

fn histogram_labels() -> Vec<String> {
    let mut labels = vec!["0".to_string(), format!("<1e{HIST_LO}")];
    labels.extend((HIST_LO..HIST_HI).map(|k| format!("1e{k}..1e{}", k + 1)));
    labels.push(format!(">=1e{HIST_HI}"));
    labels.push("NaN/Inf".to_string());
    labels
}

/// Sums of one group while scanning.
#[derive(Clone, Copy, Default)]
struct Acc {
    d2: f64,
    b2: f64,
    max_abs: f64,
    non_finite: usize,
}

impl Acc {
    fn add(&mut self, ours: f32, reference: f32) {
        if !ours.is_finite() || !reference.is_finite() {
            self.non_finite += 1;
            return;
        }
        let d = ours as f64 - reference as f64;
        self.d2 += d * d;
        self.b2 += (reference as f64).powi(2);
        self.max_abs = self.max_abs.max(d.abs());
    }

    fn finish(self, index: usize, position: Option<usize>, token_id: Option<i32>) -> GroupError {
        let rel_l2 = if self.non_finite > 0 {
            f64::INFINITY
        } else if self.b2 > 0.0 {
            (self.d2 / self.b2).sqrt()
        } else if self.d2 == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        let max_abs = if self.non_finite > 0 { f64::INFINITY } else { self.max_abs };
        GroupError { index, position, token_id, max_abs, rel_l2, non_finite: self.non_finite }
    }
}

/// Where the tokens of one pass sit: the position of its first token and
/// the ids it was fed. `None` where the pass is not what the capture says.
#[derive(Clone, Debug, Default)]
pub struct PassTokens {
    pub first_position: Option<usize>,
    pub ids: Vec<i32>,
}

impl PassTokens {
    /// Step 0 (the prefill) feeds the prompt from position 0; decode step k
    /// feeds the k-th greedy token (`generated[k - 1]`) at position
    /// `n_prompt + k - 1`. Checked against the pass's token count.
    pub fn of(reference: &Capture, step: usize, n_tokens: usize) -> PassTokens {
        let (first, ids) = if step == 0 {
            (0, reference.tokens.clone())
        } else {
            (reference.tokens.len() + step - 1, reference.generated.get(step - 1).map(|&t| vec![t]).unwrap_or_default())
        };
        if ids.len() == n_tokens {
            PassTokens { first_position: Some(first), ids }
        } else {
            PassTokens::default()
        }
    }

    fn position(&self, t: usize) -> Option<usize> {
        self.first_position.map(|p| p + t)
    }

    fn id(&self, t: usize) -> Option<i32> {
        self.ids.get(t).copied()
    }
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The drill-down of one stage, or `None` when the two tensors do not fit
/// `shape` (a shape mismatch is reported elsewhere) or `shape` is not the
/// layout's rank (no axis names to give).
pub fn drill(id: StageId, why: &str, shape: &[usize], ours: &Tensor, reference: &Tensor, tokens: &PassTokens) -> Option<Drilldown> {
    let layout = id.stage.layout();
    let axes = layout.axes();
    let n: usize = shape.iter().product();
    if shape.len() != axes.len() || ours.data.len() != n || reference.data.len() != n || n == 0 {
        return None;
    }
    let (token_axis, head_axis) = token_and_head_axes(layout);
    let st = strides(shape);
    let at = |flat: usize, axis: usize| (flat / st[axis]) % shape[axis];
    // attn_scores: only the causal part is compared (the catalogue); keys
    // beyond it hold whatever an engine left there.
    let causal_only = id.stage == Stage::AttnScores;
    // Attention is [head, query, key] (the rank was checked above).
    let (n_query, n_kv) = if causal_only { (shape[1], shape[2]) } else { (0, 0) };
    if n_query > n_kv {
        return None;
    }

    let mut per_token = vec![Acc::default(); shape[token_axis]];
    let mut per_head = vec![Acc::default(); head_axis.map_or(0, |h| shape[h])];
    let mut bins = vec![0usize; histogram_labels().len()];
    // (abs diff, flat index), largest first; ties keep the lower index.
    let mut worst: Vec<(f64, usize)> = Vec::with_capacity(WORST_ELEMENTS + 1);
    let mut compared = 0usize;
    for (flat, (&a, &b)) in ours.data.iter().zip(&reference.data).enumerate() {
        if causal_only && at(flat, 2) >= capture::causal_keys(n_query, n_kv, at(flat, 1)) {
            continue;
        }
        compared += 1;
        let abs_diff = if a.is_finite() && b.is_finite() { (a as f64 - b as f64).abs() } else { f64::INFINITY };
        bins[histogram_bin(abs_diff)] += 1;
        per_token[at(flat, token_axis)].add(a, b);
        if let Some(h) = head_axis {
            per_head[at(flat, h)].add(a, b);
        }
        if worst.len() < WORST_ELEMENTS || worst.last().is_some_and(|&(w, _)| abs_diff > w) {
            let pos = worst.partition_point(|&(w, _)| w >= abs_diff);
            worst.insert(pos, (abs_diff, flat));
            worst.truncate(WORST_ELEMENTS);
        }
    }

    let worst = worst
        .into_iter()
        .map(|(abs_diff, flat)| {
            let index: Vec<usize> = (0..shape.len()).map(|axis| at(flat, axis)).collect();
            let token = index[token_axis];
            ElementDiff {
                coords: crate::metrics::coords_string(id.stage, &index),
                index,
                token,
                position: tokens.position(token),
                token_id: tokens.id(token),
                ours: ours.data[flat],
                reference: reference.data[flat],
                abs_diff,
            }
        })
        .collect();
    Some(Drilldown {
        id,
        why: why.to_string(),
        shape: shape.to_vec(),
        axes: axes.iter().map(|s| s.to_string()).collect(),
        compared,
        worst,
        histogram: histogram_labels().into_iter().zip(bins).map(|(label, count)| HistogramBin { label, count }).collect(),
        per_token: per_token.into_iter().enumerate().map(|(t, acc)| acc.finish(t, tokens.position(t), tokens.id(t))).collect(),
        per_head: per_head.into_iter().enumerate().map(|(h, acc)| acc.finish(h, None, None)).collect(),
    })
}

/// The stages worth a drill-down, with why, in the order reports show them:
/// the first divergence, the stages that feed it, then those nearest (or
/// over) their gates; when everything matches, only the latter. At most
/// [`MAX_STAGES`], each compared (a row of the report).
pub fn select(r: &DiffReport) -> Vec<(usize, &'static str)> {
    let row_of = |id: &StageId| r.rows.iter().position(|row| row.id == *id);
    let mut chosen: Vec<(usize, &'static str)> = Vec::new();
    if let Some(first) = r.first_problem_id() {
        if let Some(i) = row_of(&first) {
            chosen.push((i, "first divergence"));
        }
        for input in first.inputs(r.n_layer) {
            if let Some(i) = row_of(&input) {
                chosen.push((i, "input of the first divergence"));
            }
        }
    }
    // Nearest the gate: the largest value / threshold; a non-finite row is
    // infinitely far over it, an ungated one is not ranked.
    let mut by_margin: Vec<(f64, usize)> = r
        .rows
        .iter()
        .enumerate()
        .filter_map(|(i, row)| {
            if row.metrics.non_finite > 0 {
                Some((f64::INFINITY, i))
            } else {
                row.ratio().map(|x| (x, i))
            }
        })
        .collect();
    by_margin.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    // One per (layer, stage): the same op in every decode step would say
    // the same thing; another step's is taken only when nothing else is left.
    let place = |i: usize| (r.rows[i].id.layer, r.rows[i].id.stage);
    let mut added = 0;
    for distinct in [true, false] {
        for &(_, i) in &by_margin {
            if added == NEAREST_GATE || chosen.len() >= MAX_STAGES {
                break;
            }
            let taken = chosen.iter().any(|&(c, _)| c == i || (distinct && place(c) == place(i)));
            if !taken {
                chosen.push((i, if r.rows[i].pass { "nearest its gate" } else { "over its gate" }));
                added += 1;
            }
        }
    }
    chosen.truncate(MAX_STAGES);
    chosen
}

/// Fill `report.drilldowns` from the two captures it was made of (`ours`
/// the engine under test).
pub fn attach(report: &mut DiffReport, ours: &Capture, reference: &Capture) {
    let mut out = Vec::new();
    for (i, why) in select(report) {
        let row = &report.rows[i];
        let (Some(a), Some(b)) = (ours.get(&row.id), reference.get(&row.id)) else { continue };
        let (token_axis, _) = token_and_head_axes(row.id.stage.layout());
        let n_tokens = row.metrics.shape.get(token_axis).copied().unwrap_or(0);
        let tokens = PassTokens::of(reference, row.id.step, n_tokens);
        if let Some(d) = drill(row.id, why, &row.metrics.shape, a, b, &tokens) {
            out.push(d);
        }
    }
    report.drilldowns = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(shape: &[usize], data: Vec<f32>) -> Tensor {
        Tensor { shape: shape.to_vec(), data }
    }

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| 1.0 + i as f32).collect()
    }

    #[test]
    fn worst_elements_are_named_by_the_layout_and_ranked() {
        // q_rope [token 3, head 2, dim 4]: errors at (2, 1, 3) = 0.5 and (0, 0, 1) = 0.25.
        let shape = [3, 2, 4];
        let reference = ramp(24);
        let mut ours = reference.clone();
        ours[2 * 8 + 4 + 3] += 0.5;
        ours[1] += 0.25;
        let tokens = PassTokens { first_position: Some(0), ids: vec![11, 12, 13] };
        let d = drill(StageId::layer(0, 0, Stage::QRope), "first divergence", &shape, &tensor(&shape, ours), &tensor(&shape, reference), &tokens).unwrap();
        assert_eq!(d.compared, 24);
        assert_eq!(d.worst.len(), WORST_ELEMENTS);
        assert_eq!(d.worst[0].coords, "token 2, head 1, dim 3");
        assert_eq!(d.worst[0].index, vec![2, 1, 3]);
        assert_eq!((d.worst[0].token, d.worst[0].position, d.worst[0].token_id), (2, Some(2), Some(13)));
        assert!((d.worst[0].abs_diff - 0.5).abs() < 1e-6);
        assert_eq!(d.worst[0].reference, 24.0);
        assert_eq!(d.worst[1].coords, "token 0, head 0, dim 1");
        // The rest are exact; ties keep execution order.
        assert_eq!(d.worst[2].index, vec![0, 0, 0]);
        assert_eq!(d.worst[2].abs_diff, 0.0);
    }

    #[test]
    fn histogram_counts_decades_zero_and_non_finite() {
        let shape = [1, 6];
        let reference = vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let ours = vec![1.0, 1.5, 1.0 + 3e-3, f32::NAN, 1.0 + 3e-3, 1.0e6];
        let d = drill(StageId::layer(0, 0, Stage::AttnNorm), "x", &shape, &tensor(&shape, ours), &tensor(&shape, reference), &PassTokens::default()).unwrap();
        let count = |label: &str| d.histogram.iter().find(|b| b.label == label).unwrap().count;
        assert_eq!(count("0"), 1);
        assert_eq!(count("1e-1..1e0"), 1);
        assert_eq!(count("1e-3..1e-2"), 2);
        assert_eq!(count(">=1e4"), 1);
        assert_eq!(count("NaN/Inf"), 1);
        assert_eq!(d.histogram.iter().map(|b| b.count).sum::<usize>(), 6);
        assert_eq!(d.histogram.len(), 2 + (HIST_HI - HIST_LO) as usize + 2);
        // NaN is never a small error: it ranks first and poisons its token.
        assert_eq!(d.worst[0].coords, "token 0, dim 3");
        assert!(d.worst[0].abs_diff.is_infinite() && d.worst[0].ours.is_nan());
        assert!(d.per_token[0].rel_l2.is_infinite() && d.per_token[0].max_abs.is_infinite());
        assert_eq!(d.per_token[0].non_finite, 1);
        assert!(d.per_head.is_empty(), "a hidden-state layout has no heads");
    }

    #[test]
    fn per_head_and_per_token_errors_isolate_one_head() {
        // k_proj [token 2, kv head 3, dim 2]: only head 1 is wrong, in both tokens.
        let shape = [2, 3, 2];
        let reference = ramp(12);
        let ours: Vec<f32> = reference.iter().enumerate().map(|(i, &v)| if (i / 2) % 3 == 1 { v * 1.1 } else { v }).collect();
        let d = drill(StageId::layer(1, 4, Stage::KProj), "x", &shape, &tensor(&shape, ours), &tensor(&shape, reference), &PassTokens::default()).unwrap();
        let heads: Vec<f64> = d.per_head.iter().map(|g| g.rel_l2).collect();
        assert_eq!(heads.len(), 3);
        assert_eq!((heads[0], heads[2]), (0.0, 0.0));
        assert!((heads[1] - 0.1).abs() < 1e-6, "{heads:?}");
        assert_eq!(d.per_token.len(), 2);
        assert!(d.per_token.iter().all(|g| g.rel_l2 > 0.0 && g.position.is_none()));
    }

    #[test]
    fn attention_scores_compare_the_causal_part_per_query_and_head() {
        // [head 2, query 2, key 3] of a decode-like pass: 1 cached position,
        // query q attends keys 0..=q+1. Garbage beyond the causal limit is not compared.
        let shape = [2, 2, 3];
        let reference = ramp(12);
        let mut ours = reference.clone();
        ours[2] = 1e9; // head 0, query 0, key 2: masked
        ours[6 + 3 + 2] += 2.0; // head 1, query 1, key 2: causal
        let tokens = PassTokens { first_position: Some(1), ids: vec![7, 8] };
        let d = drill(StageId::layer(0, 0, Stage::AttnScores), "x", &shape, &tensor(&shape, ours), &tensor(&shape, reference), &tokens).unwrap();
        assert_eq!(d.compared, 10);
        assert_eq!(d.worst[0].coords, "head 1, query 1, key 2");
        assert_eq!((d.worst[0].token, d.worst[0].position, d.worst[0].token_id), (1, Some(2), Some(8)));
        assert!((d.worst[0].abs_diff - 2.0).abs() < 1e-6);
        assert_eq!(d.per_head[0].max_abs, 0.0);
        assert_eq!(d.per_token[0].max_abs, 0.0);
        assert!((d.per_token[1].max_abs - 2.0).abs() < 1e-6);
        // attn_probs: the whole tensor, a wrong mask included.
        let d = drill(StageId::layer(0, 0, Stage::AttnProbs), "x", &shape, &tensor(&shape, {
            let mut o = ramp(12);
            o[2] = 5.0;
            o
        }), &tensor(&shape, ramp(12)), &tokens).unwrap();
        assert_eq!(d.compared, 12);
        assert_eq!(d.worst[0].coords, "head 0, query 0, key 2");
    }

    #[test]
    fn tensors_that_do_not_fit_the_shape_have_no_drilldown() {
        let t = tensor(&[2, 2], vec![1.0; 4]);
        assert!(drill(StageId::layer(0, 0, Stage::AttnNorm), "x", &[2, 3], &t, &t, &PassTokens::default()).is_none());
        // Rank 1 for a [token, dim] layout: no axis names to give.
        assert!(drill(StageId::layer(0, 0, Stage::AttnNorm), "x", &[4], &t, &t, &PassTokens::default()).is_none());
    }

    #[test]
    fn pass_tokens_of_prefill_and_decode() {
        let c = Capture { tokens: vec![5, 6, 7], generated: vec![8, 9], ..Capture::default() };
        let p = PassTokens::of(&c, 0, 3);
        assert_eq!((p.position(2), p.id(2)), (Some(2), Some(7)));
        let p = PassTokens::of(&c, 2, 1);
        assert_eq!((p.position(0), p.id(0)), (Some(4), Some(9)));
        // A pass that is not what the capture says: nothing claimed.
        let p = PassTokens::of(&c, 0, 2);
        assert_eq!((p.position(0), p.id(0)), (None, None));
    }
}
