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
    /// kv head = h * n_head_kv / n_head: another spelling of `Grouped`.
    Ratio,
}

/// How a weight matrix is read by a matmul (the GEMM flag / leading dimension).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightRead {
    /// GGUF's `[out, in]` rows: `y = x W^T`.
    #[default]
    Rows,
    /// The same buffer read as `[in, out]` (transpose flag flipped and the
    /// leading dimension taken from the other side): `y[o] = sum_i x[i] buf[i*out + o]`.
    Transposed,
}

/// The activation of the gated FFN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    /// silu(g) = g / (1 + exp(-g)): Qwen2's.
    #[default]
    Silu,
    /// gelu, tanh approximation: the wrong activation.
    Gelu,
}

/// The one fault switch. `None` is the correct engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum Fault {
    #[default]
    None,
    EmbedTransposed,
    RmsEps,
    NormWeightSwapped,
    NoQkvBias,
    QProjTransposed,
    RopeAdjacent,
    RopeBase,
    RopePosOffset,
    RopeDecodePos,
    GqaModulo,
    KvOffset,
    NoAttnScale,
    MaskMissing,
    MaskOffByOne,
    KvLenShort,
    OProjTransposed,
    ResidualDropped,
    SwigluSwapped,
    WrongActivation,
    FfnDownTransposed,
    ResidualWrongInput,
    FinalNormSkipped,
    LmHeadTransposed,
    Q50HighBit,
    GqaRatioForm,
    KRoundedTwice,
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

/// What a correct tool must report for a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The first divergence: this step, this stage, in the layer the fault
    /// acts at (global stages: no layer).
    At(FirstStep, Stage),
    /// No divergence at all: the variant is equivalent for this model (a
    /// false alarm here is a bug of the tool).
    NoDivergence,
}

/// Where a fault acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// In one chosen layer (`NAME@LAYER`; every layer when none is chosen).
    Layer,
    /// Outside the layers (embedding, final norm, LM head).
    Global,
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
    pub expect: Option<Expect>,
    pub scope: Scope,
    /// Why the fault is only visible in some layers, with the arithmetic;
    /// `parity selftest` seeds such a fault at layer 0, where it shows.
    pub subtle: Option<&'static str>,
}

const fn entry(fault: Fault, name: &'static str, models: &'static str, op: &'static str, expect: Option<Expect>, scope: Scope) -> FaultInfo {
    FaultInfo { fault, name, models, op, expect, scope, subtle: None }
}

const fn subtle(info: FaultInfo, why: &'static str) -> FaultInfo {
    FaultInfo { subtle: Some(why), ..info }
}

use Expect::{At, NoDivergence};
use FirstStep::{FirstDecode, Prefill};
use Scope::{Global, Layer};

