//! Checkpoints: what happens at each stage of the forward pass. One
//! mechanism with three uses: observe (capture), replace (isolation: feed a
//! reference tensor in so each op's own error is measured), perturb
//! (calibration and sensitivity). A checkpoint nobody wants costs a call to
//! `wants` and nothing else: no copy leaves the backend.

use capture::{Capture, CapturedTensor, Tensor};
use capture::stage::{Stage, StageId};
use anyhow::Result;
use std::collections::BTreeMap;

pub trait Checkpoints {
    /// Whether the forward pass should bring this tensor to the host.
    fn wants(&self, id: &StageId) -> bool;
    /// Sees the host copy; returning `Some` replaces the tensor the forward pass continues with.
    fn visit(&mut self, id: &StageId, tensor: Tensor) -> Result<Option<Tensor>>;
    /// Whether `visit` may replace this tensor. When it never does, the
    /// forward pass need not wait for the copy: it is started and the
    /// tensor visited once the pass is done (`Backend::start_to_host`).
    fn may_replace(&self, _id: &StageId) -> bool {
        true
    }
    /// What the pass does with `layer` of `step`: compute it unless the
    /// checkpoints need nothing from it. The plan of a layer must be the
    /// same in every step (a layer skipped in the prefill has no KV cache).
    fn layer_plan(&self, _step: usize, _layer: usize) -> LayerPlan {
        LayerPlan::Run
    }
    /// True only when `wants` is false for every stage and every layer
    /// runs: the pass is what a plain engine runs (and a backend may replay
    /// a recording of it).
    fn observes_nothing(&self) -> bool {
        false
    }
}

/// What the forward pass does with one layer.
#[derive(Debug)]
pub enum LayerPlan {
    /// Compute it.
    Run,
    /// Do not compute it: continue with this tensor as its output.
    Given(Tensor),
    /// Do not compute it: a later layer's given output replaces whatever it
    /// would have produced before anything reads it.
    Skip,
    /// End the pass before this layer: nothing from here on is wanted (no
    /// logits, so no greedy token either).
    Stop,
}

/// No checkpoints: the forward pass at full speed.
pub struct NoCheckpoints;

