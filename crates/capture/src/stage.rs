//! The stage catalogue: the one list of checkpoints that the engine, the
//! llama.cpp mapping, the diff and every report share. Everything a stage
//! carries (name, meaning, canonical layout, the llama.cpp node it is, what
//! usually breaks there, which stages feed it, where reports show it) is in
//! [`CATALOGUE`]; nothing outside this file lists stages.
//!
//! Canonical layouts are row-major f32, tokens outermost, per forward pass of
//! `n_tokens` tokens with `n_kv` cache positions filled after the pass (see
//! [`Layout`]). `attn_scores` is the raw Q·K^T before scale and mask; entries
//! a query may not attend to (key position > query position) are set to 0 on
//! both sides, so only the causal part is ever compared.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Embed,
    AttnNorm,
    QProj,
    KProj,
    VProj,
    QRope,
    KRope,
    AttnScores,
    AttnProbs,
    AttnCtx,
    AttnOut,
    AttnResidual,
    FfnNorm,
    FfnGate,
    FfnUp,
    FfnAct,
    FfnDown,
    LayerOut,
    FinalNorm,
    Logits,
}

/// Model dimensions the canonical layouts are built from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dims {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
}

impl Dims {
    /// All dimensions known (a dump written by hand may leave them 0).
    pub fn is_complete(&self) -> bool {
        self.as_array().iter().all(|&x| x > 0)
    }

    /// (layers, embd, heads, kv heads, head dim, ff, vocab), for messages.
    pub fn as_array(&self) -> [usize; 7] {
        [self.n_layer, self.n_embd, self.n_head, self.n_head_kv, self.head_dim, self.n_ff, self.n_vocab]
    }
}

/// The canonical layout of a stage's tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[n_tokens, n_embd]`: the residual stream and its norms.
    Hidden,
    /// `[n_tokens, n_head, head_dim]`.
    QHeads,
    /// `[n_tokens, n_head_kv, head_dim]`.
    KvHeads,
    /// `[n_head, n_tokens, n_kv]`, zero beyond the causal limit.
    Attention,
    /// `[n_tokens, n_ff]`.
    Ffn,
    /// `[n_tokens, n_vocab]`.
    Vocab,
}

impl Layout {
    pub fn shape(self, d: &Dims, n_tokens: usize, n_kv: usize) -> Vec<usize> {
        match self {
            Layout::Hidden => vec![n_tokens, d.n_embd],
            Layout::QHeads => vec![n_tokens, d.n_head, d.head_dim],
            Layout::KvHeads => vec![n_tokens, d.n_head_kv, d.head_dim],
            Layout::Attention => vec![d.n_head, n_tokens, n_kv],
            Layout::Ffn => vec![n_tokens, d.n_ff],
            Layout::Vocab => vec![n_tokens, d.n_vocab],
        }
    }

    /// Elements per "row": a token's row (everything after the token axis),
    /// or for attention one query's row over the keys. Scale-free gates
    /// look at the worst row, so one outlier token cannot set the scale for
    /// every other token.
    pub fn row_width(self, shape: &[usize]) -> usize {
        match self {
            Layout::Attention => shape.last().copied().unwrap_or(1),
            _ => shape.iter().skip(1).product(),
        }
    }

    /// What each axis of the shape indexes, outermost first.
    pub fn axes(self) -> &'static [&'static str] {
        match self {
            Layout::Hidden => &["token", "dim"],
            Layout::QHeads | Layout::KvHeads => &["token", "head", "dim"],
            Layout::Attention => &["head", "query", "key"],
            Layout::Ffn => &["token", "unit"],
            Layout::Vocab => &["token", "vocab"],
        }
    }
}

/// How many keys query `t` of a pass of `n_tokens` may attend when `n_kv`
/// cache positions are filled after it (the causal part of an attention row):
/// the query sits at position `n_kv - n_tokens + t`.
pub fn causal_keys(n_tokens: usize, n_kv: usize, t: usize) -> usize {
    n_kv - n_tokens + t + 1
}

