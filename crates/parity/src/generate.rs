//! `parity generate`: the "haiku test" done by both engines at once. Each
//! generates greedily from its own tokens; the first token where they part
//! is shown with each side's top-5. Whether that is a near tie (rounding
//! flipped an argmax between close candidates) or a real divergence is not
//! guessed from a logit gap: the caller judges the prompt teacher-forced up
//! to that step (`parity run --decode STEP`), which names the op if one is
//! wrong.

use crate::session::Pair;
use anyhow::{ensure, Context, Result};
use capture::{Capture, Stage, StageId, Tensor};

/// The step where the generations part, with the evidence.
#[derive(Debug)]
pub struct Parting {
    /// Index of the first differing generated token (0: the prefill's pick).
    pub step: usize,
    pub ours: i32,
    pub reference: i32,
    /// Each side's top-5 (token, logit) at that step.
    pub ours_top5: Vec<(i32, f32)>,
    pub reference_top5: Vec<(i32, f32)>,
    /// logit(own pick) - logit(the other's pick), on each side: how close
    /// the two candidates were.
    pub gap_ours: f32,
    pub gap_reference: f32,
}

/// Both generations and where they part (if they do within `n` tokens).
#[derive(Debug)]
pub struct Generations {
    pub prompt_tokens: usize,
    pub ours: Vec<i32>,
    pub reference: Vec<i32>,
    pub parting: Option<Parting>,
}

/// The last row of step `step`'s logits in `c`.
fn last_logits(c: &Capture, step: usize) -> Result<&[f32]> {
    let t: &Tensor = c.get(&StageId::global(step, Stage::Logits)).with_context(|| format!("{}: no logits at step {step}", c.engine))?;
    let vocab = *t.shape.last().context("logits without a shape")?;
    ensure!(t.len() >= vocab && vocab > 0, "{}: empty logits at step {step}", c.engine);
    Ok(&t.data[t.len() - vocab..])
}

/// The `k` largest (token, logit), largest first (ties: the lower id).
pub fn top_k(logits: &[f32], k: usize) -> Vec<(i32, f32)> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.into_iter().take(k).map(|i| (i as i32, logits[i])).collect()
}

/// Both engines generate `n` tokens greedily from `prompt`, each from its own.
pub fn generate_both(pair: &mut Pair, prompt: &str, chat: bool, n: usize) -> Result<Generations> {
    ensure!(n >= 1, "-n must be at least 1");
    // Global stages only (the logits), for every step: cached like any reference.
    let reference = pair.reference(prompt, chat, n - 1, Some(Vec::new()))?;
    let ours = pair.ours.run(&reference.tokens, n - 1, None, Some(Vec::new()), crate::ours::Mode::Observe)?;
    let parting = match (0..n).find(|&k| ours.generated.get(k) != reference.generated.get(k)) {
        None => None,
        Some(step) => {
            let (lo, lr) = (last_logits(&ours, step)?, last_logits(&reference, step)?);
            let (a, b) = (reference.generated[step], ours.generated[step]);
            let logit = |l: &[f32], t: i32| l.get(t as usize).copied().unwrap_or(f32::NAN);
            Some(Parting {
                step,
                ours: b,
                reference: a,
                ours_top5: top_k(lo, 5),
                reference_top5: top_k(lr, 5),
                gap_ours: logit(lo, b) - logit(lo, a),
                gap_reference: logit(lr, a) - logit(lr, b),
            })
        }
    };
    Ok(Generations { prompt_tokens: reference.tokens.len(), ours: ours.generated, reference: reference.generated, parting })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_logit_then_id() {
        assert_eq!(top_k(&[0.5, 2.0, 2.0, -1.0], 3), vec![(1, 2.0), (2, 2.0), (0, 0.5)]);
        assert_eq!(top_k(&[1.0], 5), vec![(0, 1.0)]);
    }
}
