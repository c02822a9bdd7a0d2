//! The backend interface the forward pass is written against. A backend owns
//! its copy of the weights and the KV cache; the forward pass only names them.

use capture::{KvType, Tensor};
use crate::arch::ArchSpec;
use crate::fault::{Activation, HeadMap, RopePairing, WeightRead};
use anyhow::{anyhow, ensure, Context, Result};
use gguf::{GgmlType, GgufFile, Qwen2Config};

/// A weight of the model, by role. `gguf_name` maps it onto the GGUF tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Weight {
    TokenEmbd,
    AttnNorm(usize),
    AttnQ(usize),
    AttnQBias(usize),
    AttnK(usize),
    AttnKBias(usize),
    AttnV(usize),
    AttnVBias(usize),
    AttnOutput(usize),
    FfnNorm(usize),
    FfnGate(usize),
    FfnUp(usize),
    FfnDown(usize),
    OutputNorm,
    /// The LM head; `token_embd.weight` when the model ties its output.
    Output,
}

impl Weight {
    pub fn gguf_name(self, tied_output: bool) -> String {
        match self {
            Weight::TokenEmbd => "token_embd.weight".into(),
            Weight::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            Weight::AttnQ(l) => format!("blk.{l}.attn_q.weight"),
            Weight::AttnQBias(l) => format!("blk.{l}.attn_q.bias"),
            Weight::AttnK(l) => format!("blk.{l}.attn_k.weight"),
            Weight::AttnKBias(l) => format!("blk.{l}.attn_k.bias"),
            Weight::AttnV(l) => format!("blk.{l}.attn_v.weight"),
            Weight::AttnVBias(l) => format!("blk.{l}.attn_v.bias"),
            Weight::AttnOutput(l) => format!("blk.{l}.attn_output.weight"),
            Weight::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            Weight::FfnGate(l) => format!("blk.{l}.ffn_gate.weight"),
            Weight::FfnUp(l) => format!("blk.{l}.ffn_up.weight"),
            Weight::FfnDown(l) => format!("blk.{l}.ffn_down.weight"),
            Weight::OutputNorm => "output_norm.weight".into(),
            Weight::Output if tied_output => "token_embd.weight".into(),
            Weight::Output => "output.weight".into(),
        }
    }

    /// The shape this weight has in GGUF's row-major layout: matrices
    /// `[out, in]`, vectors `[n]`.
    pub fn shape(self, cfg: &Qwen2Config) -> Vec<usize> {
        let q = cfg.n_head * cfg.head_dim;
        let kv = cfg.n_head_kv * cfg.head_dim;
        match self {
            Weight::TokenEmbd | Weight::Output => vec![cfg.n_vocab, cfg.n_embd],
            Weight::AttnNorm(_) | Weight::FfnNorm(_) | Weight::OutputNorm => vec![cfg.n_embd],
            Weight::AttnQ(_) => vec![q, cfg.n_embd],
            Weight::AttnQBias(_) => vec![q],
            Weight::AttnK(_) | Weight::AttnV(_) => vec![kv, cfg.n_embd],
            Weight::AttnKBias(_) | Weight::AttnVBias(_) => vec![kv],
            Weight::AttnOutput(_) => vec![cfg.n_embd, q],
            Weight::FfnGate(_) | Weight::FfnUp(_) => vec![cfg.n_ff, cfg.n_embd],
            Weight::FfnDown(_) => vec![cfg.n_embd, cfg.n_ff],
        }
    }

    /// Look the weight up in `gguf`, check its shape against `cfg` and
    /// dequantize it to f32 (bit for bit ggml's values), or with the
    /// `q5-0-high-bit` fault when `dequant_bug` names this weight's layer.
    pub fn dequantize_for(self, gguf: &GgufFile, cfg: &Qwen2Config, dequant_bug: Option<Option<usize>>) -> Result<Tensor> {
        let name = self.gguf_name(cfg.tied_output);
        let info = gguf.tensor(&name).ok_or_else(|| anyhow!("{}: tensor {name} is missing", gguf.path().display()))?;
        if self.dequant_bug_applies(info.ggml_type, dequant_bug) {
            let mut t = self.dequantize(gguf, cfg)?;
            gguf::dequant::q5_0_forgotten_shift(gguf.tensor_data(info), &mut t.data);
            return Ok(t);
        }
        self.dequantize(gguf, cfg)
    }

