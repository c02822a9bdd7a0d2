//! `parity selftest`: the fault catalogue seeded into our engine, one fault
//! at a time at a random layer, against one llama.cpp capture per prompt;
//! each must be named exactly (step, layer, stage) by the teacher-forced
//! comparison, equivalent variants and clean runs must match.

use crate::diagnosis::{diagnose, Tools, NAMED_BY_PATTERNS};
use crate::diff::{DiffReport, Verdict};
use crate::prompts::Prompt;
use crate::session::{compare, Pair};
use crate::thresholds::Thresholds;
use anyhow::Result;
use capture::{Capture, StageId};
use engine::fault::{Expect, Fault, FaultSpec, Scope};
use serde::Serialize;

/// What one seeded fault (or clean run) produced on one prompt.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub prompt: usize,
    pub fault: String,
    /// The layer it was seeded at (`None`: a global fault, or a clean run).
    pub layer: Option<usize>,
    /// "step S, layer L, stage" or "no divergence".
    pub expected: String,
    /// Teacher-forced: the first divergence found.
    pub found: String,
    /// Gated error / threshold at the found stage (teacher-forced).
    pub margin: Option<f64>,
    pub exact: bool,
    /// Teacher-forced errors stay in the fault's own layer (no stage of
    /// another layer over its gate).
    pub confined: bool,
    /// Free-running: the stage with the largest error jump over its inputs.
    pub free_running_found: String,
    /// That stage's jump (its rel-L2 over its inputs' + 1e-4).
    pub free_running_jump: Option<f64>,
    pub free_running_agrees: bool,
    /// Why the fault was seeded where it was (subtle faults).
    pub note: String,
    /// The bugs the diagnosis names ("-" when no hypothesis holds).
    pub diagnosis: String,
    /// The bugs the pattern tests alone name, as for a dump of another
    /// engine without `--model` ("-" when none holds).
    pub patterns: String,
    /// Whether the pattern tests alone name this fault; `None` when its bug
    /// class has no pattern test (`NAMED_BY_PATTERNS`).
    pub named_by_patterns: Option<bool>,
    /// It names this fault.
    pub diagnosed: bool,
}

/// The summary `parity selftest` prints last and exits on.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub faults: usize,
    pub exact: usize,
    pub min_margin: Option<f64>,
    pub equivalent: usize,
    pub equivalent_clean: usize,
    pub clean_runs: usize,
    pub clean_clean: usize,
    pub free_running_agree: usize,
    /// Faults whose top diagnosis names the fault.
    pub diagnosed: usize,
    /// Faults whose bug class has a pattern test, and those of them the
    /// pattern tests alone name.
    pub pattern_faults: usize,
    pub named_by_patterns: usize,
    pub passed: bool,
}

/// The layer draws: splitmix64 from the seed.
struct Draw(u64);

impl Draw {
    fn next(&mut self, n: usize) -> usize {
        (engine::checkpoint::splitmix64(&mut self.0) % n.max(1) as u64) as usize
    }
}

/// The layer each fault is seeded at: random for layer faults (subtle ones
/// at layer 0, where the catalogue says they show), none for global ones.
pub fn draw_layers(faults: &[Fault], n_layer: usize, seed: u64) -> Vec<FaultSpec> {
    let mut draw = Draw(seed);
    faults
        .iter()
        .map(|&fault| {
            let info = fault.info();
            let layer = match (info.scope, info.subtle) {
                (Scope::Global, _) => None,
                (Scope::Layer, Some(_)) => Some(0),
                (Scope::Layer, None) => Some(draw.next(n_layer)),
            };
            FaultSpec { fault, layer }
        })
        .collect()
}

fn describe(report: &DiffReport) -> (String, Option<StageId>, Option<f64>) {
    match report.first_divergence {
        Some(i) => {
            let row = &report.rows[i];
            (row.id.to_string(), Some(row.id), row.ratio())
        }
        None if report.verdict == Verdict::Match => ("no divergence".into(), None, None),
        None => ("diverged (missing stage, shape or logits KL)".into(), None, None),
    }
}

/// Where the fault must be named: `None` for no divergence.
pub fn expected_at(spec: &FaultSpec) -> Option<StageId> {
    match spec.fault.info().expect? {
        Expect::NoDivergence => None,
        Expect::At(step, stage) if stage.is_global() => Some(StageId::global(step.index(), stage)),
        Expect::At(step, stage) => Some(StageId::layer(step.index(), spec.layer.unwrap_or(0), stage)),
    }
}

