//! The architecture seam: what varies between Qwen2-family models and close
//! relatives, in one description the forward pass reads. Qwen2 is the one
//! description today. Llama would be `qkv_bias: false, rope: Adjacent`;
//! Qwen3 would be `qkv_bias: false` plus a per-head q/k RMSNorm, which adds
//! two stages (q_norm, k_norm) to the catalogue, one branch here and one op
//! call in the forward pass: a new description, not a fork.

use crate::fault::RopePairing;
use gguf::Qwen2Config;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchSpec {
    /// `general.architecture` of the GGUF.
    pub name: &'static str,
    /// Q, K and V projections carry biases (`blk.L.attn_{q,k,v}.bias`).
    pub qkv_bias: bool,
    /// Which pairs RoPE rotates.
    pub rope: RopePairing,
    /// The LM head is `token_embd.weight` (no `output.weight`).
    pub tied_output: bool,
}

impl ArchSpec {
    pub fn qwen2(cfg: &Qwen2Config) -> ArchSpec {
        ArchSpec { name: "qwen2", qkv_bias: true, rope: RopePairing::Neox, tied_output: cfg.tied_output }
    }
}