impl Checkpoints for NoCheckpoints {
    fn wants(&self, _: &StageId) -> bool {
        false
    }
    fn observes_nothing(&self) -> bool {
        true
    }
    fn visit(&mut self, _: &StageId, _: Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// Which checkpoints to act on: all, or only some layers (globals always).
#[derive(Clone, Debug, Default)]
pub struct StageFilter {
    pub layers: Option<Vec<usize>>,
}

impl StageFilter {
    pub fn accepts(&self, id: &StageId) -> bool {
        match (&self.layers, id.layer) {
            (Some(layers), Some(l)) => layers.contains(&l),
            _ => true,
        }
    }
}

/// Observe: record every accepted checkpoint.
#[derive(Default)]
pub struct Recorder {
    pub filter: StageFilter,
    pub provenance: String,
    pub tensors: BTreeMap<StageId, CapturedTensor>,
    /// End the pass after this layer (the last one anybody compares).
    pub end_after: Option<usize>,
}

impl Recorder {
    pub fn new(filter: StageFilter, provenance: impl Into<String>) -> Self {
        Recorder { filter, provenance: provenance.into(), tensors: BTreeMap::new(), end_after: None }
    }

    /// Whether the stages of `layer` are recorded.
    fn wants_layer(&self, layer: usize) -> bool {
        self.filter.layers.as_ref().is_none_or(|ls| ls.contains(&layer))
    }
}

impl Checkpoints for Recorder {
    fn wants(&self, id: &StageId) -> bool {
        self.filter.accepts(id)
    }
    fn may_replace(&self, _id: &StageId) -> bool {
        false
    }
    fn layer_plan(&self, _step: usize, layer: usize) -> LayerPlan {
        match self.end_after {
            Some(last) if layer > last => LayerPlan::Stop,
            _ => LayerPlan::Run,
        }
    }
    fn visit(&mut self, id: &StageId, tensor: Tensor) -> Result<Option<Tensor>> {
        self.tensors.insert(*id, CapturedTensor { tensor, provenance: self.provenance.clone() });
        Ok(None)
    }
}

/// Record as [`Recorder`] does, but say every stage may be replaced (none
/// ever is): the forward pass then runs each stage's own op instead of the
/// fused op that would hand the stage back. The tensors of the separate
/// ops, for checking that the fused ops keep the same bits.
pub struct SeparateOps(pub Recorder);

impl Checkpoints for SeparateOps {
    fn wants(&self, id: &StageId) -> bool {
        self.0.wants(id)
    }
    fn layer_plan(&self, step: usize, layer: usize) -> LayerPlan {
        self.0.layer_plan(step, layer)
    }
    fn visit(&mut self, id: &StageId, tensor: Tensor) -> Result<Option<Tensor>> {
        self.0.visit(id, tensor)
    }
}

/// Replace (isolation): record our tensor, then continue with the
/// reference's. Every recorded tensor is then one op applied to the
/// reference's own inputs, so its error is that op's local error alone.
pub struct Isolate<'a> {
    pub reference: &'a Capture,
    pub recorder: Recorder,
}

impl Checkpoints for Isolate<'_> {
    fn wants(&self, id: &StageId) -> bool {
        // Every stage with a reference tensor must be replaced, recorded or not.
        self.recorder.wants(id) || self.reference.get(id).is_some()
    }
    /// A layer nobody records need not run when the reference gives its
    /// output, or a later unrecorded layer's output that replaces it: only
    /// the recorded layers and the globals are computed.
    fn layer_plan(&self, step: usize, layer: usize) -> LayerPlan {
        if self.recorder.end_after.is_some_and(|last| layer > last) {
            return LayerPlan::Stop;
        }
        let n_layer = self.reference.config.n_layer;
        for l in layer..n_layer {
            if self.recorder.wants_layer(l) {
                return LayerPlan::Run;
            }
            if let Some(out) = self.reference.get(&StageId::layer(step, l, Stage::LayerOut)) {
                return if l == layer { LayerPlan::Given(out.clone()) } else { LayerPlan::Skip };
            }
        }
        LayerPlan::Run
    }
    fn visit(&mut self, id: &StageId, tensor: Tensor) -> Result<Option<Tensor>> {
        // Nothing reads the logits after their checkpoint (the next step's
        // token is forced): ours go on, sparing a vocabulary-wide copy.
        let Some(reference) = self.reference.get(id).filter(|_| id.stage != Stage::Logits) else {
            if self.recorder.wants(id) {
                self.recorder.visit(id, tensor)?;
            }
            return Ok(None);
        };
        // The reference defines only the causal part of attn_scores (zeros
        // beyond it): ours keeps whatever its scores op put past the causal
        // limit, so a missing or shifted mask still acts downstream.
        let replacement = match (id.stage, &tensor.shape[..], &reference.shape[..]) {
            (Stage::AttnScores, &[h, n_t, n_kv], r) if r == tensor.shape.as_slice() && n_t <= n_kv => {
                let mut merged = tensor.clone();
                for (i, (m, r)) in merged.data.chunks_mut(n_kv).zip(reference.data.chunks(n_kv)).enumerate().take(h * n_t) {
                    let limit = capture::causal_keys(n_t, n_kv, i % n_t);
                    m[..limit].copy_from_slice(&r[..limit]);
                }
                merged
            }
            _ => reference.clone(),
        };
        if self.recorder.wants(id) {
            self.recorder.visit(id, tensor)?;
        }
        Ok(Some(replacement))
    }
}

/// splitmix64: advance `state` and return the next value of a fixed,
/// dependency-free pseudo-random sequence (perturbations, selftest's draws).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Perturb: add `magnitude * (deterministic pseudo-random in [-1, 1))` to
/// every element at one checkpoint, then observe the rest. Used to check
/// that a disturbance of a known size is seen where it is made.
pub struct Perturb {
    pub at: StageId,
    pub magnitude: f32,
    pub seed: u64,
    pub recorder: Recorder,
}

impl Checkpoints for Perturb {
    fn wants(&self, id: &StageId) -> bool {
        *id == self.at || self.recorder.wants(id)
    }
    fn visit(&mut self, id: &StageId, mut tensor: Tensor) -> Result<Option<Tensor>> {
        let replaced = if *id == self.at {
            let mut state = self.seed;
            for v in tensor.data.iter_mut() {
                let z = splitmix64(&mut state);
                let unit = (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                *v += self.magnitude * unit as f32;
            }
            Some(tensor.clone())
        } else {
            None
        };
        if self.recorder.wants(id) {
            self.recorder.visit(id, tensor)?;
        }
        Ok(replaced)
    }
}
