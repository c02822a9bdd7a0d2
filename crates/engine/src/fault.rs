//! Fault variants: the bugs that make engines print fluent garbage, as
//! alternative op variants behind one switch. Both backends implement every
//! variant the same way, so a seeded fault must be localized on either.

use std::fmt;

/// Which element pairs RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RopePairing {
    /// Qwen2's pairing: (i, i + head_dim/2).
    #[default]
    Neox,
    /// GPT-J / LLaMA-style adjacent pairs (2i, 2i + 1): wrong for Qwen2.
    Adjacent,
}

/// Which KV head a query head reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HeadMap {
    /// kv head = h / (n_head / n_head_kv): consecutive query heads share a KV head.
    #[default]
    Grouped,
    /// kv head = h % n_head_kv: the classic wrong GQA map.
    Modulo,
}

/// The one fault switch. `None` is the correct engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// RoPE with adjacent pairs instead of NEOX.
    RopeAdjacent,
    /// GQA head map h % n_head_kv instead of h / group.
    GqaModulo,
    /// Q/K/V projections without their biases.
    NoQkvBias,
    /// silu(up) * gate instead of silu(gate) * up.
    SwigluSwapped,
    /// Attention scores not scaled by 1/sqrt(head_dim).
    NoAttnScale,
    /// Decode steps write K/V one cache slot late (a KV-cache offset bug):
    /// invisible in the prefill, wrong from the first decode step on.
    KvOffset,
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::None,
        Fault::RopeAdjacent,
        Fault::GqaModulo,
        Fault::NoQkvBias,
        Fault::SwigluSwapped,
        Fault::NoAttnScale,
        Fault::KvOffset,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::RopeAdjacent => "rope-adjacent",
            Fault::GqaModulo => "gqa-modulo",
            Fault::NoQkvBias => "no-qkv-bias",
            Fault::SwigluSwapped => "swiglu-swapped",
            Fault::NoAttnScale => "no-attn-scale",
            Fault::KvOffset => "kv-offset",
        }
    }

    pub fn parse(name: &str) -> Option<Fault> {
        Self::ALL.iter().copied().find(|f| f.name() == name)
    }

    pub fn rope_pairing(self) -> RopePairing {
        if self == Fault::RopeAdjacent {
            RopePairing::Adjacent
        } else {
            RopePairing::Neox
        }
    }

    pub fn head_map(self) -> HeadMap {
        if self == Fault::GqaModulo {
            HeadMap::Modulo
        } else {
            HeadMap::Grouped
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
