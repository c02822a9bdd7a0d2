//! Alignment of two captures by checkpoint, per-stage comparison against
//! thresholds, and localization: the first divergence in execution order and
//! the stage where the error grows the most relative to its inputs.

use crate::metrics::{LogitsAccumulator, LogitsMetrics, Placement, StageAccumulator, StageMetrics};
use crate::thresholds::{GateMetric, Thresholds};
use capture::Capture;
use capture::stage::{Stage, StageId};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Added to an input's relative L2 before dividing, so that ratios between
/// two tiny noise levels (1e-7 / 1e-9) never outrank a real error jump.
pub const JUMP_EPSILON: f64 = 1e-4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Match,
    Diverged,
}

#[derive(Clone, Debug, Serialize)]
pub struct StageRow {
    pub id: StageId,
    pub metrics: StageMetrics,
    /// `None`: the thresholds have no value for this stage; the row is then
    /// not gated (it fails only on non-finite values).
    pub threshold: Option<f64>,
    /// The metric `threshold` bounds.
    pub metric: GateMetric,
    pub pass: bool,
    pub ours_provenance: String,
    pub ref_provenance: String,
    /// rel_l2 of this row / (largest rel_l2 among its inputs + JUMP_EPSILON);
    /// `None` when none of its inputs was compared.
    pub jump: Option<f64>,
    /// The input whose rel_l2 was used for `jump` (`None` for `embed`, whose
    /// input is the token ids, taken as exact).
    pub jump_from: Option<StageId>,
}

impl StageRow {
    /// The gated metric's value (INFINITY for non-finite values).
    pub fn value(&self) -> f64 {
        if self.metrics.non_finite > 0 {
            return f64::INFINITY;
        }
        match self.metric {
            GateMetric::MaxAbs => self.metrics.max_abs,
            GateMetric::RowRelL2 => self.metrics.row_rel_l2_max,
        }
    }

