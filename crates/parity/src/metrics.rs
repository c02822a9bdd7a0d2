//! Per-stage comparison metrics between our tensor and the reference's.
//!
//! Everything accumulates in f64. A NaN or an infinity on either side is
//! counted in `non_finite` and forces `max_abs` to `f64::INFINITY`, so such a
//! stage can never pass a threshold; the other metrics are then computed over
//! the finite pairs only (they describe the rest of the tensor).

use capture::Tensor;
use capture::stage::Stage;
use serde::Serialize;

/// Two tensors of one stage that cannot be compared element by element.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("shape mismatch: ours {ours:?} ({ours_len} values) vs reference {reference:?} ({reference_len} values)")]
pub struct ShapeMismatch {
    pub ours: Vec<usize>,
    pub reference: Vec<usize>,
    pub ours_len: usize,
    pub reference_len: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct StageMetrics {
    /// Number of elements compared.
    pub n: usize,
    /// max |ours - ref|; `INFINITY` when any value on either side is not finite.
    pub max_abs: f64,
    pub mean_abs: f64,
    /// ||ours - ref|| / ||ref|| (0 when both are zero, INFINITY when only ref is zero).
    pub rel_l2: f64,
    pub cosine: f64,
    /// sum (ours - ref)^2 / sum ref^2.
    pub nmse: f64,
    /// The largest rel-L2 of one row (a token's row; for attention, one
    /// query's row over the keys); INFINITY when any value is not finite.
    pub row_rel_l2_max: f64,
    /// The median row rel-L2.
    pub row_rel_l2_median: f64,
    /// Which row is the worst, e.g. "token 3" or "head 2, query 5".
    pub worst_row: String,
    /// max |ref|: the scale of the reference.
    pub ref_max_abs: f64,
    /// NaN/Inf count on either side.
    pub non_finite: usize,
    /// The element with the largest |ours - ref| (the first non-finite one when any).
    pub worst: Option<WorstElement>,
    /// The canonical shape the indices refer to.
    pub shape: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct WorstElement {
    pub flat_index: usize,
    /// Multi-index in the canonical shape.
    pub index: Vec<usize>,
    /// e.g. "token 3, head 5, dim 17", from the stage's layout.
    pub coords: String,
    pub ours: f32,
    pub reference: f32,
}

#[derive(Clone, Debug, Serialize)]
pub struct LogitsMetrics {
    /// Rows whose argmax agrees.
    pub top1_agree: usize,
    pub rows: usize,
    /// KL(ref || ours) per token row, softmax in f64: mean and max over rows.
    pub kl_mean: f64,
    pub kl_max: f64,
}

/// Row-major multi-index of `flat` in `shape`.
pub fn unravel(flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    let mut rest = flat;
    for (i, &d) in shape.iter().enumerate().rev() {
        if d == 0 {
            continue;
        }
        index[i] = rest % d;
        rest /= d;
    }
    index
}

/// "token 3, head 5, dim 17" for `index` in the canonical layout of `stage`;
/// generic axis names when the rank is not the canonical one.
pub fn coords_string(stage: Stage, index: &[usize]) -> String {
    let names = stage.layout().axes();
    index
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if names.len() == index.len() {
                format!("{} {v}", names[i])
            } else {
                format!("axis{i} {v}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The shape to report: the one whose rank is the stage's canonical rank
/// (the reference's when both or neither are).
fn canonical_shape(stage: Stage, ours: &Tensor, reference: &Tensor) -> Vec<usize> {
    let rank = stage.layout().axes().len();
    if reference.shape.len() != rank && ours.shape.len() == rank {
        ours.shape.clone()
    } else {
        reference.shape.clone()
    }
}

fn check_comparable(ours: &Tensor, reference: &Tensor) -> Result<(), ShapeMismatch> {
    let err = || ShapeMismatch {
        ours: ours.shape.clone(),
        reference: reference.shape.clone(),
        ours_len: ours.data.len(),
        reference_len: reference.data.len(),
    };
    let ours_n: Option<usize> = ours.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let ref_n: Option<usize> = reference.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if ours_n != Some(ours.data.len()) || ref_n != Some(reference.data.len()) {
        return Err(err());
    }
    if ours.data.len() != reference.data.len() || ours.shape.first() != reference.shape.first() {
        return Err(err());
    }
    Ok(())
}

/// A row's error is measured against the larger of its own norm and this
/// fraction of the median row norm. A row far larger than the others (an
/// outlier token) is judged against itself, so it cannot set the scale for
/// every other row; a row far smaller than typical (an attention query whose
/// scores nearly cancel: q.k small next to |q||k|) is judged against the
/// typical row, or float noise would read as a huge relative error.
pub const ROW_NORM_FLOOR: f64 = 1.0;

/// Where a block of a stage's tensor sits in the whole tensor of its step.
/// A prefill compared chunk by chunk (a long prompt) arrives as one block per
/// chunk: the chunk's token rows, and for attention its queries over the
/// keys cached so far. The whole tensor is the one a single pass over the
/// prompt would have produced; the keys a chunk's queries cannot see are
/// zero on both sides there (the catalogue), so they are counted, not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Token rows before the block (cache positions filled before its chunk).
    pub row0: usize,
    /// Token rows of the whole tensor (the whole prompt).
    pub rows: usize,
}

/// One stage's comparison, accumulated block by block in f64 (any order),
/// so that a tensor never has to be held whole to be compared.
pub struct StageAccumulator {
    stage: Stage,
    /// The whole tensor's canonical shape (set by the first block).
    shape: Vec<usize>,
    /// Elements per row of the whole tensor (see `Layout::row_width`).
    width: usize,
    n: usize,
    n_finite: usize,
    non_finite: usize,
    /// (whole flat index, ours, reference) of the first non-finite element.
    first_non_finite: Option<(usize, f32, f32)>,
    /// (|ours - ref|, whole flat index, ours, reference) of the largest finite difference.
    worst_finite: Option<(f64, usize, f32, f32)>,
    sum_abs: f64,
    sum_d2: f64,
    sum_b2: f64,
    sum_a2: f64,
    dot: f64,
    ref_max_abs: f64,
    /// (|d|^2, |ref|^2) per row of the whole tensor; a row holding a
    /// non-finite value is infinitely wrong.
    row_sums: Vec<(f64, f64)>,
}

impl StageAccumulator {
    pub fn new(stage: Stage) -> StageAccumulator {
        StageAccumulator {
            stage,
            shape: Vec::new(),
            width: 1,
            n: 0,
            n_finite: 0,
            non_finite: 0,
            first_non_finite: None,
            worst_finite: None,
            sum_abs: 0.0,
            sum_d2: 0.0,
            sum_b2: 0.0,
            sum_a2: 0.0,
            dot: 0.0,
            ref_max_abs: 0.0,
            row_sums: Vec::new(),
        }
    }

    /// Add one block (`None`: the block is the whole tensor). Shapes may
    /// differ in how they split the inner dimensions (`[t, 896]` vs
    /// `[t, 14, 64]`): they are compared when the element counts and the
    /// leading dimension agree.
    pub fn add(&mut self, ours: &Tensor, reference: &Tensor, placement: Option<Placement>) -> Result<(), ShapeMismatch> {
        check_comparable(ours, reference)?;
        let mismatch = || ShapeMismatch {
            ours: ours.shape.clone(),
            reference: reference.shape.clone(),
            ours_len: ours.data.len(),
            reference_len: reference.data.len(),
        };
        let block = canonical_shape(self.stage, ours, reference);
        let attention = self.stage.layout() == capture::Layout::Attention && block.len() == 3;
        let block_rows = if attention { block[1] } else { block.first().copied().unwrap_or(1) };
        let p = placement.unwrap_or(Placement { row0: 0, rows: block_rows });
        if p.row0 + block_rows > p.rows {
            return Err(mismatch());
        }
        // The whole tensor: token rows `p.rows`; for attention the keys grow
        // with the rows (a chunk sees the keys up to its own last query).
        let whole: Vec<usize> = if attention {
            let (h, n_t, n_kv) = (block[0], block[1], block[2]);
            if placement.is_some() && n_kv < p.row0 + n_t {
                return Err(mismatch());
            }
            vec![h, p.rows, (n_kv + p.rows).saturating_sub(p.row0 + n_t)]
        } else if block.is_empty() {
            block.clone()
        } else {
            std::iter::once(p.rows).chain(block[1..].iter().copied()).collect()
        };
        if self.shape.is_empty() {
            self.width = self.stage.layout().row_width(&whole).max(1);
            let whole_len: usize = whole.iter().product();
            self.row_sums = vec![(0.0, 0.0); whole_len / self.width];
            self.shape = whole;
        } else if self.shape != whole {
            return Err(mismatch());
        }
        let width = if attention { block[2] } else { self.width };
        if width == 0 || block_rows == 0 {
            return Ok(());
        }
        // `attn_scores`: only the causal part is compared.
        let causal = attention && self.stage == Stage::AttnScores && block[1] <= block[2];
        let rows_per_token = ours.data.len() / block_rows / width;
        for (r, (a_row, b_row)) in ours.data.chunks(width).zip(reference.data.chunks(width)).enumerate() {
            let whole_row = if attention {
                let (h, t) = (r / block_rows, r % block_rows);
                h * p.rows + p.row0 + t
            } else {
                p.row0 * rows_per_token + r
            };
            let limit = if causal { capture::causal_keys(block_rows, width, r % block_rows) } else { width };
            self.add_row(whole_row, a_row, b_row, limit);
        }
        Ok(())
    }

    /// One row of a block: entries past `limit` count as zero on both sides.
    /// The whole row may be longer (attention keys past the block's own):
    /// those entries are zero on both sides.
    fn add_row(&mut self, whole_row: usize, a_row: &[f32], b_row: &[f32], limit: usize) {
        let flat0 = whole_row * self.width;
        let (mut d2, mut b2, mut bad) = (0f64, 0f64, false);
        for (i, (&a, &b)) in a_row.iter().zip(b_row).enumerate() {
            let (a, b) = if i < limit { (a, b) } else { (0.0, 0.0) };
            let flat = flat0 + i;
            if !a.is_finite() || !b.is_finite() {
                self.non_finite += 1;
                if self.first_non_finite.is_none_or(|(f, _, _)| flat < f) {
                    self.first_non_finite = Some((flat, a, b));
                }
                bad = true;
                continue;
            }
            let (x, y) = (a as f64, b as f64);
            let d = x - y;
            let ad = d.abs();
            self.n_finite += 1;
            self.sum_abs += ad;
            self.sum_d2 += d * d;
            self.sum_b2 += y * y;
            self.sum_a2 += x * x;
            self.dot += x * y;
            // The first largest difference in the whole tensor's order.
            if self.worst_finite.is_none_or(|(m, f, _, _)| ad > m || (ad == m && flat < f)) {
                self.worst_finite = Some((ad, flat, a, b));
            }
            self.ref_max_abs = self.ref_max_abs.max(y.abs());
            d2 += d * d;
            b2 += y * y;
        }
        // The keys past the block's own (zero on both sides in the whole tensor).
        let unseen = self.width.saturating_sub(a_row.len());
        self.n += a_row.len() + unseen;
        self.n_finite += unseen;
        if let Some(slot) = self.row_sums.get_mut(whole_row) {
            *slot = if bad { (f64::INFINITY, 1.0) } else { (d2, b2) };
        }
    }

    /// The metrics of everything added.
    pub fn finish(self) -> StageMetrics {
        let ratio = |num: f64, den: f64| {
            if den > 0.0 {
                num / den
            } else if num == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }
        };
        let rel_l2 = ratio(self.sum_d2.sqrt(), self.sum_b2.sqrt());
        let nmse = ratio(self.sum_d2, self.sum_b2);
        let cosine = if self.sum_a2 == 0.0 && self.sum_b2 == 0.0 {
            1.0
        } else if self.sum_a2 == 0.0 || self.sum_b2 == 0.0 {
            0.0
        } else {
            self.dot / (self.sum_a2.sqrt() * self.sum_b2.sqrt())
        };
        let mean_abs = if self.n_finite > 0 { self.sum_abs / self.n_finite as f64 } else { 0.0 };
        let worst_at = self.first_non_finite.or(self.worst_finite.map(|(_, f, a, b)| (f, a, b)));
        let worst = worst_at.map(|(flat, ours, reference)| {
            let index = unravel(flat, &self.shape);
            WorstElement { flat_index: flat, coords: coords_string(self.stage, &index), index, ours, reference }
        });
        let max_abs = if self.non_finite > 0 { f64::INFINITY } else { self.worst_finite.map_or(0.0, |w| w.0) };
        let (row_rel_l2_max, row_rel_l2_median, worst_row) = self.row_errors();
        StageMetrics {
            row_rel_l2_max,
            row_rel_l2_median,
            worst_row,
            n: self.n,
            max_abs,
            mean_abs,
            rel_l2,
            cosine,
            nmse,
            ref_max_abs: self.ref_max_abs,
            non_finite: self.non_finite,
            worst,
            shape: self.shape,
        }
    }

    /// Per-row rel-L2 over the rows of the stage's layout: (worst, median, which row).
    fn row_errors(&self) -> (f64, f64, String) {
        let mut norms: Vec<f64> = self.row_sums.iter().map(|&(_, b2)| b2.sqrt()).collect();
        norms.sort_by(f64::total_cmp);
        let floor = norms.get(norms.len() / 2).copied().unwrap_or(0.0) * ROW_NORM_FLOOR;
        let mut rows: Vec<(f64, usize)> = self
            .row_sums
            .iter()
            .enumerate()
            .map(|(r, &(d2, b2))| {
                let den = b2.sqrt().max(floor);
                let rel = if den > 0.0 { d2.sqrt() / den } else if d2 == 0.0 { 0.0 } else { f64::INFINITY };
                (rel, r)
            })
            .collect();
        if rows.is_empty() {
            return (0.0, 0.0, String::new());
        }
        let (worst, worst_r) = rows.iter().copied().max_by(|a, b| a.0.total_cmp(&b.0)).unwrap_or((0.0, 0));
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        let median = rows[rows.len() / 2].0;
        let first = unravel(worst_r * self.width, &self.shape);
        let axes = self.stage.layout().axes();
        let row_axes = if self.stage.layout() == capture::Layout::Attention { 2 } else { 1 };
        let label = first
            .iter()
            .take(row_axes.min(first.len()))
            .enumerate()
            .map(|(i, v)| format!("{} {v}", axes.get(i).copied().unwrap_or("axis")))
            .collect::<Vec<_>>()
            .join(", ");
        (if self.non_finite > 0 { f64::INFINITY } else { worst }, median, label)
    }
}

/// Compare one stage's whole tensors (see [`StageAccumulator::add`]).
/// `attn_scores` are compared on their causal part only (the catalogue):
/// entries a query may not attend to count as zero, whatever an engine left
/// there (an engine that computes them, or its mask, is judged at
/// `attn_probs`).
pub fn compare(stage: Stage, ours: &Tensor, reference: &Tensor) -> Result<StageMetrics, ShapeMismatch> {
    let mut acc = StageAccumulator::new(stage);
    acc.add(ours, reference, None)?;
    Ok(acc.finish())
}

/// log-softmax of one row in f64; `None` when a value is not finite.
fn log_softmax(row: &[f32]) -> Option<Vec<f64>> {
    if row.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = row.iter().map(|&v| ((v as f64) - max).exp()).sum::<f64>().ln() + max;
    Some(row.iter().map(|&v| v as f64 - lse).collect())
}

/// The greedy token of a row; `None` when the row has no number at all.
fn top1(row: &[f32]) -> Option<usize> {
    let i = capture::argmax(row);
    row.get(i).filter(|v| !v.is_nan()).map(|_| i)
}

/// Top-1 agreement and KL(ref || ours) over logits rows, accumulated block
/// by block (a long prompt's logits arrive chunk by chunk).
#[derive(Default)]
pub struct LogitsAccumulator {
    top1_agree: usize,
    rows: usize,
    kl_sum: f64,
    kl_max: f64,
}

impl LogitsAccumulator {
    /// Add the rows of one `[n_tokens, n_vocab]` block. A row with a
    /// non-finite value has KL = INFINITY.
    pub fn add(&mut self, ours: &Tensor, reference: &Tensor) -> Result<(), ShapeMismatch> {
        check_comparable(ours, reference)?;
        let rows = reference.shape.first().copied().unwrap_or(0);
        if rows == 0 {
            return Ok(());
        }
        self.rows += rows;
        let cols = reference.data.len() / rows;
        if cols == 0 {
            return Ok(());
        }
        for (a, b) in ours.data.chunks_exact(cols).zip(reference.data.chunks_exact(cols)) {
            let (ta, tb) = (top1(a), top1(b));
            if ta.is_some() && ta == tb {
                self.top1_agree += 1;
            }
            let kl = match (log_softmax(a), log_softmax(b)) {
                (Some(la), Some(lb)) => lb.iter().zip(&la).map(|(&lp, &lq)| lp.exp() * (lp - lq)).sum::<f64>().max(0.0),
                _ => f64::INFINITY,
            };
            self.kl_sum += kl;
            self.kl_max = self.kl_max.max(kl);
        }
        Ok(())
    }

    pub fn finish(self) -> LogitsMetrics {
        let kl_mean = if self.rows > 0 { self.kl_sum / self.rows as f64 } else { 0.0 };
        LogitsMetrics { top1_agree: self.top1_agree, rows: self.rows, kl_mean, kl_max: self.kl_max }
    }
}

/// Top-1 agreement and KL(ref || ours) over the rows of whole
/// `[n_tokens, n_vocab]` logits (see [`LogitsAccumulator`]).
pub fn compare_logits(ours: &Tensor, reference: &Tensor) -> Result<LogitsMetrics, ShapeMismatch> {
    let mut acc = LogitsAccumulator::default();
    acc.add(ours, reference)?;
    Ok(acc.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    /// Rows `r0..r1` of a token-major tensor.
    fn token_rows(t: &Tensor, r0: usize, r1: usize) -> Tensor {
        let w = t.data.len() / t.shape[0];
        let mut shape = t.shape.clone();
        shape[0] = r1 - r0;
        Tensor::new(shape, t.data[r0 * w..r1 * w].to_vec())
    }

    /// Queries `r0..r1` of `[h, n, n]` attention over the keys `0..r1`: what a
    /// chunk of a prefill computes.
    fn attention_chunk(t: &Tensor, r0: usize, r1: usize) -> Tensor {
        let (h, n) = (t.shape[0], t.shape[1]);
        let mut data = Vec::new();
        for hh in 0..h {
            for q in r0..r1 {
                data.extend_from_slice(&t.data[(hh * n + q) * n..][..r1]);
            }
        }
        Tensor::new(vec![h, r1 - r0, r1], data)
    }

    fn assert_same(a: &StageMetrics, b: &StageMetrics) {
        assert_eq!(a.n, b.n);
        assert_eq!(a.shape, b.shape);
        assert_eq!(a.max_abs, b.max_abs);
        assert_eq!(a.non_finite, b.non_finite);
        assert_eq!(a.worst.as_ref().map(|w| w.flat_index), b.worst.as_ref().map(|w| w.flat_index));
        assert_eq!(a.worst_row, b.worst_row);
        for (x, y) in [(a.mean_abs, b.mean_abs), (a.rel_l2, b.rel_l2), (a.cosine, b.cosine), (a.row_rel_l2_max, b.row_rel_l2_max), (a.row_rel_l2_median, b.row_rel_l2_median), (a.ref_max_abs, b.ref_max_abs)] {
            assert!((x - y).abs() <= 1e-12 * x.abs().max(1.0), "{x} vs {y}");
        }
    }

    #[test]
    fn a_prefill_compared_chunk_by_chunk_measures_what_one_pass_measures() {
        let n = 7;
        let hidden_ref = Tensor::new(vec![n, 5], values(1, n * 5));
        let hidden_ours = Tensor::new(vec![n, 5], values(1, n * 5).iter().zip(values(2, n * 5)).map(|(a, b)| a + 0.01 * b).collect());
        // Attention: causal zeros past each query's position in one pass;
        // the chunks see only their own keys. Ours has junk past the causal
        // limit (attn_scores ignore it).
        let causal = |seed: u64, junk: f32| {
            let mut v = values(seed, 2 * n * n);
            for (r, row) in v.chunks_mut(n).enumerate() {
                row[r % n + 1..].iter_mut().for_each(|x| *x = junk);
            }
            Tensor::new(vec![2, n, n], v)
        };
        let (att_ref, att_ours) = (causal(3, 0.0), causal(4, 9.0));
        for (stage, ours, reference, chunk) in [
            (Stage::AttnNorm, &hidden_ours, &hidden_ref, token_rows as fn(&Tensor, usize, usize) -> Tensor),
            (Stage::AttnScores, &att_ours, &att_ref, attention_chunk),
        ] {
            let whole = compare(stage, ours, reference).unwrap();
            let mut acc = StageAccumulator::new(stage);
            // Out of order, uneven chunks.
            for (r0, r1) in [(3, 7), (0, 2), (2, 3)] {
                acc.add(&chunk(ours, r0, r1), &chunk(reference, r0, r1), Some(Placement { row0: r0, rows: n })).unwrap();
            }
            assert_same(&acc.finish(), &whole);
        }
        // A NaN in a chunk is found at its place in the whole tensor.
        let mut bad = hidden_ours.clone();
        bad.data[4 * 5 + 2] = f32::NAN;
        let mut acc = StageAccumulator::new(Stage::AttnNorm);
        for (r0, r1) in [(0, 3), (3, 7)] {
            acc.add(&token_rows(&bad, r0, r1), &token_rows(&hidden_ref, r0, r1), Some(Placement { row0: r0, rows: n })).unwrap();
        }
        let m = acc.finish();
        assert_eq!(m.max_abs, f64::INFINITY);
        assert_eq!(m.worst.unwrap().index, vec![4, 2]);
        // A chunk that does not fit the whole tensor is refused.
        let mut acc = StageAccumulator::new(Stage::AttnNorm);
        assert!(acc.add(&token_rows(&bad, 0, 3), &token_rows(&hidden_ref, 0, 3), Some(Placement { row0: 5, rows: n })).is_err());
    }
}