    /// Whether the `q5-0-high-bit` fault (`dequant_bug`: every layer, or
    /// one) changes this weight, stored as `ty`.
    pub fn dequant_bug_applies(self, ty: gguf::GgmlType, dequant_bug: Option<Option<usize>>) -> bool {
        let in_scope = match dequant_bug {
            None => false,
            Some(None) => self.layer().is_some(),
            Some(layer) => self.layer() == layer,
        };
        in_scope && ty == gguf::GgmlType::Q5_0
    }

    /// The layer a per-layer weight belongs to.
    pub fn layer(self) -> Option<usize> {
        match self {
            Weight::AttnNorm(l)
            | Weight::AttnQ(l)
            | Weight::AttnQBias(l)
            | Weight::AttnK(l)
            | Weight::AttnKBias(l)
            | Weight::AttnV(l)
            | Weight::AttnVBias(l)
            | Weight::AttnOutput(l)
            | Weight::FfnNorm(l)
            | Weight::FfnGate(l)
            | Weight::FfnUp(l)
            | Weight::FfnDown(l) => Some(l),
            Weight::TokenEmbd | Weight::OutputNorm | Weight::Output => None,
        }
    }

    /// Look the weight up in `gguf`, check its shape against `cfg` and
    /// dequantize it to f32 (bit for bit ggml's values).
    pub fn dequantize(self, gguf: &GgufFile, cfg: &Qwen2Config) -> Result<Tensor> {
        let name = self.gguf_name(cfg.tied_output);
        let info = gguf.tensor(&name).ok_or_else(|| anyhow!("{}: tensor {name} is missing", gguf.path().display()))?;
        // GGUF lists ne0 (the row length) first; our layout is row-major [rows, ne0].
        let dims: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        let expected = self.shape(cfg);
        ensure!(dims == expected, "tensor {name} has shape {dims:?}, expected {expected:?}");
        let data = gguf.dequantize(&name).with_context(|| format!("dequantizing {name}"))?;
        Ok(Tensor::new(dims, data))
    }

    /// Every weight a model of this architecture and `n_layer` layers needs
    /// (a tied LM head is `TokenEmbd`, not listed twice).
    pub fn all(arch: &ArchSpec, n_layer: usize) -> Vec<Weight> {
        let mut all = vec![Weight::TokenEmbd, Weight::OutputNorm];
        if !arch.tied_output {
            all.push(Weight::Output);
        }
        for l in 0..n_layer {
            all.extend([Weight::AttnNorm(l), Weight::AttnQ(l), Weight::AttnK(l), Weight::AttnV(l)]);
            if arch.qkv_bias {
                all.extend([Weight::AttnQBias(l), Weight::AttnKBias(l), Weight::AttnVBias(l)]);
            }
            all.extend([Weight::AttnOutput(l), Weight::FfnNorm(l), Weight::FfnGate(l), Weight::FfnUp(l), Weight::FfnDown(l)]);
        }
        all
    }
}

/// One op per method; every tensor in and out is in the stage catalogue's
/// canonical row-major layout. Shapes: `x` is `[n_tokens, n_embd]`, heads
/// are `[n_tokens, n_heads, head_dim]`, scores/probs `[n_head, n_tokens, n_kv]`.
pub trait Backend {
    /// A tensor resident on the backend, with its shape.
    type Buf;

