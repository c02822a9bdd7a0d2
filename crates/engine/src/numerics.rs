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
//! The rounding is a backend op ([`Backend::round_rows`]): on the host for
//! the CPU oracle, by kernels in `kernels/quant.cu` on CUDA, both bit for bit
//! `gguf::quant::round_like_ggml`. Only the q8_1 min correction (Q4_1/Q5_1
//! weights) is computed on the host.

use crate::backend::{Backend, Weight};
use crate::fault::WeightRead;
use capture::Tensor;
use anyhow::{anyhow, Result};
use capture::KvType;
use gguf::quant::vec_dot_type;
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
    /// For Q4_1/Q5_1 weights: each block's min `m` (`[out, in/32]`). ggml's
    /// q8_1 dot adds `m * s` with `s = f16(d * sum q)` rounded to f16, where
    /// the dequantized product has `m * f16(d) * sum q`: the difference is
    /// added back after the matmul, so those weights round exactly too.
    mins: HashMap<Weight, Vec<f32>>,
}

impl Rounding {
    /// The oracle's own arithmetic: the only rounding is the KV cache's
    /// (done by the backend's store).
    pub fn exact(kv_type: KvType) -> Rounding {
        Rounding { numerics: Numerics::Exact, kv_type, vec_dot: HashMap::new(), mins: HashMap::new() }
    }

    /// Each weight's type read from the GGUF (a tied LM head is `token_embd`'s).
    pub fn from_gguf(numerics: Numerics, kv_type: KvType, gguf: &gguf::GgufFile, cfg: &gguf::Qwen2Config) -> Result<Rounding> {
        let arch = crate::arch::ArchSpec::qwen2(cfg);
        let mut types = HashMap::new();
        let mut mins = HashMap::new();
        for w in Weight::all(&arch, cfg.n_layer).into_iter().chain([Weight::Output]) {
            let name = w.gguf_name(cfg.tied_output);
            let info = gguf.tensor(&name).ok_or_else(|| anyhow!("tensor {name} is missing"))?;
            types.insert(w, info.ggml_type);
            let block_bytes = match info.ggml_type {
                GgmlType::Q4_1 => 20,
                GgmlType::Q5_1 => 24,
                _ => continue,
            };
            // Block layout: d (f16), m (f16), ...: m at byte 2.
            let m = gguf
                .tensor_data(info)
                .chunks_exact(block_bytes)
                .map(|b| half::f16::from_le_bytes([b[2], b[3]]).to_f32())
                .collect();
            mins.insert(w, m);
        }
        let mut r = Rounding::new(numerics, kv_type, &types)?;
        r.mins = mins;
        Ok(r)
    }

    /// `weight_types`: each weight's GGUF type (a tied LM head under
    /// `Weight::Output` too).
    pub fn new(numerics: Numerics, kv_type: KvType, weight_types: &HashMap<Weight, GgmlType>) -> Result<Rounding> {
        let mut vec_dot = HashMap::new();
        for (&w, &ty) in weight_types {
            let vdt = vec_dot_type(ty).ok_or_else(|| anyhow!(
                "unsupported quant type: {} is {}, which this tool cannot dequantize or round like ggml (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q2_K to Q6_K)",
                w.gguf_name(false),
                ty.name()
            ))?;
            vec_dot.insert(w, vdt);
        }
        Ok(Rounding { numerics, kv_type, vec_dot, mins: HashMap::new() })
    }

    /// The activation `x` as ggml's matmul with `weight` sees it; `None`
    /// when that is `x` itself.
    pub fn for_matmul<B: Backend>(&self, be: &B, x: &B::Buf, weight: Weight) -> Result<Option<B::Buf>> {
        match (self.numerics, self.vec_dot.get(&weight)) {
            (Numerics::Ggml, Some(&vdt)) if vdt != GgmlType::F32 => round_rows(be, x, vdt).map(Some),
            _ => Ok(None),
        }
    }

    /// `x W^T (+ b)` as ggml's CPU matmul computes it in ggml numerics (the
    /// activation rounded per `for_matmul`, plus the q8_1 min correction),
    /// else the backend's own linear.
    pub fn linear<B: Backend>(&self, be: &B, x: &B::Buf, weight: Weight, bias: Option<Weight>, read: WeightRead) -> Result<B::Buf> {
        let rounded = self.for_matmul(be, x, weight)?;
        let y = be.linear(rounded.as_ref().unwrap_or(x), weight, bias, read)?;
        match (self.numerics, self.mins.get(&weight), read) {
            (Numerics::Ggml, Some(mins), WeightRead::Rows) => {
                let correction = q8_1_min_correction(&be.to_host(x)?, mins, be.shape(&y))?;
                let c = be.from_host(&correction)?;
                let c = be.reshape(c, be.shape(&y))?;
                be.add(&y, &c)
            }
            _ => Ok(y),
        }
    }

