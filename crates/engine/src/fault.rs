//! The fault catalogue: the bugs that make engines print fluent garbage, as
//! alternative op variants behind one switch. Both backends implement every
//! variant the same way, so a seeded fault must be localized on either. Each
//! entry says which real bug it models, the op it changes and where a correct
//! tool must first see it; the engine, the tests and the CLI all read this.

use capture::Stage;
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
    RopeAdjacent,
    GqaModulo,
    NoQkvBias,
    SwigluSwapped,
    NoAttnScale,
    KvOffset,
}

/// In which forward pass a fault first shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstStep {
    /// The prefill (step 0).
    Prefill,
    /// The first decode step (step 1): the prefill is untouched.
    FirstDecode,
}

impl FirstStep {
    pub fn index(self) -> usize {
        match self {
            FirstStep::Prefill => 0,
            FirstStep::FirstDecode => 1,
        }
    }
}

/// One entry of the catalogue.
#[derive(Clone, Copy, Debug)]
pub struct FaultInfo {
    pub fault: Fault,
    pub name: &'static str,
    /// The real bug it models, in one line.
    pub models: &'static str,
    /// The op whose code it changes.
    pub op: &'static str,
    /// Where a correct tool names it first: the step, and the stage in the
    /// first layer it acts on. `None` for the correct engine.
    pub expected: Option<(FirstStep, Stage)>,
}

const fn entry(fault: Fault, name: &'static str, models: &'static str, op: &'static str, expected: Option<(FirstStep, Stage)>) -> FaultInfo {
    FaultInfo { fault, name, models, op, expected }
}

use FirstStep::{FirstDecode, Prefill};

/// Indexed by `Fault as usize`.
pub const FAULTS: [FaultInfo; 7] = [
    entry(Fault::None, "none", "the correct engine", "-", None),
    entry(Fault::RopeAdjacent, "rope-adjacent", "RoPE rotating adjacent pairs (2i, 2i+1), as GPT-J/LLaMA, instead of Qwen2's NEOX pairs (i, i+d/2)",
        "rope", Some((Prefill, Stage::QRope))),
    entry(Fault::GqaModulo, "gqa-modulo", "GQA head map h % n_head_kv instead of h / (n_head / n_head_kv)",
        "attn_scores, attn_ctx", Some((Prefill, Stage::AttnScores))),
    entry(Fault::NoQkvBias, "no-qkv-bias", "Q/K/V projections without their biases (a LLaMA loader reused for Qwen2)",
        "linear (q, k, v)", Some((Prefill, Stage::QProj))),
    entry(Fault::SwigluSwapped, "swiglu-swapped", "silu(up) * gate instead of silu(gate) * up",
        "swiglu", Some((Prefill, Stage::FfnAct))),
    entry(Fault::NoAttnScale, "no-attn-scale", "attention scores not scaled by 1/sqrt(head_dim) before the softmax",
        "softmax", Some((Prefill, Stage::AttnProbs))),
    entry(Fault::KvOffset, "kv-offset", "decode steps write K/V one cache slot late (a KV-cache offset bug)",
        "kv_store", Some((FirstDecode, Stage::AttnScores))),
];

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

    pub fn info(self) -> &'static FaultInfo {
        &FAULTS[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    pub fn parse(name: &str) -> Option<Fault> {
        FAULTS.iter().find(|f| f.name == name).map(|f| f.fault)
    }

    /// "unknown fault ...; one of: ..." for a name not in the catalogue.
    pub fn parse_or_list(name: &str) -> Result<Fault, String> {
        Self::parse(name).ok_or_else(|| {
            let names: Vec<_> = FAULTS.iter().map(|f| f.name).collect();
            format!("unknown fault {name:?}; one of: {}", names.join(", "))
        })
    }

    pub fn rope_pairing(self, correct: RopePairing) -> RopePairing {
        match (self, correct) {
            (Fault::RopeAdjacent, RopePairing::Neox) => RopePairing::Adjacent,
            (Fault::RopeAdjacent, RopePairing::Adjacent) => RopePairing::Neox,
            _ => correct,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_is_indexed_by_fault() {
        for (i, info) in FAULTS.iter().enumerate() {
            assert_eq!(info.fault as usize, i, "{} out of place", info.name);
            assert_eq!(Fault::ALL[i], info.fault);
            assert_eq!(Fault::parse(info.name), Some(info.fault));
            assert_eq!(info.expected.is_none(), info.fault == Fault::None);
        }
        assert!(Fault::parse_or_list("nope").unwrap_err().contains("rope-adjacent"));
    }
}