    /// "cpu" or "cuda".
    fn name(&self) -> &'static str;
    /// The element type of this backend's KV cache.
    fn kv_type(&self) -> KvType;
    fn shape<'a>(&self, buf: &'a Self::Buf) -> &'a [usize];
    /// Same data, new shape (element count must match).
    fn reshape(&self, buf: Self::Buf, shape: &[usize]) -> Result<Self::Buf>;
    fn to_host(&self, buf: &Self::Buf) -> Result<Tensor>;
    /// The buffer's values on the host, the buffer given up (a host backend
    /// hands it over without a copy). `into`/`from` name the direction of a
    /// buffer's move, not a conversion of the backend itself.
    #[allow(clippy::wrong_self_convention)]
    fn into_host(&self, buf: Self::Buf) -> Result<Tensor> {
        self.to_host(&buf)
    }
    #[allow(clippy::wrong_self_convention)]
    fn from_host(&self, tensor: &Tensor) -> Result<Self::Buf>;
    /// Start bringing `buf` to the host without waiting for it: `Some` when
    /// the copy is already done (a host backend), `None` when it is in
    /// flight and `finish_to_host` returns it, in the order started.
    fn start_to_host(&self, buf: &Self::Buf) -> Result<Option<Tensor>> {
        self.to_host(buf).map(Some)
    }
    /// Every copy `start_to_host` left in flight since the last call,
    /// finished, in the order they were started.
    fn finish_to_host(&self) -> Result<Vec<Tensor>> {
        Ok(Vec::new())
    }
    /// Rows `start..start + n` of a buffer seen as `[rows, last dim]`, on
    /// the host (the last logits row, without copying the others).
    fn rows_to_host(&self, buf: &Self::Buf, start: usize, n: usize) -> Result<Tensor>;
    /// Rows `start..start + n` of a buffer seen as `[rows, last dim]`, as a
    /// new `[n, last dim]` buffer (the last position, for an LM head whose
    /// other rows nobody reads).
    fn rows(&self, buf: &Self::Buf, start: usize, n: usize) -> Result<Self::Buf>;

    /// Rows of `token_embd` for `tokens`: `[n_tokens, n_embd]` (`read`:
    /// `Transposed` takes column t of the buffer seen as `[n_embd, n_vocab]`).
    fn embed(&self, tokens: &[i32], read: WeightRead) -> Result<Self::Buf>;
    /// RMSNorm over the last dim, times the weight.
    fn rms_norm(&self, x: &Self::Buf, weight: Weight, eps: f32) -> Result<Self::Buf>;
    /// `x W^T (+ b)`: `[n, in] -> [n, out]`, W stored `[out, in]` as in GGUF
    /// (`read`: `Transposed` reads the same buffer as `[in, out]`).
    fn linear(&self, x: &Self::Buf, weight: Weight, bias: Option<Weight>, read: WeightRead) -> Result<Self::Buf>;
    /// Rotary embedding of `[n_tokens, n_heads, head_dim]` at positions `pos0..pos0 + n_tokens`.
    fn rope(&self, x: &Self::Buf, pos0: usize, freq_base: f32, pairing: RopePairing) -> Result<Self::Buf>;
    /// Write K (after RoPE) and V of `[n_tokens, n_head_kv, head_dim]` into the cache at `pos0..`.
    fn kv_store(&mut self, layer: usize, k: &Self::Buf, v: &Self::Buf, pos0: usize) -> Result<()>;
    /// Raw Q K^T over cache positions `0..n_kv`, `[n_head, n_tokens, n_kv]`, 0 beyond the causal limit.
    fn attn_scores(&self, layer: usize, q: &Self::Buf, pos0: usize, n_kv: usize, head_map: HeadMap) -> Result<Self::Buf>;
    /// softmax(scale * scores + causal mask) per row.
    fn softmax_causal(&self, scores: &Self::Buf, scale: f32, pos0: usize) -> Result<Self::Buf>;
    /// probs V, heads merged: `[n_tokens, n_head, head_dim]`.
    fn attn_ctx(&self, layer: usize, probs: &Self::Buf, n_kv: usize, head_map: HeadMap) -> Result<Self::Buf>;
    // The fused ops below compute intermediates a checkpoint may observe
    // (never replace: that needs the separate ops). Asked with `keep`, an
    // op hands them back beside its result: the very values it went on
    // with (CUDA: written by the same kernel), so observing them changes
    // no bit and costs no launch.

    /// Scores, softmax and context in one op: the same values as
    /// `attn_scores` + `softmax_causal` (+ the probabilities rounded to f16
    /// when `round_probs`, numerics ggml with an f16 cache) + `attn_ctx`,
    /// which is what this default does. A backend may fuse them (CUDA keeps
    /// each row's scores in shared memory) but must give the same bits.
    /// `keep`: the scores and the probabilities (before any rounding) too.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn attention(&self, layer: usize, q: &Self::Buf, scale: f32, pos0: usize, n_kv: usize, head_map: HeadMap, round_probs: bool, keep: bool) -> Result<(Self::Buf, Option<(Self::Buf, Self::Buf)>)> {
        attention_in_three_ops(self, layer, q, scale, pos0, n_kv, head_map, round_probs, keep)
    }
    /// `act(x Wa^T) * (x Wb^T)`: the FFN's two projections and SwiGLU
    /// (Wa is the gate, or the up projection under the swapped-SwiGLU
    /// fault). The same values as two `linear`s and `swiglu`, which is what
    /// this default does; a backend may fuse them (CUDA reads x once, in
    /// one kernel) but must give the same bits. `keep`: the two products
    /// too, `(x Wa^T, x Wb^T)`.
    #[allow(clippy::type_complexity)]
    fn gated_linear(&self, x: &Self::Buf, a: Weight, b: Weight, act: Activation, keep: bool) -> Result<(Self::Buf, Option<(Self::Buf, Self::Buf)>)> {
        let ya = self.linear(x, a, None, WeightRead::Rows)?;
        let yb = self.linear(x, b, None, WeightRead::Rows)?;
        let out = self.swiglu(&ya, &yb, act)?;
        Ok((out, keep.then_some((ya, yb))))
    }
    fn add(&self, a: &Self::Buf, b: &Self::Buf) -> Result<Self::Buf>;
    /// `residual + x W^T`: a projection and the residual add after it. The
    /// same values as `linear` then `add(residual, ..)`, which is what this
    /// default does; a backend may fuse them (CUDA adds the residual in the
    /// GEMV) but must give the same bits. `keep`: the projection too.
    fn linear_residual(&self, x: &Self::Buf, weight: Weight, read: WeightRead, residual: &Self::Buf, keep: bool) -> Result<(Self::Buf, Option<Self::Buf>)> {
        let y = self.linear(x, weight, None, read)?;
        let out = self.add(residual, &y)?;
        Ok((out, keep.then_some(y)))
    }
    /// Three projections of one input (attention's Q, K and V), each
    /// `(weight, bias, read)` as [`Backend::linear`] takes them. The same
    /// values as three `linear`s, which is what this default does; a
    /// backend may run them in one launch (CUDA: gemv3) but must give the
    /// same bits.
    fn linear3(&self, x: &Self::Buf, projections: [(Weight, Option<Weight>, WeightRead); 3]) -> Result<[Self::Buf; 3]> {
        linear3_separately(self, x, projections)
    }
    /// `linear3` of `rms_norm(x, norm, eps)`, for numerics that give the
    /// projections the norm's output as it is. The same values as the two,
    /// which is what this default does; a backend may fuse the norm into
    /// the projections (CUDA: each GEMV block normalizes x) but must give
    /// the same bits. `keep_norm`: the norm's output too.
    #[allow(clippy::type_complexity)]
    fn norm_linear3(&self, x: &Self::Buf, norm: Weight, eps: f32, projections: [(Weight, Option<Weight>, WeightRead); 3], keep_norm: bool) -> Result<([Self::Buf; 3], Option<Self::Buf>)> {
        let h = self.rms_norm(x, norm, eps)?;
        let out = self.linear3(&h, projections)?;
        Ok((out, keep_norm.then_some(h)))
    }
    /// `gated_linear` of `rms_norm(x, norm, eps)`, under the same terms as
    /// [`Backend::norm_linear3`]: the result, the two products when `keep`,
    /// the norm's output when `keep_norm`.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn norm_gated_linear(&self, x: &Self::Buf, norm: Weight, eps: f32, a: Weight, b: Weight, act: Activation, keep: bool, keep_norm: bool) -> Result<(Self::Buf, Option<(Self::Buf, Self::Buf)>, Option<Self::Buf>)> {
        let h = self.rms_norm(x, norm, eps)?;
        let (out, products) = self.gated_linear(&h, a, b, act, keep)?;
        Ok((out, products, keep_norm.then_some(h)))
    }
    /// RoPE of q and of k at `rope_pos0`, then K (rotated) and V into the
    /// cache at `kv_pos0`: the rotated q and k. The same values as `rope`,
    /// `rope`, `kv_store`, which is what this default does; a backend may
    /// fuse them (CUDA: one kernel) but must give the same bits.
    #[allow(clippy::too_many_arguments)]
    fn rope_qk_kv_store(
        &mut self,
        layer: usize,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        rope_pos0: usize,
        freq_base: f32,
        pairing: RopePairing,
        kv_pos0: usize,
    ) -> Result<(Self::Buf, Self::Buf)> {
        rope_qk_kv_store_separately(self, layer, q, k, v, rope_pos0, freq_base, pairing, kv_pos0)
    }
    /// act(gate) * up (act: silu for Qwen2).
    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf, act: Activation) -> Result<Self::Buf>;
    /// Forget the KV cache (a new sequence starts at position 0).
    fn reset_cache(&mut self) -> Result<()>;
    /// Each row (last dim) of `x` as ggml's CPU matmul sees it after
    /// converting it to `ty` (F16, BF16, Q8_0, Q8_1, Q8_K): bit for bit
    /// `gguf::quant::round_like_ggml` (numerics ggml). Rows that are not
    /// whole blocks of `ty` are left as they are.
    fn round_rows(&self, x: &Self::Buf, ty: GgmlType) -> Result<Self::Buf>;

    // Recorded decode steps (CUDA graphs; a backend that does not record
    // keeps these defaults). `key` names what the recorded pass depends on
    // besides the backend (the fault, the numerics): a pass recorded under
    // one key is never replayed under another.

    /// The logits `[n_vocab]` of the pass recorded under `key`, run for
    /// `token` at position `pos0`; `None` when none is recorded under `key`.
    fn replay_step(&mut self, _key: u64, _token: i32, _pos0: usize) -> Result<Option<Vec<f32>>> {
        Ok(None)
    }
    /// Start recording the ops of a single-token pass at `pos0` instead of
    /// running them; false when this backend does not record (now or ever).
    fn begin_recording(&mut self, _key: u64, _pos0: usize) -> Result<bool> {
        Ok(false)
    }
    /// End the recording with its pass's logits `[1, n_vocab]`. Nothing has
    /// run yet: `replay_step` runs it.
    fn end_recording(&mut self, _logits: Self::Buf) -> Result<()> {
        Ok(())
    }
    /// Abandon a recording whose pass failed; the backend records no more.
    fn abort_recording(&mut self, _why: &str) {}
    /// How decode steps run: recorded or op by op, and why (for reports).
    fn recording_status(&self) -> String {
        format!("op by op (the {} backend does not record)", self.name())
    }
}