/// Where a stage's input comes from, within the same forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Another stage of the same layer (or a global stage, for globals).
    Stage(Stage),
    /// The layer's input: `embed` for layer 0, else the previous `layer_out`.
    LayerInput,
    /// The last layer's `layer_out` (for `final_norm`).
    LastLayerOut,
}

/// The group a stage is drawn with in the reports' error-growth charts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Global,
    ResidualStream,
    Attention,
    Ffn,
}

impl Family {
    pub const CHARTED: [Family; 3] = [Family::ResidualStream, Family::Attention, Family::Ffn];

    pub fn title(self) -> &'static str {
        match self {
            Family::Global => "global",
            Family::ResidualStream => "residual stream",
            Family::Attention => "attention",
            Family::Ffn => "FFN",
        }
    }
}

/// Everything the tool knows about one stage.
#[derive(Clone, Copy, Debug)]
pub struct StageInfo {
    pub stage: Stage,
    pub name: &'static str,
    /// What the tensor is.
    pub meaning: &'static str,
    pub layout: Layout,
    /// The llama.cpp graph node it is captured from (flash attention off).
    pub llama_node: &'static str,
    /// What a reader of a report should suspect when this stage is the first
    /// to diverge: the op that produced it and its usual bugs.
    pub what_to_check: &'static str,
    pub inputs: &'static [Input],
    /// Only observable when attention is computed explicitly (not under
    /// llama.cpp's flash attention).
    pub attention_internal: bool,
    /// Shown as a column of the compact per-step tables.
    pub key: bool,
    pub family: Family,
}

#[allow(clippy::too_many_arguments)] // one catalogue row: every field named at the call
const fn info(
    stage: Stage,
    name: &'static str,
    meaning: &'static str,
    layout: Layout,
    llama_node: &'static str,
    what_to_check: &'static str,
    inputs: &'static [Input],
    key: bool,
    family: Family,
) -> StageInfo {
    let attention_internal = matches!(stage, Stage::AttnScores | Stage::AttnProbs);
    StageInfo { stage, name, meaning, layout, llama_node, what_to_check, inputs, attention_internal, key, family }
}

use Family::{Attention as FAttn, Ffn as FFfn, Global as FGlobal, ResidualStream as FResid};
use Input::{LastLayerOut, LayerInput, Stage as S};

const NORM_CHECK: &str = "RMSNorm: mean of squares over the hidden dim, eps, multiply by the norm weight";
const PROJ_CHECK: &str = "Q/K/V projection: weight transpose, weight dequantization, the bias add";
const ROPE_CHECK: &str = "RoPE: NEOX pairing (i, i + head_dim/2), rope base, positions (cache offset in decode)";

