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

/// Per-row rel-L2 over the rows of the stage's layout: (worst, median, which row).
fn row_errors(stage: Stage, shape: &[usize], ours: &Tensor, reference: &Tensor, non_finite: bool) -> (f64, f64, String) {
    let width = stage.layout().row_width(shape).max(1);
    // (|d|^2, |ref|^2) per row; non-finite rows are infinitely wrong.
    let sums: Vec<(f64, f64)> = ours
        .data
        .chunks(width)
        .zip(reference.data.chunks(width))
        .map(|(a, b)| {
            let (mut d2, mut b2) = (0f64, 0f64);
            for (&x, &y) in a.iter().zip(b) {
                if !x.is_finite() || !y.is_finite() {
                    return (f64::INFINITY, 1.0);
                }
                d2 += (x as f64 - y as f64).powi(2);
                b2 += (y as f64).powi(2);
            }
            (d2, b2)
        })
        .collect();
    let mut norms: Vec<f64> = sums.iter().map(|&(_, b2)| b2.sqrt()).collect();
    norms.sort_by(f64::total_cmp);
    let floor = norms.get(norms.len() / 2).copied().unwrap_or(0.0) * ROW_NORM_FLOOR;
    let mut rows: Vec<(f64, usize)> = sums
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
    let first = unravel(worst_r * width, shape);
    let axes = stage.layout().axes();
    let row_axes = if stage.layout() == capture::Layout::Attention { 2 } else { 1 };
    let label = first
        .iter()
        .take(row_axes.min(first.len()))
        .enumerate()
        .map(|(i, v)| format!("{} {v}", axes.get(i).copied().unwrap_or("axis")))
        .collect::<Vec<_>>()
        .join(", ");
    (if non_finite { f64::INFINITY } else { worst }, median, label)
}

/// Compare one stage. Shapes may differ in how they split the inner
/// dimensions (`[t, 896]` vs `[t, 14, 64]`): they are compared when the
/// element counts and the leading dimension agree.
pub fn compare(stage: Stage, ours: &Tensor, reference: &Tensor) -> Result<StageMetrics, ShapeMismatch> {
    check_comparable(ours, reference)?;
    if stage == Stage::AttnScores {
        if let (Some(a), Some(b)) = (causal_part(ours), causal_part(reference)) {
            return compare_all(stage, &a, &b);
        }
    }
    compare_all(stage, ours, reference)
}

/// `attn_scores` are compared on their causal part only (the catalogue):
/// entries a query may not attend to are zeroed, whatever an engine left
/// there (an engine that computes them, or its mask, is judged at
/// `attn_probs`). `[n_head, n_tokens, n_kv]`: query t sits at position
/// n_kv - n_tokens + t. `None` for another shape.
fn causal_part(t: &Tensor) -> Option<Tensor> {
    let [h, n_t, n_kv] = t.shape[..] else { return None };
    if n_t > n_kv || t.data.len() != h * n_t * n_kv {
        return None;
    }
    let mut out = t.clone();
    for (r, row) in out.data.chunks_mut(n_kv).enumerate() {
        let limit = capture::causal_keys(n_t, n_kv, r % n_t);
        row[limit..].iter_mut().for_each(|x| *x = 0.0);
    }
    Some(out)
}

fn compare_all(stage: Stage, ours: &Tensor, reference: &Tensor) -> Result<StageMetrics, ShapeMismatch> {
    let shape = canonical_shape(stage, ours, reference);
    let mut non_finite = 0usize;
    let mut first_non_finite: Option<usize> = None;
    let (mut sum_abs, mut sum_d2, mut sum_b2, mut sum_a2, mut dot) = (0f64, 0f64, 0f64, 0f64, 0f64);
    let mut max_abs = 0f64;
    let mut worst_finite: Option<usize> = None;
    let mut ref_max_abs = 0f64;
    let mut n_finite = 0usize;
    for (i, (&a, &b)) in ours.data.iter().zip(reference.data.iter()).enumerate() {
        if !a.is_finite() || !b.is_finite() {
            non_finite += 1;
            first_non_finite.get_or_insert(i);
            continue;
        }
        let (a, b) = (a as f64, b as f64);
        let d = a - b;
        let ad = d.abs();
        n_finite += 1;
        sum_abs += ad;
        sum_d2 += d * d;
        sum_b2 += b * b;
        sum_a2 += a * a;
        dot += a * b;
        if ad > max_abs || worst_finite.is_none() {
            max_abs = ad;
            worst_finite = Some(i);
        }
        ref_max_abs = ref_max_abs.max(b.abs());
    }
    let ratio = |num: f64, den: f64| {
        if den > 0.0 {
            num / den
        } else if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    };
    let rel_l2 = ratio(sum_d2.sqrt(), sum_b2.sqrt());
    let nmse = ratio(sum_d2, sum_b2);
    let cosine = if sum_a2 == 0.0 && sum_b2 == 0.0 {
        1.0
    } else if sum_a2 == 0.0 || sum_b2 == 0.0 {
        0.0
    } else {
        dot / (sum_a2.sqrt() * sum_b2.sqrt())
    };
    let mean_abs = if n_finite > 0 { sum_abs / n_finite as f64 } else { 0.0 };
    let worst_at = first_non_finite.or(worst_finite);
    let worst = worst_at.map(|i| {
        let index = unravel(i, &shape);
        WorstElement {
            flat_index: i,
            coords: coords_string(stage, &index),
            index,
            ours: ours.data[i],
            reference: reference.data[i],
        }
    });
    if non_finite > 0 {
        max_abs = f64::INFINITY;
    }
    let (row_rel_l2_max, row_rel_l2_median, worst_row) = row_errors(stage, &shape, ours, reference, non_finite > 0);
    Ok(StageMetrics {
        row_rel_l2_max,
        row_rel_l2_median,
        worst_row,
        n: ours.data.len(),
        max_abs,
        mean_abs,
        rel_l2,
        cosine,
        nmse,
        ref_max_abs,
        non_finite,
        worst,
        shape,
    })
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

/// Top-1 agreement and KL(ref || ours) over the rows of `[n_tokens, n_vocab]`
/// logits. A row with a non-finite value has KL = INFINITY.
pub fn compare_logits(ours: &Tensor, reference: &Tensor) -> Result<LogitsMetrics, ShapeMismatch> {
    check_comparable(ours, reference)?;
    let rows = reference.shape.first().copied().unwrap_or(0);
    if rows == 0 {
        return Ok(LogitsMetrics { top1_agree: 0, rows: 0, kl_mean: 0.0, kl_max: 0.0 });
    }
    let cols = reference.data.len() / rows;
    let (mut top1_agree, mut kl_sum, mut kl_max) = (0usize, 0f64, 0f64);
    if cols == 0 {
        return Ok(LogitsMetrics { top1_agree: 0, rows, kl_mean: 0.0, kl_max: 0.0 });
    }
    for (a, b) in ours.data.chunks_exact(cols).zip(reference.data.chunks_exact(cols)) {
        let (ta, tb) = (top1(a), top1(b));
        if ta.is_some() && ta == tb {
            top1_agree += 1;
        }
        let kl = match (log_softmax(a), log_softmax(b)) {
            (Some(la), Some(lb)) => lb.iter().zip(&la).map(|(&lp, &lq)| lp.exp() * (lp - lq)).sum::<f64>().max(0.0),
            _ => f64::INFINITY,
        };
        kl_sum += kl;
        kl_max = kl_max.max(kl);
    }
    Ok(LogitsMetrics { top1_agree, rows, kl_mean: kl_sum / rows as f64, kl_max })
}