    /// `residual + x W^T` with x as `linear` rounds it: one backend op
    /// ([`Backend::linear_residual`]) unless a q8_1 min correction is
    /// computed on the host, which goes between the two. `keep`: the
    /// projection too, as `linear` gives it.
    pub fn linear_residual<B: Backend>(&self, be: &B, x: &B::Buf, weight: Weight, read: WeightRead, residual: &B::Buf, keep: bool) -> Result<(B::Buf, Option<B::Buf>)> {
        if self.numerics == Numerics::Ggml && self.mins.contains_key(&weight) {
            let y = self.linear(be, x, weight, None, read)?;
            let out = be.add(residual, &y)?;
            return Ok((out, keep.then_some(y)));
        }
        let rounded = self.for_matmul(be, x, weight)?;
        be.linear_residual(rounded.as_ref().unwrap_or(x), weight, read, residual, keep)
    }

    /// Q before Q·K^T and the probabilities before probs·V: ggml converts
    /// them to the (f16) KV cache's type.
    pub fn for_kv_matmul<B: Backend>(&self, be: &B, x: &B::Buf) -> Result<Option<B::Buf>> {
        if self.kv_matmul_rounds() {
            round_rows(be, x, GgmlType::F16).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Whether ggml's matmuls with `a` and with `b` see the same input and
    /// add nothing after the product (no q8_1 min correction): then one
    /// [`Rounding::for_matmul`] of x serves both.
    pub fn same_matmul_input(&self, a: Weight, b: Weight) -> bool {
        match self.numerics {
            Numerics::Exact => true,
            Numerics::Ggml => self.vec_dot.get(&a) == self.vec_dot.get(&b) && !self.mins.contains_key(&a) && !self.mins.contains_key(&b),
        }
    }

    /// Whether no matmul input is rounded (numerics exact): then an op
    /// may fuse what comes before a matmul into it.
    pub fn leaves_matmul_inputs(&self) -> bool {
        self.numerics == Numerics::Exact
    }

    /// Whether every rounding is a backend op: false when a q8_1 min
    /// correction is computed on the host (a recorded decode step must not
    /// leave the device).
    pub fn stays_on_device(&self) -> bool {
        self.numerics == Numerics::Exact || self.mins.is_empty()
    }

    /// Whether [`Rounding::for_kv_matmul`] rounds (to f16): numerics ggml
    /// with an f16 cache, where ggml converts Q and the probabilities to the
    /// cache's type before multiplying them with it.
    pub fn kv_matmul_rounds(&self) -> bool {
        matches!((self.numerics, self.kv_type), (Numerics::Ggml, KvType::F16))
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

/// `y[t][o] += sum_b m[o][b] (s[t][b] - f16(d[t][b]) sum q[t][b])`: what
/// ggml's q8_1 dot adds beyond the dequantized product (see `Rounding::mins`).
fn q8_1_min_correction(x: &Tensor, mins: &[f32], y_shape: &[usize]) -> Result<Tensor> {
    let n_in = *x.shape.last().unwrap_or(&0);
    let n_out = *y_shape.last().unwrap_or(&0);
    let n_blocks = n_in / 32;
    anyhow::ensure!(n_in.is_multiple_of(32) && mins.len() == n_out * n_blocks, "q8_1 correction: rows of {n_in} against {} mins", mins.len());
    let rows = x.data.len() / n_in.max(1);
    let mut out = vec![0f32; rows * n_out];
    for (t, row) in x.data.chunks_exact(n_in).enumerate() {
        let bytes = gguf::quant::quantize_q8_1(row);
        // Per block: s (as ggml stores it) minus f16(d) * sum q (what the
        // dequantized activation sums to).
        let c: Vec<f64> = bytes
            .chunks_exact(36)
            .map(|b| {
                let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32() as f64;
                let s = half::f16::from_le_bytes([b[2], b[3]]).to_f32() as f64;
                let sum_q: i32 = b[4..36].iter().map(|&q| q as i8 as i32).sum();
                s - d * sum_q as f64
            })
            .collect();
        for o in 0..n_out {
            let m = &mins[o * n_blocks..(o + 1) * n_blocks];
            out[t * n_out + o] = m.iter().zip(&c).map(|(&m, &c)| m as f64 * c).sum::<f64>() as f32;
        }
    }
    Ok(Tensor::new(vec![rows, n_out], out))
}

fn round_rows<B: Backend>(be: &B, x: &B::Buf, ty: GgmlType) -> Result<B::Buf> {
    be.round_rows(x, ty)
}