/// The catalogue, in execution order: `embed`, the per-layer stages, then
/// `final_norm` and `logits`. Indexed by `Stage as usize`.
pub const CATALOGUE: [StageInfo; 20] = [
    info(Stage::Embed, "embed", "token embedding rows", Layout::Hidden, "embd (GET_ROWS)",
        "token embedding lookup (row index = token id, dequantization of token_embd)", &[], false, FGlobal),
    info(Stage::AttnNorm, "attn_norm", "RMSNorm(x) * w before attention", Layout::Hidden, "attn_norm-L (MUL)",
        NORM_CHECK, &[LayerInput], true, FResid),
    info(Stage::QProj, "q_proj", "x W_q^T + b_q", Layout::QHeads, "Qcur-L (the bias ADD)",
        PROJ_CHECK, &[S(Stage::AttnNorm)], false, FAttn),
    info(Stage::KProj, "k_proj", "x W_k^T + b_k", Layout::KvHeads, "Kcur-L (the bias ADD)",
        PROJ_CHECK, &[S(Stage::AttnNorm)], false, FAttn),
    info(Stage::VProj, "v_proj", "x W_v^T + b_v", Layout::KvHeads, "Vcur-L (the bias ADD)",
        PROJ_CHECK, &[S(Stage::AttnNorm)], true, FAttn),
    info(Stage::QRope, "q_rope", "Q after RoPE", Layout::QHeads, "Qcur-L (ROPE)",
        ROPE_CHECK, &[S(Stage::QProj)], true, FAttn),
    info(Stage::KRope, "k_rope", "K after RoPE", Layout::KvHeads, "Kcur-L (ROPE)",
        ROPE_CHECK, &[S(Stage::KProj)], true, FAttn),
    info(Stage::AttnScores, "attn_scores", "raw Q K^T per head, before scale and mask", Layout::Attention, "kq-L",
        "Q·K^T: GQA head map (q head h uses kv head h / (n_head/n_head_kv)), KV-cache offsets",
        &[S(Stage::QRope), S(Stage::KRope)], false, FAttn),
    info(Stage::AttnProbs, "attn_probs", "softmax(scale * scores + causal mask)", Layout::Attention, "kq_soft_max-L",
        "softmax: scale 1/sqrt(head_dim), causal mask, max subtraction", &[S(Stage::AttnScores)], true, FAttn),
    info(Stage::AttnCtx, "attn_ctx", "probs V, heads merged, before W_o", Layout::QHeads, "kqv_out-L",
        "probs·V: V layout in the cache, GQA head map, head merge order",
        &[S(Stage::AttnProbs), S(Stage::VProj)], true, FAttn),
    info(Stage::AttnOut, "attn_out", "ctx W_o^T", Layout::Hidden, "MUL_MAT on blk.L.attn_output.weight",
        "attention output projection (attn_output.weight, no bias)", &[S(Stage::AttnCtx)], true, FAttn),
    info(Stage::AttnResidual, "attn_residual", "x + attn_out", Layout::Hidden, "ffn_inp-L",
        "residual add: layer input + attn_out", &[S(Stage::AttnOut), LayerInput], false, FResid),
    info(Stage::FfnNorm, "ffn_norm", "RMSNorm(attn_residual) * w", Layout::Hidden, "ffn_norm-L (MUL)",
        NORM_CHECK, &[S(Stage::AttnResidual)], false, FResid),
    info(Stage::FfnGate, "ffn_gate", "x W_gate^T", Layout::Ffn, "ffn_gate-L",
        "FFN gate/up projections: weight transpose and dequantization", &[S(Stage::FfnNorm)], false, FFfn),
    info(Stage::FfnUp, "ffn_up", "x W_up^T", Layout::Ffn, "ffn_up-L",
        "FFN gate/up projections: weight transpose and dequantization", &[S(Stage::FfnNorm)], false, FFfn),
    info(Stage::FfnAct, "ffn_act", "silu(gate) * up", Layout::Ffn, "ffn_swiglu-L",
        "SwiGLU: silu(gate) * up (gate and up swapped?)", &[S(Stage::FfnGate), S(Stage::FfnUp)], true, FFfn),
    info(Stage::FfnDown, "ffn_down", "act W_down^T", Layout::Hidden, "ffn_out-L (MUL_MAT on ffn_down.weight)",
        "FFN down projection", &[S(Stage::FfnAct)], true, FFfn),
    info(Stage::LayerOut, "layer_out", "attn_residual + ffn_down", Layout::Hidden, "l_out-L",
        "residual add: attn_residual + ffn_down", &[S(Stage::AttnResidual), S(Stage::FfnDown)], true, FResid),
    info(Stage::FinalNorm, "final_norm", "RMSNorm of the last layer's output", Layout::Hidden, "result_norm",
        NORM_CHECK, &[LastLayerOut], false, FGlobal),
    info(Stage::Logits, "logits", "the LM head's output", Layout::Vocab, "result_output",
        "LM head: output.weight, or token_embd when tied", &[S(Stage::FinalNorm)], false, FGlobal),
];

