//! The stage catalogue: the one list of checkpoints that the engine, the
//! llama.cpp mapping, the diff and every report share.
//!
//! Canonical layouts (row-major f32, tokens outermost), per forward pass of
//! `n_tokens` tokens with `n_kv` cache positions filled after the pass:
//!
//! | stage | shape |
//! |---|---|
//! | embed, attn_norm, attn_out, attn_residual, ffn_norm, ffn_down, layer_out, final_norm | `[n_tokens, n_embd]` |
//! | q_proj, q_rope, attn_ctx | `[n_tokens, n_head, head_dim]` |
//! | k_proj, v_proj, k_rope | `[n_tokens, n_head_kv, head_dim]` |
//! | attn_scores, attn_probs | `[n_head, n_tokens, n_kv]`, zero beyond the causal limit |
//! | ffn_gate, ffn_up, ffn_act | `[n_tokens, n_ff]` |
//! | logits | `[n_tokens, n_vocab]` |
//!
//! `attn_scores` is the raw Q·K^T before scale and mask; entries a query may
//! not attend to (key position > query position) are set to 0 on both sides,
//! so only the causal part is ever compared.

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

    /// Stages that only exist when attention is computed explicitly; with
    /// llama.cpp's flash attention they are not observable.
    pub const ATTENTION_INTERNAL: [Stage; 2] = [Stage::AttnScores, Stage::AttnProbs];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Embed => "embed",
            Stage::AttnNorm => "attn_norm",
            Stage::QProj => "q_proj",
            Stage::KProj => "k_proj",
            Stage::VProj => "v_proj",
            Stage::QRope => "q_rope",
            Stage::KRope => "k_rope",
            Stage::AttnScores => "attn_scores",
            Stage::AttnProbs => "attn_probs",
            Stage::AttnCtx => "attn_ctx",
            Stage::AttnOut => "attn_out",
            Stage::AttnResidual => "attn_residual",
            Stage::FfnNorm => "ffn_norm",
            Stage::FfnGate => "ffn_gate",
            Stage::FfnUp => "ffn_up",
            Stage::FfnAct => "ffn_act",
            Stage::FfnDown => "ffn_down",
            Stage::LayerOut => "layer_out",
            Stage::FinalNorm => "final_norm",
            Stage::Logits => "logits",
        }
    }

    pub fn from_name(name: &str) -> Option<Stage> {
        Self::PER_LAYER
            .iter()
            .chain(Self::GLOBAL.iter())
            .copied()
            .find(|s| s.name() == name)
    }

    pub fn is_global(self) -> bool {
        Self::GLOBAL.contains(&self)
    }

    /// What a reader of a report should suspect when this stage is the first
    /// to diverge: the op that produced it.
    pub fn what_to_check(self) -> &'static str {
        match self {
            Stage::Embed => "token embedding lookup (row index = token id, dequantization of token_embd)",
            Stage::AttnNorm | Stage::FfnNorm | Stage::FinalNorm => {
                "RMSNorm: mean of squares over the hidden dim, eps, multiply by the norm weight"
            }
            Stage::QProj | Stage::KProj | Stage::VProj => {
                "Q/K/V projection: weight transpose, weight dequantization, the bias add"
            }
            Stage::QRope | Stage::KRope => {
                "RoPE: NEOX pairing (i, i + head_dim/2), rope base, positions (cache offset in decode)"
            }
            Stage::AttnScores => "Q·K^T: GQA head map (q head h uses kv head h / (n_head/n_head_kv)), KV-cache offsets",
            Stage::AttnProbs => "softmax: scale 1/sqrt(head_dim), causal mask, max subtraction",
            Stage::AttnCtx => "probs·V: V layout in the cache, GQA head map, head merge order",
            Stage::AttnOut => "attention output projection (attn_output.weight, no bias)",
            Stage::AttnResidual => "residual add: layer input + attn_out",
            Stage::FfnGate | Stage::FfnUp => "FFN gate/up projections: weight transpose and dequantization",
            Stage::FfnAct => "SwiGLU: silu(gate) * up (gate and up swapped?)",
            Stage::FfnDown => "FFN down projection",
            Stage::LayerOut => "residual add: attn_residual + ffn_down",
            Stage::Logits => "LM head: output.weight, or token_embd when tied",
        }
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
        let stage_pos = |s: Stage| Stage::PER_LAYER.iter().position(|&p| p == s).unwrap_or(0);
        match (self.layer, self.stage) {
            (_, Stage::Embed) => (self.step, 0, 0),
            (Some(l), s) => (self.step, 1 + l, stage_pos(s)),
            (None, Stage::FinalNorm) => (self.step, usize::MAX, 0),
            (None, _) => (self.step, usize::MAX, 1),
        }
    }

    /// Every checkpoint of one step in execution order, for `n_layer` layers.
    pub fn all_in_step(step: usize, n_layer: usize) -> Vec<StageId> {
        let mut ids = vec![StageId::global(step, Stage::Embed)];
        for layer in 0..n_layer {
            ids.extend(Stage::PER_LAYER.iter().map(|&s| StageId::layer(step, layer, s)));
        }
        ids.push(StageId::global(step, Stage::FinalNorm));
        ids.push(StageId::global(step, Stage::Logits));
        ids
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
    fn names_round_trip_and_are_unique() {
        let all: Vec<Stage> = Stage::PER_LAYER.iter().chain(Stage::GLOBAL.iter()).copied().collect();
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
    fn execution_order() {
        let ids = StageId::all_in_step(1, 2);
        assert_eq!(ids.len(), 3 + 2 * 17);
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert!(StageId::global(0, Stage::Logits) < StageId::global(1, Stage::Embed));
        assert!(StageId::layer(0, 0, Stage::LayerOut) < StageId::layer(0, 1, Stage::AttnNorm));
    }
}