    /// value / threshold (INFINITY for non-finite values), when gated: the
    /// margin of a divergence, or how close a match came.
    pub fn ratio(&self) -> Option<f64> {
        self.threshold.map(|t| self.value() / t)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct DiffReport {
    pub ours_engine: String,
    pub reference_engine: String,
    pub prompt: String,
    pub tokens: Vec<i32>,
    pub model_sha256: String,
    /// The KV cache types ("f32", or "ours f32, reference f16" when they differ).
    pub kv_type: String,
    pub thresholds_source: String,
    pub n_layer: usize,
    /// Compared checkpoints in execution order.
    pub rows: Vec<StageRow>,
    /// Present on one side only; the string says which side lacks it: "ours" or "reference".
    pub missing: Vec<(StageId, String)>,
    /// Present on neither, or on one side only while the other side declares
    /// it unobservable (attention internals under flash attention).
    pub unavailable: Vec<StageId>,
    /// Present on both sides with shapes that cannot be compared (a divergence).
    pub shape_mismatch: Vec<(StageId, String)>,
    /// Index into `rows` of the first failing row in execution order.
    pub first_divergence: Option<usize>,
    /// Index into `rows` of the row with the largest `jump`.
    pub largest_jump: Option<usize>,
    /// Per step, when both sides have logits.
    pub logits: Vec<(usize, LogitsMetrics)>,
    /// The KL gate from the thresholds, if any.
    pub logits_kl_max: Option<f64>,
    pub verdict: Verdict,
    /// How ours was fed: "teacher-forced" (each op the reference's input) or
    /// "free-running" (its own outputs; dumps of other engines are this).
    pub comparison: String,
    /// Our engine's numerics mode, when known.
    pub numerics: String,
    /// The other comparison of the same run, summarized (`parity run`
    /// reports teacher-forced and adds free-running here).
    pub free_running: Option<FreeRunningSummary>,
    /// Which bug it is, at the first divergence (filled by the verbs).
    pub diagnosis: Option<crate::diagnosis::Diagnosis>,
    /// A few stages in detail (filled by the verbs that hold the captures:
    /// `drilldown::attach`).
    pub drilldowns: Vec<crate::drilldown::Drilldown>,
    /// The run's configuration beyond the fields above, as (name, value) in
    /// the order reports list it: from the captures here, then what the
    /// verb adds (model path, fault, the llama.cpp build, ...).
    pub configuration: Vec<(String, String)>,
}

/// The free-running comparison beside a teacher-forced verdict: how the
/// error grows through the layers when each engine runs on its own outputs,
/// and what that does to the logits.
#[derive(Clone, Debug, Serialize)]
pub struct FreeRunningSummary {
    pub thresholds_source: String,
    /// Per layer in order (global stages last, as `None`): the worst-row
    /// rel-L2 over the layer's stages and steps, and the stage it is at.
    pub per_layer: Vec<(Option<usize>, f64, Stage)>,
    /// The first stage over its free-running gate: (stage, value, threshold).
    pub first_over_gate: Option<(StageId, f64, f64)>,
    pub logits: Vec<(usize, LogitsMetrics)>,
    pub logits_kl_max: Option<f64>,
    pub verdict: Verdict,
    /// Our free-running pass ended after this layer (the last asked for):
    /// final_norm and logits were compared teacher-forced only.
    pub ended_after_layer: Option<usize>,
}

impl FreeRunningSummary {
    /// The summary of a free-running comparison whose pass ended after
    /// `ended_after_layer` (None: it ran to the logits).
    pub fn of(r: &DiffReport, ended_after_layer: Option<usize>) -> FreeRunningSummary {
        let mut per_layer: BTreeMap<(bool, usize), (f64, Stage)> = BTreeMap::new();
        for row in &r.rows {
            let key = (row.id.layer.is_none(), row.id.layer.unwrap_or(0));
            let v = row.metrics.row_rel_l2_max;
            let e = per_layer.entry(key).or_insert((v, row.id.stage));
            if v.total_cmp(&e.0).is_gt() {
                *e = (v, row.id.stage);
            }
        }
        FreeRunningSummary {
            thresholds_source: r.thresholds_source.clone(),
            per_layer: per_layer.into_iter().map(|((g, l), (v, s))| ((!g).then_some(l), v, s)).collect(),
            first_over_gate: r.first_divergence.map(|i| {
                let row = &r.rows[i];
                (row.id, row.value(), row.threshold.unwrap_or(f64::NAN))
            }),
            logits: r.logits.clone(),
            logits_kl_max: r.logits_kl_max,
            verdict: r.verdict,
            ended_after_layer,
        }
    }
}

/// A divergence that is not a failing row: the earliest of them in execution order.
#[derive(Clone, Debug, PartialEq)]
pub enum FirstProblem {
    Row(usize),
    Missing(StageId, String),
    ShapeMismatch(StageId, String),
    LogitsKl(usize, f64),
}

impl DiffReport {
    /// The earliest problem in execution order: a failing row, a missing
    /// stage or a shape mismatch; else a logits KL over its gate.
    pub fn first_problem(&self) -> Option<FirstProblem> {
        let mut best: Option<(StageId, FirstProblem)> = None;
        let mut consider = |id: StageId, p: FirstProblem| {
            if best.as_ref().is_none_or(|(b, _)| id < *b) {
                best = Some((id, p));
            }
        };
        if let Some(i) = self.first_divergence {
            consider(self.rows[i].id, FirstProblem::Row(i));
        }
        if let Some((id, side)) = self.missing.first() {
            consider(*id, FirstProblem::Missing(*id, side.clone()));
        }
        if let Some((id, msg)) = self.shape_mismatch.first() {
            consider(*id, FirstProblem::ShapeMismatch(*id, msg.clone()));
        }
        if let Some((_, p)) = best {
            return Some(p);
        }
        let gate = self.logits_kl_max?;
        self.logits.iter().find(|(_, m)| m.kl_max.is_nan() || m.kl_max > gate).map(|(s, m)| FirstProblem::LogitsKl(*s, m.kl_max))
    }

    /// The checkpoint of [`DiffReport::first_problem`] (the logits of its
    /// step for a KL divergence).
    pub fn first_problem_id(&self) -> Option<StageId> {
        Some(match self.first_problem()? {
            FirstProblem::Row(i) => self.rows[i].id,
            FirstProblem::Missing(id, _) | FirstProblem::ShapeMismatch(id, _) => id,
            FirstProblem::LogitsKl(step, _) => StageId::global(step, Stage::Logits),
        })
    }

    pub fn n_failed(&self) -> usize {
        self.rows.iter().filter(|r| !r.pass).count()
    }

    pub fn n_ungated(&self) -> usize {
        self.rows.iter().filter(|r| r.threshold.is_none()).count()
    }
}

/// The largest rel_l2 among the compared inputs of `id`; an input that was
/// not compared (unavailable under flash attention, or not captured) is
/// replaced by its own inputs, a few levels deep.
fn input_error(id: &StageId, n_layer: usize, rel: &BTreeMap<StageId, f64>, depth: usize) -> Option<(f64, StageId)> {
    let mut best: Option<(f64, StageId)> = None;
    for input in id.inputs(n_layer) {
        let found = match rel.get(&input) {
            Some(&x) => Some((x, input)),
            None if depth > 0 => input_error(&input, n_layer, rel, depth - 1),
            None => None,
        };
        if let Some((x, from)) = found {
            let better = match best {
                None => true,
                Some((b, _)) => x.total_cmp(&b).is_gt(),
            };
            if better {
                best = Some((x, from));
            }
        }
    }
    best
}

fn jump_ratio(rel_l2: f64, input: f64) -> f64 {
    match (rel_l2.is_finite(), input.is_finite()) {
        (true, true) => rel_l2 / (input + JUMP_EPSILON),
        (false, true) => f64::INFINITY,
        // Already non-finite upstream: the jump is not here.
        (_, false) => 0.0,
    }
}

/// The number of layers: from the captures' configs, else from the layer indices seen.
fn layer_count(ours: &Capture, reference: &Capture) -> usize {
    let from_config = ours.config.n_layer.max(reference.config.n_layer);
    if from_config > 0 {
        return from_config;
    }
    ours.tensors
        .keys()
        .chain(reference.tensors.keys())
        .filter_map(|id| id.layer)
        .max()
        .map_or(0, |l| l + 1)
}

/// Why two captures cannot be compared at all (different models, tokens or
/// architectures), or `Ok` when they can.
pub fn check_comparable(ours: &Capture, reference: &Capture) -> Result<(), String> {
    if !ours.model_sha256.is_empty()
        && !reference.model_sha256.is_empty()
        && !ours.model_sha256.eq_ignore_ascii_case(&reference.model_sha256)
    {
        return Err(format!(
            "the captures are of different models: ours {} vs reference {}",
            ours.model_sha256, reference.model_sha256
        ));
    }
    if ours.tokens != reference.tokens {
        return Err(format!(
            "the captures ran different prompt tokens: ours {} tokens {:?}, reference {} tokens {:?}",
            ours.tokens.len(),
            &ours.tokens[..ours.tokens.len().min(8)],
            reference.tokens.len(),
            &reference.tokens[..reference.tokens.len().min(8)]
        ));
    }
    let (a, b) = (&ours.config, &reference.config);
    let dims = |c: &capture::CaptureConfig| [c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.n_vocab];
    let (da, db) = (dims(a), dims(b));
    if da.iter().all(|&x| x > 0) && db.iter().all(|&x| x > 0) && da != db {
        return Err(format!("the captures have different architectures: ours {da:?} vs reference {db:?} (layers, embd, heads, kv heads, head dim, ff, vocab)"));
    }
    Ok(())
}

/// Align `ours` and `reference` by checkpoint and compare every checkpoint
/// both have (those `filter` accepts, when given).
pub fn diff_captures(
    ours: &Capture,
    reference: &Capture,
    thresholds: &Thresholds,
    filter: Option<&dyn Fn(&StageId) -> bool>,
) -> DiffReport {
    let mut builder = DiffBuilder::default();
    builder.add(ours, reference, filter, None);
    builder.finish(ours, reference, thresholds)
}

/// One checkpoint compared so far.
struct Compared {
    metrics: StageAccumulator,
    logits: Option<LogitsAccumulator>,
    ours_provenance: String,
    ref_provenance: String,
}

/// A comparison built part by part: a long prompt's prefill arrives chunk by
/// chunk (each part a capture of one chunk's tensors, placed in the whole
/// prompt), decode steps one by one, and each part is dropped once added.
/// The report is the one [`diff_captures`] gives on the whole captures.
#[derive(Default)]
pub struct DiffBuilder {
    compared: BTreeMap<StageId, Compared>,
    /// Present on one side only: which side lacks it.
    missing: BTreeMap<StageId, String>,
    unavailable: BTreeSet<StageId>,
    shape_mismatch: BTreeMap<StageId, String>,
}

impl DiffBuilder {
    /// Compare the checkpoints of one part (those `filter` accepts, when
    /// given). `prefill`: where this part's step-0 tensors sit in the whole
    /// prefill (`None`: they are the whole prefill).
    pub fn add(&mut self, ours: &Capture, reference: &Capture, filter: Option<&dyn Fn(&StageId) -> bool>, prefill: Option<Placement>) {
        let keep = |id: &StageId| filter.is_none_or(|f| f(id));
        let unavailable_ours: BTreeSet<StageId> = ours.unavailable.iter().copied().collect();
        let unavailable_ref: BTreeSet<StageId> = reference.unavailable.iter().copied().collect();
        let all: BTreeSet<StageId> = ours.tensors.keys().chain(reference.tensors.keys()).copied().filter(keep).collect();
        self.unavailable.extend(unavailable_ours.union(&unavailable_ref).copied().filter(|id| keep(id) && !all.contains(id)));
        for id in all {
            match (ours.tensors.get(&id), reference.tensors.get(&id)) {
                (Some(a), Some(b)) => {
                    let entry = self.compared.entry(id).or_insert_with(|| Compared {
                        metrics: StageAccumulator::new(id.stage),
                        logits: (id.stage == Stage::Logits).then(LogitsAccumulator::default),
                        ours_provenance: a.provenance.clone(),
                        ref_provenance: b.provenance.clone(),
                    });
                    let placement = prefill.filter(|_| id.step == 0);
                    if let Err(e) = entry.metrics.add(&a.tensor, &b.tensor, placement) {
                        self.shape_mismatch.entry(id).or_insert_with(|| e.to_string());
                    } else if let Some(logits) = &mut entry.logits {
                        if logits.add(&a.tensor, &b.tensor).is_err() {
                            entry.logits = None;
                        }
                    }
                }
                (None, Some(_)) if unavailable_ours.contains(&id) => {
                    self.unavailable.insert(id);
                }
                (Some(_), None) if unavailable_ref.contains(&id) => {
                    self.unavailable.insert(id);
                }
                (None, Some(_)) => {
                    self.missing.insert(id, "ours".to_string());
                }
                (Some(_), None) => {
                    self.missing.insert(id, "reference".to_string());
                }
                (None, None) => {}
            }
        }
    }

    /// The report: gated by `thresholds`, its header (engines, prompt,
    /// tokens, configuration) from `ours` and `reference` (whole captures,
    /// or the same without tensors when the parts were added instead).
    pub fn finish(self, ours: &Capture, reference: &Capture, thresholds: &Thresholds) -> DiffReport {
        let n_layer = layer_count(ours, reference);
        let mut rows = Vec::new();
        let mut logits = Vec::new();
        let shape_mismatch: Vec<(StageId, String)> = self.shape_mismatch.into_iter().collect();
        for (id, c) in self.compared {
            if shape_mismatch.iter().any(|(m, _)| *m == id) || self.missing.contains_key(&id) {
                continue;
            }
            let metrics = c.metrics.finish();
            let threshold = thresholds.for_stage(&id);
            let value = match thresholds.metric {
                GateMetric::MaxAbs => metrics.max_abs,
                GateMetric::RowRelL2 => metrics.row_rel_l2_max,
            };
            // NaN never passes: `value <= t` is false for NaN too.
            let pass = metrics.non_finite == 0 && threshold.is_none_or(|t| value <= t);
            if let Some(l) = c.logits {
                logits.push((id.step, l.finish()));
            }
            rows.push(StageRow {
                id,
                metrics,
                threshold,
                metric: thresholds.metric,
                pass,
                ours_provenance: c.ours_provenance,
                ref_provenance: c.ref_provenance,
                jump: None,
                jump_from: None,
            });
        }
        let compared: BTreeSet<StageId> = rows.iter().map(|r| r.id).collect();
        let unavailable: Vec<StageId> = self.unavailable.into_iter().filter(|id| !compared.contains(id)).collect();
        let missing: Vec<(StageId, String)> = self.missing.into_iter().collect();

        // Localization.
        let first_divergence = rows.iter().position(|r| !r.pass);
        let rel: BTreeMap<StageId, f64> = rows.iter().map(|r| (r.id, r.metrics.rel_l2)).collect();
        for row in &mut rows {
            if row.id.inputs(n_layer).is_empty() {
                // embed: its input is the token ids, exact on both sides.
                row.jump = Some(jump_ratio(row.metrics.rel_l2, 0.0));
            } else if let Some((x, from)) = input_error(&row.id, n_layer, &rel, 3) {
                row.jump = Some(jump_ratio(row.metrics.rel_l2, x));
                row.jump_from = Some(from);
            }
        }
        let mut largest_jump: Option<usize> = None;
        for (i, row) in rows.iter().enumerate() {
            if let Some(j) = row.jump {
                if largest_jump.is_none_or(|b| j > rows[b].jump.unwrap_or(f64::NEG_INFINITY)) {
                    largest_jump = Some(i);
                }
            }
        }

        let logits_kl_max = thresholds.logits_kl_max;
        let kl_ok = logits_kl_max.is_none_or(|gate| logits.iter().all(|(_, m)| m.kl_max <= gate));
        let verdict = if first_divergence.is_none() && missing.is_empty() && shape_mismatch.is_empty() && kl_ok {
            Verdict::Match
        } else {
            Verdict::Diverged
        };
        let kv_type = if ours.config.kv_type == reference.config.kv_type {
            ours.config.kv_type.clone()
        } else {
            format!("ours {}, reference {}", ours.config.kv_type, reference.config.kv_type)
        };
        DiffReport {
            ours_engine: ours.engine.clone(),
            reference_engine: reference.engine.clone(),
            prompt: reference.prompt.clone(),
            tokens: reference.tokens.clone(),
            model_sha256: if reference.model_sha256.is_empty() { ours.model_sha256.clone() } else { reference.model_sha256.clone() },
            kv_type,
            thresholds_source: thresholds.source.clone(),
            n_layer,
            rows,
            missing,
            unavailable,
            shape_mismatch,
            first_divergence,
            largest_jump,
            logits,
            logits_kl_max,
            verdict,
            comparison: if ours.config.fed == "teacher-forced" { "teacher-forced" } else { "free-running" }.to_string(),
            numerics: ours.config.numerics.clone(),
            free_running: None,
            diagnosis: None,
            drilldowns: Vec::new(),
            configuration: capture_configuration(ours, reference),
        }
    }
}

/// What the two captures record about how they were made, for the reports'
/// configuration section.
fn capture_configuration(ours: &Capture, reference: &Capture) -> Vec<(String, String)> {
    let (a, b) = (&ours.config, &reference.config);
    let both = |x: String, y: String| if x == y { x } else { format!("ours {x}, reference {y}") };
    let mut out = vec![(
        "architecture".to_string(),
        format!(
            "{} layers, hidden {}, {} heads ({} KV), head dim {}, FFN {}, vocab {}",
            b.n_layer, b.n_embd, b.n_head, b.n_head_kv, b.head_dim, b.n_ff, b.n_vocab
        ),
    )];
    out.push(("flash attention".into(), both(on_off(a.flash_attn), on_off(b.flash_attn))));
    out.push(("chat template".into(), both(on_off(ours.chat), on_off(reference.chat))));
    out.push(("decode steps".into(), both(a.n_decode.to_string(), b.n_decode.to_string())));
    let layers = |c: &capture::CaptureConfig| if c.layers.is_empty() { "all".to_string() } else { format!("{:?}", c.layers) };
    out.push(("layers captured".into(), both(layers(a), layers(b))));
    out.push(("reference threads".into(), b.threads.to_string()));
    if !reference.generated.is_empty() {
        out.push(("generated tokens (reference, greedy)".into(), format!("{:?}", reference.generated)));
    }
    out
}

fn on_off(x: bool) -> String {
    if x { "on" } else { "off" }.to_string()
}