impl Stage {
    /// Per-layer stages in execution order.
    pub const PER_LAYER: [Stage; 17] = [
        Stage::AttnNorm,
        Stage::QProj,
        Stage::KProj,
        Stage::VProj,
        Stage::QRope,
        Stage::KRope,
        Stage::AttnScores,
        Stage::AttnProbs,
        Stage::AttnCtx,
        Stage::AttnOut,
        Stage::AttnResidual,
        Stage::FfnNorm,
        Stage::FfnGate,
        Stage::FfnUp,
        Stage::FfnAct,
        Stage::FfnDown,
        Stage::LayerOut,
    ];

    /// Stages outside the layers: `Embed` before layer 0, the others after the last layer.
    pub const GLOBAL: [Stage; 3] = [Stage::Embed, Stage::FinalNorm, Stage::Logits];

    /// Every stage, in catalogue order.
    pub fn all() -> impl Iterator<Item = Stage> {
        CATALOGUE.iter().map(|i| i.stage)
    }

    pub fn info(self) -> &'static StageInfo {
        &CATALOGUE[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    pub fn from_name(name: &str) -> Option<Stage> {
        CATALOGUE.iter().find(|i| i.name == name).map(|i| i.stage)
    }

    pub fn is_global(self) -> bool {
        self.info().family == Family::Global
    }

    pub fn what_to_check(self) -> &'static str {
        self.info().what_to_check
    }

    pub fn layout(self) -> Layout {
        self.info().layout
    }

    /// Stages shown as columns of the compact per-step tables.
    pub fn key_stages() -> impl Iterator<Item = Stage> {
        CATALOGUE.iter().filter(|i| i.key).map(|i| i.stage)
    }

    /// Per-layer stages of one chart family, in execution order.
    pub fn of_family(family: Family) -> impl Iterator<Item = Stage> {
        CATALOGUE.iter().filter(move |i| i.family == family).map(|i| i.stage)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One checkpoint of one forward pass. `step` 0 is the prefill, step k > 0
/// the k-th decode step; `layer` is `None` for global stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StageId {
    pub step: usize,
    pub layer: Option<usize>,
    pub stage: Stage,
}

impl StageId {
    pub fn global(step: usize, stage: Stage) -> Self {
        StageId { step, layer: None, stage }
    }

    pub fn layer(step: usize, layer: usize, stage: Stage) -> Self {
        StageId { step, layer: Some(layer), stage }
    }

    /// Position in execution order: step, then embed, layers in order with
    /// their stages in order, then final_norm and logits.
    pub fn exec_key(&self) -> (usize, usize, usize) {
        let stage_pos = self.stage as usize;
        match (self.layer, self.stage) {
            (_, Stage::Embed) => (self.step, 0, 0),
            (Some(l), _) => (self.step, 1 + l, stage_pos),
            (None, _) => (self.step, usize::MAX, stage_pos),
        }
    }

    /// Every checkpoint of one step in execution order, for `n_layer` layers.
    pub fn all_in_step(step: usize, n_layer: usize) -> Vec<StageId> {
        Self::in_step(step, 0..n_layer)
    }

    /// The checkpoints of one step for the given layers (globals always).
    pub fn in_step(step: usize, layers: impl IntoIterator<Item = usize>) -> Vec<StageId> {
        let mut ids = vec![StageId::global(step, Stage::Embed)];
        for layer in layers {
            ids.extend(Stage::PER_LAYER.iter().map(|&s| StageId::layer(step, layer, s)));
        }
        ids.push(StageId::global(step, Stage::FinalNorm));
        ids.push(StageId::global(step, Stage::Logits));
        ids
    }

