//! `parity calibrate`'s work: clean prompts through both engines, the
//! largest error per stage and layer times a safety factor, and the refusal
//! to write a gate that cannot fail.

use crate::progress::{Milestones, Progress, Unit};
use crate::prompts::Prompt;
use crate::report::sci;
use crate::session::{compare, Pair};
use crate::thresholds::{calibrate, Comparison, GateMetric, Thresholds};
use anyhow::{bail, Result};
use capture::{Stage, StageId};

/// Gates at or above these can never fail on a correct-looking engine: a
/// probability differs from another by less than 1, a KL of 0.1 is a
/// different distribution, a relative error of 0.5 is half the signal.
pub const MAX_PROBABILITY_GATE: f64 = 1.0;
pub const MAX_KL_GATE: f64 = 0.1;
pub const MAX_RELATIVE_GATE: f64 = 0.5;

/// One observed clean error, with where it came from.
#[derive(Clone, Debug)]
pub struct Observation {
    pub id: StageId,
    pub value: f64,
    /// 1-based prompt number in the set.
    pub prompt: usize,
    /// Where in the tensor: "token 3" (worst row) or "token 3, dim 17".
    pub at: String,
}

pub struct Calibration {
    pub thresholds: Thresholds,
    pub observed: Vec<Observation>,
    pub kl_max: f64,
}

pub struct CalibrationOptions {
    pub comparison: Comparison,
    pub metric: GateMetric,
    pub decode: usize,
    pub safety_factor: f64,
    pub floor: f64,
}

/// Run every prompt, observe, build the thresholds and refuse any that cannot fail.
pub fn run_calibration(pair: &mut Pair, prompts: &[Prompt], o: &CalibrationOptions) -> Result<Calibration> {
    let observe_all = Thresholds { metric: o.metric, ..Thresholds::uniform(f64::MAX) };
    let mut observed = Vec::new();
    let mut kl: Vec<(f64, usize, usize)> = Vec::new();
    let mut progress = Progress::new("calibrate", prompts.len() as u64, Unit::Items("prompts"), Milestones::EveryItem);
    for (i, prompt) in prompts.iter().enumerate() {
        let teacher_forced = o.comparison == Comparison::TeacherForced;
        let (ours, reference) = pair.capture(&prompt.text, prompt.chat, o.decode, None, teacher_forced)?;
        let report = compare(&ours, &reference, &observe_all, None);
        if let Some((id, _)) = report.missing.first() {
            bail!("prompt {}: checkpoint {id} is missing on one side; cannot calibrate", i + 1);
        }
        for row in &report.rows {
            if row.metrics.non_finite > 0 {
                bail!("prompt {}: {} has NaN or Inf; a clean run must be finite", i + 1, row.id);
            }
            let at = match o.metric {
                GateMetric::RowRelL2 => row.metrics.worst_row.clone(),
                GateMetric::MaxAbs => row.metrics.worst.as_ref().map_or(String::new(), |w| w.coords.clone()),
            };
            observed.push(Observation { id: row.id, value: row.value(), prompt: i + 1, at });
        }
        for (step, m) in &report.logits {
            kl.push((m.kl_max, i + 1, *step));
        }
        let top1: usize = report.logits.iter().map(|(_, m)| m.top1_agree).sum();
        let rows: usize = report.logits.iter().map(|(_, m)| m.rows).sum();
        let prompt_kl = sci(report.logits.iter().map(|(_, m)| m.kl_max).fold(0.0, f64::max));
        progress.advance(&format!("prompt {} ({} tokens): logits top-1 {top1}/{rows}, KL max {prompt_kl}", i + 1, ours.tokens.len()));
    }
    progress.finish(&format!("{} prompts observed", prompts.len()));
    let values: Vec<(StageId, f64)> = observed.iter().map(|ob| (ob.id, ob.value)).collect();
    let mut thresholds = calibrate(&values, o.safety_factor, o.floor, pair.n_layer);
    thresholds.metric = o.metric;
    thresholds.comparison = Some(o.comparison);
    let (kl_max, kl_prompt, kl_step) = kl.iter().copied().fold((0.0, 0, 0), |a, b| if b.0 > a.0 { b } else { a });
    let kl_gate = (kl_max * o.safety_factor).max(o.floor);
    if kl_gate >= MAX_KL_GATE {
        bail!(
            "refusing to write a logits KL gate of {} (>= {MAX_KL_GATE}: it cannot fail); set by prompt {kl_prompt}, {}: KL {}",
            sci(kl_gate),
            crate::report::step_label(kl_step),
            sci(kl_max)
        );
    }
    thresholds.logits_kl_max = Some(kl_gate);
    refuse_gates_that_cannot_fail(&thresholds, &observed)?;
    Ok(Calibration { thresholds, observed, kl_max })
}

/// Exit-2 error naming the stage, layer and the prompt and place that set a
/// threshold which cannot fail.
pub fn refuse_gates_that_cannot_fail(t: &Thresholds, observed: &[Observation]) -> Result<()> {
    for ob in observed {
        let Some(gate) = t.for_stage(&ob.id) else { continue };
        let limit = match t.metric {
            GateMetric::RowRelL2 => Some(MAX_RELATIVE_GATE),
            GateMetric::MaxAbs if ob.id.stage == Stage::AttnProbs => Some(MAX_PROBABILITY_GATE),
            GateMetric::MaxAbs => None,
        };
        // The observation that set this gate: the largest for its stage and layer.
        let sets_it = observed
            .iter()
            .filter(|o| o.id.stage == ob.id.stage && o.id.layer == ob.id.layer)
            .all(|o| o.value <= ob.value);
        if let Some(limit) = limit.filter(|&l| gate >= l && sets_it) {
            let layer = ob.id.layer.map_or("global".to_string(), |l| format!("layer {l}"));
            bail!(
                "refusing to write a {} gate of {} for {} {layer} (>= {limit}: it cannot fail); set by prompt {}, {}, {}: {}",
                t.metric.label(),
                sci(gate),
                ob.id.stage,
                ob.prompt,
                crate::report::step_label(ob.id.step),
                ob.at,
                sci(ob.value)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(stage: Stage, layer: usize, value: f64, prompt: usize) -> Observation {
        Observation { id: StageId::layer(0, layer, stage), value, prompt, at: "token 0".into() }
    }

    #[test]
    fn a_gate_that_cannot_fail_is_refused_naming_what_set_it() {
        let observed = vec![obs(Stage::AttnProbs, 0, 0.01, 1), obs(Stage::AttnProbs, 0, 0.3, 2), obs(Stage::QProj, 3, 0.001, 1)];
        let values: Vec<_> = observed.iter().map(|o| (o.id, o.value)).collect();
        let mut t = calibrate(&values, 4.0, 1e-6, 4); // probs gate 1.2
        t.metric = GateMetric::MaxAbs;
        let err = refuse_gates_that_cannot_fail(&t, &observed).unwrap_err().to_string();
        assert!(err.contains("attn_probs layer 0") && err.contains("prompt 2") && err.contains("1.2e0"), "{err}");
        t.metric = GateMetric::RowRelL2; // 1.2 relative: refused too
        assert!(refuse_gates_that_cannot_fail(&t, &observed).is_err());
        let fine = vec![obs(Stage::AttnProbs, 0, 0.01, 1)];
        let values: Vec<_> = fine.iter().map(|o| (o.id, o.value)).collect();
        let mut t = calibrate(&values, 4.0, 1e-6, 4);
        t.metric = GateMetric::RowRelL2;
        assert!(refuse_gates_that_cannot_fail(&t, &fine).is_ok());
    }
}