/// [`Backend::linear3`] as three [`Backend::linear`]s (its default, and
/// what a backend that fuses them runs when told not to).
pub fn linear3_separately<B: Backend + ?Sized>(be: &B, x: &B::Buf, projections: [(Weight, Option<Weight>, WeightRead); 3]) -> Result<[B::Buf; 3]> {
    let [(w0, b0, r0), (w1, b1, r1), (w2, b2, r2)] = projections;
    Ok([be.linear(x, w0, b0, r0)?, be.linear(x, w1, b1, r1)?, be.linear(x, w2, b2, r2)?])
}

/// [`Backend::rope_qk_kv_store`] as `rope`, `rope`, `kv_store` (its default,
/// and what a backend that fuses them runs when told not to).
#[allow(clippy::too_many_arguments)]
pub fn rope_qk_kv_store_separately<B: Backend + ?Sized>(
    be: &mut B,
    layer: usize,
    q: &B::Buf,
    k: &B::Buf,
    v: &B::Buf,
    rope_pos0: usize,
    freq_base: f32,
    pairing: RopePairing,
    kv_pos0: usize,
) -> Result<(B::Buf, B::Buf)> {
    let q = be.rope(q, rope_pos0, freq_base, pairing)?;
    let k = be.rope(k, rope_pos0, freq_base, pairing)?;
    be.kv_store(layer, &k, v, kv_pos0)?;
    Ok((q, k))
}