    /// Checkpoints whose output feeds this one within the same step (the KV
    /// cache of earlier steps is not counted), from the catalogue's inputs.
    pub fn inputs(&self, n_layer: usize) -> Vec<StageId> {
        let step = self.step;
        let layer_in = |l: usize| {
            if l == 0 {
                StageId::global(step, Stage::Embed)
            } else {
                StageId::layer(step, l - 1, Stage::LayerOut)
            }
        };
        self.stage
            .info()
            .inputs
            .iter()
            .map(|input| match (*input, self.layer) {
                (Input::Stage(s), Some(l)) => StageId::layer(step, l, s),
                (Input::Stage(s), None) => StageId::global(step, s),
                (Input::LayerInput, l) => layer_in(l.unwrap_or(0)),
                (Input::LastLayerOut, _) if n_layer > 0 => StageId::layer(step, n_layer - 1, Stage::LayerOut),
                (Input::LastLayerOut, _) => StageId::global(step, Stage::Embed),
            })
            .collect()
    }
}

impl PartialOrd for StageId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for StageId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.exec_key().cmp(&other.exec_key())
    }
}

impl fmt::Display for StageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let step = if self.step == 0 { "prefill".to_string() } else { format!("decode {}", self.step) };
        match self.layer {
            Some(l) => write!(f, "{step}, layer {l}, {}", self.stage),
            None => write!(f, "{step}, {}", self.stage),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_is_indexed_by_stage_and_in_execution_order() {
        for (i, info) in CATALOGUE.iter().enumerate() {
            assert_eq!(info.stage as usize, i, "{} out of place", info.name);
        }
        let per_layer: Vec<Stage> = CATALOGUE.iter().filter(|i| i.family != Family::Global).map(|i| i.stage).collect();
        assert_eq!(per_layer, Stage::PER_LAYER);
        let global: Vec<Stage> = CATALOGUE.iter().filter(|i| i.family == Family::Global).map(|i| i.stage).collect();
        assert_eq!(global, Stage::GLOBAL);
    }

    #[test]
    fn names_round_trip_and_are_unique() {
        let all: Vec<Stage> = Stage::all().collect();
        assert_eq!(all.len(), 20);
        for s in &all {
            assert_eq!(Stage::from_name(s.name()), Some(*s));
        }
        let mut names: Vec<_> = all.iter().map(|s| s.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 20);
    }

    #[test]
    fn every_input_runs_before_its_stage() {
        for step in 0..2 {
            for id in StageId::all_in_step(step, 3) {
                for input in id.inputs(3) {
                    assert!(input < id, "{input} feeds {id} but comes after it");
                }
            }
        }
        let g = |s| StageId::global(0, s);
        assert_eq!(StageId::layer(0, 0, Stage::AttnNorm).inputs(3), vec![g(Stage::Embed)]);
        assert_eq!(
            StageId::layer(0, 2, Stage::AttnResidual).inputs(3),
            vec![StageId::layer(0, 2, Stage::AttnOut), StageId::layer(0, 1, Stage::LayerOut)]
        );
        assert_eq!(g(Stage::FinalNorm).inputs(3), vec![StageId::layer(0, 2, Stage::LayerOut)]);
        assert!(g(Stage::Embed).inputs(3).is_empty());
    }

    #[test]
    fn execution_order() {
        let ids = StageId::all_in_step(1, 2);
        assert_eq!(ids.len(), 3 + 2 * 17);
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert!(StageId::global(0, Stage::Logits) < StageId::global(1, Stage::Embed));
        assert!(StageId::layer(0, 0, Stage::LayerOut) < StageId::layer(0, 1, Stage::AttnNorm));
    }

    #[test]
    fn layouts() {
        let d = Dims { n_layer: 2, n_embd: 8, n_head: 4, n_head_kv: 2, head_dim: 2, n_ff: 16, n_vocab: 50 };
        assert_eq!(Stage::AttnScores.layout().shape(&d, 3, 5), vec![4, 3, 5]);
        assert_eq!(Stage::KRope.layout().shape(&d, 3, 5), vec![3, 2, 2]);
        assert_eq!(Stage::Logits.layout().shape(&d, 3, 5), vec![3, 50]);
        for info in &CATALOGUE {
            assert_eq!(info.layout.axes().len(), info.layout.shape(&d, 1, 1).len());
        }
    }
}