/// Indexed by `Fault as usize`.
pub const FAULTS: [FaultInfo; 27] = [
    entry(Fault::None, "none", "the correct engine", "-", None, Global),
    entry(Fault::EmbedTransposed, "embed-transposed", "token embedding read as a column of the [vocab, embd] table (row/column index swapped)",
        "embed", Some(At(Prefill, Stage::Embed)), Global),
    subtle(
        entry(Fault::RmsEps, "rms-eps", "RMSNorm eps 1e-5 (LLaMA's default) instead of the model's rms_norm_eps 1e-6",
            "rms_norm", Some(At(Prefill, Stage::AttnNorm)), Layer),
        "the output moves by (1e-5 - 1e-6) / (2 * mean square) relative: 4.5e-3 at layer 0 (rows' mean square ~1e-3), \
         but under the 1e-4 gate where the residual stream's mean square exceeds 0.045 (layer 1 on: 5e-6 at ms 1); \
         a norm gate of 2e-6 (12x the norms' 1.7e-7 teacher-forced floor) would see it up to mean square 2; \
         the built-in gates keep one 1e-4 for every elementwise stage",
    ),
    entry(Fault::NormWeightSwapped, "norm-weight-swapped", "attention RMSNorm multiplied by ffn_norm.weight (a tensor-name mapping mix-up)",
        "rms_norm", Some(At(Prefill, Stage::AttnNorm)), Layer),
    entry(Fault::NoQkvBias, "no-qkv-bias", "Q/K/V projections without their biases (a LLaMA loader reused for Qwen2)",
        "linear (q, k, v)", Some(At(Prefill, Stage::QProj)), Layer),
    entry(Fault::QProjTransposed, "q-proj-transposed", "Q projection GEMM with the transpose flag flipped (square W_q read as W_q^T)",
        "linear (q)", Some(At(Prefill, Stage::QProj)), Layer),
    entry(Fault::RopeAdjacent, "rope-adjacent", "RoPE rotating adjacent pairs (2i, 2i+1), as GPT-J/LLaMA, instead of Qwen2's NEOX pairs (i, i+d/2)",
        "rope", Some(At(Prefill, Stage::QRope)), Layer),
    entry(Fault::RopeBase, "rope-base", "RoPE base 10000 (LLaMA's) instead of the model's rope_freq_base 1e6",
        "rope", Some(At(Prefill, Stage::QRope)), Layer),
    entry(Fault::RopePosOffset, "rope-pos-offset", "RoPE positions starting at 1 instead of 0 (an off-by-one in the position ids)",
        "rope", Some(At(Prefill, Stage::QRope)), Layer),
    entry(Fault::RopeDecodePos, "rope-decode-pos", "decode steps rotate at position n_past - 1 (the cache length read after the store)",
        "rope", Some(At(FirstDecode, Stage::QRope)), Layer),
    entry(Fault::GqaModulo, "gqa-modulo", "GQA head map h % n_head_kv instead of h / (n_head / n_head_kv)",
        "attn_scores, attn_ctx", Some(At(Prefill, Stage::AttnScores)), Layer),
    entry(Fault::KvOffset, "kv-offset", "decode steps write K/V one cache slot late (a KV-cache offset bug)",
        "kv_store", Some(At(FirstDecode, Stage::AttnScores)), Layer),
    entry(Fault::NoAttnScale, "no-attn-scale", "attention scores not scaled by 1/sqrt(head_dim) before the softmax",
        "softmax", Some(At(Prefill, Stage::AttnProbs)), Layer),
    entry(Fault::MaskMissing, "mask-missing", "no causal mask: every query attends every cache position of the prompt",
        "attn_scores, softmax", Some(At(Prefill, Stage::AttnProbs)), Layer),
    entry(Fault::MaskOffByOne, "mask-off-by-one", "causal mask off by one: each query also sees the next position",
        "attn_scores, softmax", Some(At(Prefill, Stage::AttnProbs)), Layer),
    entry(Fault::KvLenShort, "kv-len-short", "decode attention over n_kv - 1 positions: the newest key is not read (length taken before the store)",
        "attn_scores, softmax", Some(At(FirstDecode, Stage::AttnScores)), Layer),
    entry(Fault::OProjTransposed, "o-proj-transposed", "attention output GEMM with the transpose flag flipped (W_o read as W_o^T)",
        "linear (o)", Some(At(Prefill, Stage::AttnOut)), Layer),
    entry(Fault::ResidualDropped, "residual-dropped", "the attention residual dropped: attn_residual = attn_out alone",
        "add", Some(At(Prefill, Stage::AttnResidual)), Layer),
    entry(Fault::SwigluSwapped, "swiglu-swapped", "silu(up) * gate instead of silu(gate) * up",
        "swiglu", Some(At(Prefill, Stage::FfnAct)), Layer),
    entry(Fault::WrongActivation, "wrong-activation", "gelu instead of silu in the gated FFN",
        "swiglu", Some(At(Prefill, Stage::FfnAct)), Layer),
    entry(Fault::FfnDownTransposed, "ffn-down-transposed", "FFN down GEMM with the wrong leading dimension: the [embd, ff] weight read as [ff, embd]",
        "linear (down)", Some(At(Prefill, Stage::FfnDown)), Layer),
    entry(Fault::ResidualWrongInput, "residual-wrong-input", "the FFN residual taken from the layer input instead of attn_residual",
        "add", Some(At(Prefill, Stage::LayerOut)), Layer),
    entry(Fault::FinalNormSkipped, "final-norm-skipped", "the final RMSNorm skipped before the LM head",
        "rms_norm", Some(At(Prefill, Stage::FinalNorm)), Global),
    entry(Fault::LmHeadTransposed, "lm-head-transposed", "LM head GEMM with the wrong leading dimension: the [vocab, embd] weight read as [embd, vocab]",
        "linear (lm head)", Some(At(Prefill, Stage::Logits)), Global),
    entry(Fault::Q50HighBit, "q5-0-high-bit", "Q5_0 dequantization with the `<< 4` forgotten on the second half's fifth bit (first seen at q_proj where attn_q is Q5_0, as in Q4_K_M Qwen2 GGUFs)",
        "dequantize (at load)", Some(At(Prefill, Stage::QProj)), Layer),
    entry(Fault::GqaRatioForm, "gqa-ratio-form", "GQA map written h * n_head_kv / n_head: equal to h / (n_head / n_head_kv) for every head",
        "attn_scores, attn_ctx", Some(NoDivergence), Layer),
    entry(Fault::KRoundedTwice, "k-rounded-twice", "K rounded to f16 before the store into the f16 cache, which rounds it again (idempotent)",
        "kv_store", Some(NoDivergence), Layer),
];

/// A fault and the layer it acts at (`None`: every layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FaultSpec {
    pub fault: Fault,
    pub layer: Option<usize>,
}

impl FaultSpec {
    pub const NONE: FaultSpec = FaultSpec { fault: Fault::None, layer: None };

    /// `NAME` or `NAME@LAYER`.
    pub fn parse(s: &str) -> Result<FaultSpec, String> {
        let (name, layer) = match s.split_once('@') {
            Some((n, l)) => (n, Some(l.parse::<usize>().map_err(|_| format!("--fault {s:?}: {l:?} is not a layer number"))?)),
            None => (s, None),
        };
        let fault = Fault::parse_or_list(name)?;
        if layer.is_some() && fault.info().scope == Scope::Global {
            return Err(format!("--fault {s:?}: {name} acts outside the layers; drop @{}", layer.unwrap_or(0)));
        }
        Ok(FaultSpec { fault, layer })
    }