/// One prompt: a clean run, then every fault; our engine is restored to no
/// fault at the end.
#[allow(clippy::too_many_arguments)]
pub fn run_prompt(
    pair: &mut Pair,
    reference: &Capture,
    prompt_index: usize,
    specs: &[FaultSpec],
    tf_gates: &Thresholds,
    fr_gates: &Thresholds,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    let model = pair.open_model()?;
    let runs: Vec<FaultSpec> = std::iter::once(FaultSpec::NONE).chain(specs.iter().copied()).collect();
    for (k, spec) in runs.iter().enumerate() {
        progress(&format!("prompt {}: {}/{} {}", prompt_index + 1, k + 1, runs.len(), spec));
        pair.set_fault(*spec)?;
        let tf_capture = pair.ours(reference, None, true)?;
        let tf = compare(&tf_capture, reference, tf_gates, None);
        // The replays leave our engine with `spec` again.
        let diagnosis = diagnose(Tools { pair: Some(&mut *pair), weights: Some(&model.gguf) }, reference, &tf_capture, &tf)?;
        let named = diagnosis.as_ref().map_or(Vec::new(), |d| d.named());
        let diagnosed = named.contains(&spec.fault.name());
        // The pattern tests alone, as a dump of another engine gets them.
        let by_patterns = diagnose(Tools { pair: None, weights: Some(&model.gguf) }, reference, &tf_capture, &tf)?;
        let pattern_named = by_patterns.as_ref().map_or(Vec::new(), |d| d.named());
        let has_pattern = NAMED_BY_PATTERNS.contains(&spec.fault.name());
        let fr = compare(&pair.ours(reference, None, false)?, reference, fr_gates, None);
        let expected = expected_at(spec);
        let (found, found_id, margin) = describe(&tf);
        let exact = match expected {
            Some(at) => found_id == Some(at),
            None => tf.verdict == Verdict::Match,
        };
        let confined = match spec.layer {
            Some(l) => tf.rows.iter().filter(|r| !r.pass).all(|r| r.id.layer == Some(l)),
            None => true,
        };
        let (fr_found, fr_jump, fr_agrees) = match (fr.largest_jump, expected) {
            (_, None) => {
                let clean = fr.verdict == Verdict::Match;
                (if clean { "no divergence".into() } else { describe(&fr).0 }, None, clean)
            }
            (Some(i), Some(at)) => {
                let row = &fr.rows[i];
                (row.id.to_string(), row.jump, row.id == at)
            }
            (None, Some(_)) => ("nothing compared".into(), None, false),
        };
        let note = spec.fault.info().subtle.map_or(String::new(), |why| format!("seeded at layer 0: {why}"));
        out.push(Outcome {
            prompt: prompt_index + 1,
            fault: spec.fault.name().to_string(),
            layer: spec.layer,
            expected: expected.map_or("no divergence".to_string(), |id| id.to_string()),
            found,
            margin,
            exact,
            confined,
            free_running_found: fr_found,
            free_running_jump: fr_jump,
            free_running_agrees: fr_agrees,
            note,
            diagnosis: if named.is_empty() { "-".to_string() } else { named.join(" = ") },
            diagnosed,
            patterns: if pattern_named.is_empty() { "-".to_string() } else { pattern_named.join(" = ") },
            named_by_patterns: has_pattern.then(|| pattern_named.contains(&spec.fault.name())),
        });
    }
    pair.set_fault(FaultSpec::NONE)?;
    Ok(out)
}

/// Localization and false-alarm counts; `passed` needs every fault exact
/// with a margin of at least `min_margin`, and every clean or equivalent
/// run without a divergence.
pub fn summarize(outcomes: &[Outcome], seed: u64, min_margin: f64) -> Summary {
    let is_fault = |o: &&Outcome| o.fault != Fault::None.name() && o.expected != "no divergence";
    let is_equivalent = |o: &&Outcome| o.fault != Fault::None.name() && o.expected == "no divergence";
    let faults: Vec<&Outcome> = outcomes.iter().filter(is_fault).collect();
    let equivalent: Vec<&Outcome> = outcomes.iter().filter(is_equivalent).collect();
    let clean: Vec<&Outcome> = outcomes.iter().filter(|o| o.fault == Fault::None.name()).collect();
    let exact = faults.iter().filter(|o| o.exact && o.margin.is_some_and(|m| m >= min_margin)).count();
    let min = faults.iter().filter_map(|o| o.margin).fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))));
    let equivalent_clean = equivalent.iter().filter(|o| o.exact).count();
    let clean_clean = clean.iter().filter(|o| o.exact).count();
    Summary {
        seed,
        faults: faults.len(),
        exact,
        min_margin: min,
        equivalent: equivalent.len(),
        equivalent_clean,
        clean_runs: clean.len(),
        clean_clean,
        free_running_agree: faults.iter().filter(|o| o.free_running_agrees).count(),
        diagnosed: faults.iter().filter(|o| o.diagnosed).count(),
        pattern_faults: faults.iter().filter(|o| o.named_by_patterns.is_some()).count(),
        named_by_patterns: faults.iter().filter(|o| o.named_by_patterns == Some(true)).count(),
        passed: exact == faults.len() && equivalent_clean == equivalent.len() && clean_clean == clean.len(),
    }
}

/// The prompts `selftest` runs when none are given.
pub fn default_prompts() -> Vec<Prompt> {
    vec![Prompt { text: "Write a haiku about GPU computing".into(), chat: false }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use capture::Stage;

    #[test]
    fn layers_are_drawn_from_the_seed_and_subtle_faults_sit_at_layer_0() {
        let faults: Vec<Fault> = Fault::all().filter(|&f| f != Fault::None).collect();
        let a = draw_layers(&faults, 24, 7);
        assert_eq!(a, draw_layers(&faults, 24, 7));
        assert_ne!(a, draw_layers(&faults, 24, 8));
        for spec in &a {
            match (spec.fault.info().scope, spec.fault.info().subtle) {
                (Scope::Global, _) => assert_eq!(spec.layer, None),
                (Scope::Layer, Some(_)) => assert_eq!(spec.layer, Some(0)),
                (Scope::Layer, None) => assert!(spec.layer.unwrap() < 24),
            }
        }
        let kv = FaultSpec { fault: Fault::KvOffset, layer: Some(5) };
        assert_eq!(expected_at(&kv), Some(StageId::layer(1, 5, Stage::AttnScores)));
        assert_eq!(expected_at(&FaultSpec { fault: Fault::GqaRatioForm, layer: Some(3) }), None);
        assert_eq!(expected_at(&FaultSpec::from(Fault::LmHeadTransposed)), Some(StageId::global(0, Stage::Logits)));
    }
}