/// [`Backend::attention`] as its three ops (the default, and CUDA's path
/// for rows too long for its fused kernel).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn attention_in_three_ops<B: Backend + ?Sized>(be: &B, layer: usize, q: &B::Buf, scale: f32, pos0: usize, n_kv: usize, head_map: HeadMap, round_probs: bool, keep: bool) -> Result<(B::Buf, Option<(B::Buf, B::Buf)>)> {
    let scores = be.attn_scores(layer, q, pos0, n_kv, head_map)?;
    let probs = be.softmax_causal(&scores, scale, pos0)?;
    let rounded = if round_probs { Some(be.round_rows(&probs, GgmlType::F16)?) } else { None };
    let ctx = be.attn_ctx(layer, rounded.as_ref().unwrap_or(&probs), n_kv, head_map)?;
    Ok((ctx, keep.then_some((scores, probs))))
}

/// What every backend is built with, besides the weights.
#[derive(Clone, Copy, Debug)]
pub struct BackendOptions {
    pub kv_type: KvType,
    /// KV cache capacity in positions (prompt + decode steps).
    pub max_ctx: usize,
    /// The `q5-0-high-bit` fault: the Q5_0 weights of this layer (`Some(Some(l))`)
    /// or of every layer (`Some(None)`) dequantized with the bug (the one
    /// fault that lives in the load, not in the pass).
    pub dequant_bug: Option<Option<usize>>,
}