    /// The fault if it acts at `layer`, else `Fault::None`.
    pub fn at_layer(&self, layer: usize) -> Fault {
        match (self.fault.info().scope, self.layer) {
            (Scope::Layer, Some(l)) if l != layer => Fault::None,
            (Scope::Layer, _) => self.fault,
            (Scope::Global, _) => Fault::None,
        }
    }

    /// The fault if it acts outside the layers.
    pub fn global(&self) -> Fault {
        if self.fault.info().scope == Scope::Global {
            self.fault
        } else {
            Fault::None
        }
    }
}

impl From<Fault> for FaultSpec {
    /// The fault in every layer it can act in.
    fn from(fault: Fault) -> FaultSpec {
        FaultSpec { fault, layer: None }
    }
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.layer {
            Some(l) => write!(f, "{}@{l}", self.fault),
            None => write!(f, "{}", self.fault),
        }
    }
}

impl Fault {
    /// The fault acts when the weights are loaded: the engine must be
    /// loaded again to seed or clear it.
    pub fn at_load(self) -> bool {
        self == Fault::Q50HighBit
    }

    /// The stages whose output the bug model changes directly (its first
    /// divergence is the first of them that the forward pass reaches): what
    /// the diagnosis replays at a divergent stage. A foreign engine may carry
    /// the bug in only one of them (a K bias dropped, Q's kept).
    pub fn changes(self) -> &'static [Stage] {
        use Stage::*;
        match self {
            Fault::None | Fault::GqaRatioForm | Fault::KRoundedTwice => &[],
            Fault::EmbedTransposed => &[Embed],
            Fault::RmsEps => &[AttnNorm, FfnNorm],
            Fault::NormWeightSwapped => &[AttnNorm],
            Fault::NoQkvBias => &[QProj, KProj, VProj],
            Fault::QProjTransposed => &[QProj],
            Fault::RopeAdjacent | Fault::RopeBase | Fault::RopePosOffset | Fault::RopeDecodePos => &[QRope, KRope],
            Fault::GqaModulo => &[AttnScores, AttnCtx],
            Fault::KvOffset | Fault::KvLenShort => &[AttnScores, AttnProbs, AttnCtx],
            Fault::NoAttnScale | Fault::MaskMissing | Fault::MaskOffByOne => &[AttnProbs],
            Fault::OProjTransposed => &[AttnOut],
            Fault::ResidualDropped => &[AttnResidual],
            Fault::SwigluSwapped | Fault::WrongActivation => &[FfnAct],
            Fault::FfnDownTransposed => &[FfnDown],
            Fault::ResidualWrongInput => &[LayerOut],
            Fault::FinalNormSkipped => &[FinalNorm],
            Fault::LmHeadTransposed => &[Logits],
            Fault::Q50HighBit => &[QProj, KProj, VProj, AttnOut, FfnGate, FfnUp, FfnDown],
        }
    }

    pub fn all() -> impl Iterator<Item = Fault> {
        FAULTS.iter().map(|f| f.fault)
    }

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
        match self {
            Fault::GqaModulo => HeadMap::Modulo,
            Fault::GqaRatioForm => HeadMap::Ratio,
            _ => HeadMap::Grouped,
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
    fn every_fault_changes_the_stage_it_is_first_seen_at() {
        for info in FAULTS.iter() {
            match info.expect {
                Some(Expect::At(_, stage)) => assert!(info.fault.changes().contains(&stage), "{}: {stage} not in its changes()", info.name),
                _ => assert!(info.fault.changes().is_empty(), "{} changes nothing", info.name),
            }
        }
    }

    #[test]
    fn catalogue_is_indexed_by_fault() {
        for (i, info) in FAULTS.iter().enumerate() {
            assert_eq!(info.fault as usize, i, "{} out of place", info.name);
            assert_eq!(Fault::parse(info.name), Some(info.fault));
            assert_eq!(info.expect.is_none(), info.fault == Fault::None);
        }
        assert!(Fault::parse_or_list("nope").unwrap_err().contains("rope-adjacent"));
        let spec = FaultSpec::parse("rope-base@3").unwrap();
        assert_eq!((spec.at_layer(3), spec.at_layer(2)), (Fault::RopeBase, Fault::None));
        assert_eq!(FaultSpec::parse("rope-base").unwrap().at_layer(7), Fault::RopeBase);
        assert!(FaultSpec::parse("embed-transposed@1").unwrap_err().contains("outside the layers"));
        assert_eq!(FaultSpec::parse("embed-transposed").unwrap().global(), Fault::EmbedTransposed);
        assert!(FaultSpec::parse("rope-base@x").is_err());
        let real = FAULTS.iter().filter(|f| matches!(f.expect, Some(Expect::At(..)))).count();
        let equivalent = FAULTS.iter().filter(|f| f.expect == Some(Expect::NoDivergence)).count();
        assert!(real >= 18 && equivalent >= 2, "{real} faults, {equivalent} equivalent variants");
    }
}
