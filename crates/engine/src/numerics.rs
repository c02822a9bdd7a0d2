//! Numerics modes of the engine: how activations are rounded between ops.
//!
//! - `exact`: the oracle's own arithmetic (f32 values, f64 reductions); the
//!   only rounding is the KV cache's type. The reference for engines that
//!   keep activations in float.
//! - `ggml`: each activation row entering a matmul is rounded exactly as the
//!   linked ggml's CPU backend rounds it for that weight's type (q8_0, q8_1,
//!   q8_K, f16, bf16: `gguf::quant`, proved bit for bit against ggml), and in
//!   attention Q and the softmax output are rounded to the KV cache's type
//!   where ggml converts them. Fed llama.cpp's own inputs (teacher-forced),
//!   every op then differs from ggml only by accumulation order.
//!
//! The rounding is applied on the host, between the backend's ops, so every
//! backend gets it the same way (on CUDA that is a slower path: a copy to the
//! host and back per rounded tensor).

use crate::backend::{Backend, Weight};
use anyhow::{anyhow, Result};
use capture::KvType;
use gguf::quant::{round_like_ggml, vec_dot_type};
use gguf::GgmlType;
use std::collections::HashMap;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Numerics {
    /// ggml's activation rounding (the default when the reference is llama.cpp).
    #[default]
    Ggml,
    /// Float activations: the oracle's own arithmetic.
    Exact,
}

impl Numerics {
    pub fn name(self) -> &'static str {
        match self {
            Numerics::Ggml => "ggml",
            Numerics::Exact => "exact",
        }
    }
}

impl fmt::Display for Numerics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where and how the forward pass rounds, for one loaded model.
#[derive(Clone, Debug, Default)]
pub struct Rounding {
    pub numerics: Numerics,
    pub kv_type: KvType,
    /// The `vec_dot_type` of each weight (absent: F32, no rounding).
    vec_dot: HashMap<Weight, GgmlType>,
}

impl Rounding {
    /// The oracle's own arithmetic: the only rounding is the KV cache's
    /// (done by the backend's store).
    pub fn exact(kv_type: KvType) -> Rounding {
        Rounding { numerics: Numerics::Exact, kv_type, vec_dot: HashMap::new() }
    }

    /// Each weight's type read from the GGUF (a tied LM head is `token_embd`'s).
    pub fn from_gguf(numerics: Numerics, kv_type: KvType, gguf: &gguf::GgufFile, cfg: &gguf::Qwen2Config) -> Result<Rounding> {
        let arch = crate::arch::ArchSpec::qwen2(cfg);
        let mut types = HashMap::new();
        for w in Weight::all(&arch, cfg.n_layer).into_iter().chain([Weight::Output]) {
            let name = w.gguf_name(cfg.tied_output);
            let info = gguf.tensor(&name).ok_or_else(|| anyhow!("tensor {name} is missing"))?;
            types.insert(w, info.ggml_type);
        }
        Rounding::new(numerics, kv_type, &types)
    }

    /// `weight_types`: each weight's GGUF type (a tied LM head under
    /// `Weight::Output` too).
    pub fn new(numerics: Numerics, kv_type: KvType, weight_types: &HashMap<Weight, GgmlType>) -> Result<Rounding> {
        let mut vec_dot = HashMap::new();
        for (&w, &ty) in weight_types {
            let vdt = vec_dot_type(ty).ok_or_else(|| anyhow!("weight {w:?}: ggml type {} has no CPU matmul rounding we emulate", ty.name()))?;
            vec_dot.insert(w, vdt);
        }
        Ok(Rounding { numerics, kv_type, vec_dot })
    }

    /// The activation `x` as ggml's matmul with `weight` sees it; `None`
    /// when that is `x` itself.
    pub fn for_matmul<B: Backend>(&self, be: &B, x: &B::Buf, weight: Weight) -> Result<Option<B::Buf>> {
        match (self.numerics, self.vec_dot.get(&weight)) {
            (Numerics::Ggml, Some(&vdt)) if vdt != GgmlType::F32 => round_rows(be, x, vdt).map(Some),
            _ => Ok(None),
        }
    }

    /// Q before Q·K^T and the probabilities before probs·V: ggml converts
    /// them to the (f16) KV cache's type.
    pub fn for_kv_matmul<B: Backend>(&self, be: &B, x: &B::Buf) -> Result<Option<B::Buf>> {
        match (self.numerics, self.kv_type) {
            (Numerics::Ggml, KvType::F16) => round_rows(be, x, GgmlType::F16).map(Some),
            _ => Ok(None),
        }
    }
}

impl Rounding {
    /// `x` converted to the KV cache's element type (f16 rounding; nothing
    /// for an f32 cache), whatever the numerics mode.
    pub fn to_kv_type<B: Backend>(&self, be: &B, x: &B::Buf) -> Result<Option<B::Buf>> {
        match self.kv_type {
            KvType::F16 => round_rows(be, x, GgmlType::F16).map(Some),
            KvType::F32 => Ok(None),
        }
    }
}

fn round_rows<B: Backend>(be: &B, x: &B::Buf, ty: GgmlType) -> Result<B::Buf> {
    let shape = be.shape(x).to_vec();
    let mut host = be.to_host(x)?;
    let width = *shape.last().unwrap_or(&1);
    if width > 0 {
        host.data.chunks_exact_mut(width).for_each(|row| round_like_ggml(ty, row));
    }
    let buf = be.from_host(&host)?;
    be.reshape(buf, &shape)
}
