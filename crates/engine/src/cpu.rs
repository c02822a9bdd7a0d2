//! The CPU backend: the oracle. Weights are used as f32 (bit for bit ggml's
//! dequantized values; matrices stay encoded and are dequantized a row at a
//! time, see `stored`), every reduction (dot products, RMSNorm, softmax)
//! accumulates in f64, and the elementwise ops round once to f32. The only
//! deliberate rounding beyond that is the KV cache, which stores f16 when
//! asked, exactly as llama.cpp's default cache does.

use crate::arch::ArchSpec;
use crate::backend::{Backend, BackendOptions, Weight};
use capture::KvType;
use capture::Tensor;
use crate::fault::{Activation, HeadMap, RopePairing, WeightRead};
use crate::stored::{EncodedMatrix, StoredWeight};
use anyhow::{anyhow, bail, ensure, Context, Result};
use gguf::{GgmlType, GgufFile, Qwen2Config};
use half::f16;
use rayon::prelude::*;
use std::collections::HashMap;

pub struct CpuBackend {
    cfg: Qwen2Config,
    weights: HashMap<Weight, StoredWeight>,
    kv_type: KvType,
    max_ctx: usize,
    /// Per layer: `[positions, n_head_kv, head_dim]`, values already rounded
    /// to the cache type; grows on demand up to `max_ctx` positions.
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
}

impl CpuBackend {
    /// Every weight of `cfg` from `gguf`: matrices as views of the file in
    /// their encoding, vectors (and weights a fault changes at load)
    /// dequantized to f32. A tied LM head is token_embd, held once.
    pub fn load(gguf: &GgufFile, cfg: &Qwen2Config, opts: BackendOptions) -> Result<Self> {
        Self::load_observed(gguf, cfg, opts, &mut |_, _| {})
    }

    /// [`CpuBackend::load`], calling `on_weight(done, total)` after each
    /// weight: the caller shows progress (this crate never prints).
    pub fn load_observed(gguf: &GgufFile, cfg: &Qwen2Config, opts: BackendOptions, on_weight: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let all = Weight::all(&ArchSpec::qwen2(cfg), cfg.n_layer);
        let total = all.len();
        let mut weights = HashMap::with_capacity(total);
        for (done, w) in all.into_iter().enumerate() {
            let shape = w.shape(cfg);
            let name = w.gguf_name(cfg.tied_output);
            let info = gguf.tensor(&name).with_context(|| format!("{}: tensor {name} is missing", gguf.path().display()))?;
            let faulted = w.dequant_bug_applies(info.ggml_type, opts.dequant_bug);
            let stored = if shape.len() == 2 && !faulted {
                let dims: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
                ensure!(dims == shape, "tensor {name} has shape {dims:?}, expected {shape:?}");
                let m = EncodedMatrix::new(info.ggml_type, gguf.tensor_bytes(info), shape[0], shape[1]).with_context(|| format!("tensor {name}"))?;
                StoredWeight::Encoded(m)
            } else {
                StoredWeight::Float(w.dequantize_for(gguf, cfg, opts.dequant_bug)?)
            };
            weights.insert(w, stored);
            on_weight(done + 1, total);
        }
        Self::from_stored(cfg.clone(), weights, opts)
    }

    /// Build from weights already in f32, `[out, in]` matrices and `[n]`
    /// vectors. With a tied output, `Weight::Output` may be absent.
    pub fn from_weights(cfg: Qwen2Config, weights: HashMap<Weight, Tensor>, opts: BackendOptions) -> Result<Self> {
        Self::from_stored(cfg, weights.into_iter().map(|(w, t)| (w, StoredWeight::Float(t))).collect(), opts)
    }

    fn from_stored(cfg: Qwen2Config, weights: HashMap<Weight, StoredWeight>, opts: BackendOptions) -> Result<Self> {
        for w in Weight::all(&ArchSpec::qwen2(&cfg), cfg.n_layer) {
            let t = weights.get(&w).with_context(|| format!("weight {w:?} missing"))?;
            let expected = w.shape(&cfg);
            ensure!(t.shape() == expected, "weight {} has shape {:?}, expected {expected:?}", w.gguf_name(cfg.tied_output), t.shape());
        }
        let n_layer = cfg.n_layer;
        Ok(CpuBackend {
            k_cache: vec![Vec::new(); n_layer],
            v_cache: vec![Vec::new(); n_layer],
            cfg,
            weights,
            kv_type: opts.kv_type,
            max_ctx: opts.max_ctx,
        })
    }

    fn weight(&self, w: Weight) -> Result<&StoredWeight> {
        let stored = match w {
            Weight::Output if self.cfg.tied_output && !self.weights.contains_key(&w) => Weight::TokenEmbd,
            _ => w,
        };
        self.weights.get(&stored).ok_or_else(|| anyhow!("weight {w:?} not loaded"))
    }

    fn kv_group(&self, head: usize, map: HeadMap) -> usize {
        match map {
            HeadMap::Grouped => head / (self.cfg.n_head / self.cfg.n_head_kv),
            HeadMap::Modulo => head % self.cfg.n_head_kv,
            HeadMap::Ratio => head * self.cfg.n_head_kv / self.cfg.n_head,
        }
    }
}

/// Dot product in f64 with eight independent partial sums: the order is
/// fixed (deterministic) and the compiler can vectorize it.
#[inline]
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f64; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for i in 0..8 {
            acc[i] += x[i] as f64 * y[i] as f64;
        }
    }
    let mut tail = 0f64;
    for i in chunks * 8..a.len() {
        tail += a[i] as f64 * b[i] as f64;
    }
    acc.iter().sum::<f64>() + tail
}

/// gelu, tanh approximation: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))).
pub fn gelu_tanh(g: f64) -> f64 {
    0.5 * g * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh())
}

fn round_to_cache(v: f32, kv: KvType) -> f32 {
    match kv {
        KvType::F32 => v,
        KvType::F16 => f16::from_f32(v).to_f32(),
    }
}

impl Backend for CpuBackend {
    type Buf = Tensor;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn kv_type(&self) -> KvType {
        self.kv_type
    }

    fn shape<'a>(&self, buf: &'a Tensor) -> &'a [usize] {
        &buf.shape
    }

    fn reshape(&self, mut buf: Tensor, shape: &[usize]) -> Result<Tensor> {
        ensure!(shape.iter().product::<usize>() == buf.len(), "cannot reshape {:?} to {shape:?}", buf.shape);
        buf.shape = shape.to_vec();
        Ok(buf)
    }

    fn to_host(&self, buf: &Tensor) -> Result<Tensor> {
        Ok(buf.clone())
    }

    fn into_host(&self, buf: Tensor) -> Result<Tensor> {
        Ok(buf)
    }

    fn rows_to_host(&self, buf: &Tensor, start: usize, n: usize) -> Result<Tensor> {
        let cols = *buf.shape.last().ok_or_else(|| anyhow!("rows of a scalar"))?;
        ensure!((start + n) * cols <= buf.len(), "rows {start}..{} of a tensor of shape {:?}", start + n, buf.shape);
        Ok(Tensor::new(vec![n, cols], buf.data[start * cols..(start + n) * cols].to_vec()))
    }

    fn rows(&self, buf: &Tensor, start: usize, n: usize) -> Result<Tensor> {
        self.rows_to_host(buf, start, n)
    }

    fn from_host(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(tensor.clone())
    }

    fn embed(&self, tokens: &[i32], read: WeightRead) -> Result<Tensor> {
        let stored = self.weight(Weight::TokenEmbd)?;
        let n_embd = self.cfg.n_embd;
        // The transposed read needs the whole table; the right one a row per token.
        let table = (read == WeightRead::Transposed).then(|| stored.to_f32()).transpose()?;
        let mut buf = vec![0f32; n_embd];
        let mut out = Vec::with_capacity(tokens.len() * n_embd);
        for &t in tokens {
            let row = usize::try_from(t).ok().filter(|&r| r < self.cfg.n_vocab).with_context(|| {
                format!("token id {t} out of range: the vocabulary has {} tokens", self.cfg.n_vocab)
            })?;
            match &table {
                None => out.extend_from_slice(stored.row(row, &mut buf)?),
                // Column `row` of the buffer seen as [n_embd, n_vocab].
                Some(table) => out.extend((0..n_embd).map(|c| table.data[c * self.cfg.n_vocab + row])),
            }
        }
        Ok(Tensor::new(vec![tokens.len(), n_embd], out))
    }

    fn rms_norm(&self, x: &Tensor, weight: Weight, eps: f32) -> Result<Tensor> {
        let w = self.weight(weight)?.vector()?;
        let d = *x.shape.last().context("rms_norm of a scalar")?;
        ensure!(w.len() == d, "rms_norm: weight of {} for rows of {d}", w.len());
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d).zip(x.data.par_chunks(d)).for_each(|(o, row)| {
            let mean_sq = dot_f64(row, row) / d as f64;
            let inv = 1.0 / (mean_sq + eps as f64).sqrt();
            for i in 0..d {
                o[i] = (row[i] as f64 * inv * w[i] as f64) as f32;
            }
        });
        Ok(Tensor::new(x.shape.clone(), out))
    }

    fn linear(&self, x: &Tensor, weight: Weight, bias: Option<Weight>, read: WeightRead) -> Result<Tensor> {
        let stored = self.weight(weight)?;
        let (n_out, n_in) = match stored.shape()[..] {
            [o, i] => (o, i),
            ref s => bail!("linear: weight {weight:?} of shape {s:?} is not a matrix"),
        };
        let n = x.shape[0];
        ensure!(x.len() == n * n_in, "linear: input {:?} against weight [{n_out}, {n_in}]", x.shape);
        let b = bias.map(|b| self.weight(b).and_then(|b| b.vector())).transpose()?;
        // The transposed read gathers output o's weights with stride n_out
        // from the whole matrix (a fault: the copy is its cost alone).
        let gathered: Option<StoredWeight> = (read == WeightRead::Transposed)
            .then(|| -> Result<StoredWeight> {
                let w = stored.to_f32()?;
                let data = (0..n_out).flat_map(|o| (0..n_in).map(move |i| (o, i))).map(|(o, i)| w.data[i * n_out + o]).collect();
                Ok(StoredWeight::Float(Tensor::new(vec![n_out, n_in], data)))
            })
            .transpose()?;
        let rows = gathered.as_ref().unwrap_or(stored);
        // Parallel over output features: each task takes one weight row
        // (dequantized into the task's buffer, cache-resident) against every
        // token. Bands of features bound the transposed scratch to a band's
        // share of the output (the LM head's is vocabulary-wide).
        const BAND: usize = 4096;
        let mut out = vec![0f32; n * n_out];
        let mut out_t = vec![0f32; BAND.min(n_out) * n];
        for band in (0..n_out).step_by(BAND) {
            let width = BAND.min(n_out - band);
            out_t[..width * n].par_chunks_mut(n).enumerate().try_for_each_init(
                || vec![0f32; n_in],
                |buf, (i, col)| -> Result<()> {
                    let o = band + i;
                    let wr = rows.row(o, buf)?;
                    let bias = b.map_or(0.0, |b| b[o] as f64);
                    for (t, c) in col.iter_mut().enumerate() {
                        *c = (dot_f64(&x.data[t * n_in..(t + 1) * n_in], wr) + bias) as f32;
                    }
                    Ok(())
                },
            )?;
            for i in 0..width {
                for t in 0..n {
                    out[t * n_out + band + i] = out_t[i * n + t];
                }
            }
        }
        Ok(Tensor::new(vec![n, n_out], out))
    }

    fn rope(&self, x: &Tensor, pos0: usize, freq_base: f32, pairing: RopePairing) -> Result<Tensor> {
        ensure!(x.shape.len() == 3, "rope expects [tokens, heads, head_dim], got {:?}", x.shape);
        let (n, heads, hd) = (x.shape[0], x.shape[1], x.shape[2]);
        let half = hd / 2;
        let mut out = x.data.clone();
        for t in 0..n {
            let pos = (pos0 + t) as f64;
            for i in 0..half {
                let theta = pos * (freq_base as f64).powf(-2.0 * i as f64 / hd as f64);
                let (sin, cos) = theta.sin_cos();
                let (a, b) = match pairing {
                    RopePairing::Neox => (i, i + half),
                    RopePairing::Adjacent => (2 * i, 2 * i + 1),
                };
                for h in 0..heads {
                    let base = (t * heads + h) * hd;
                    let (x0, x1) = (x.data[base + a] as f64, x.data[base + b] as f64);
                    out[base + a] = (x0 * cos - x1 * sin) as f32;
                    out[base + b] = (x0 * sin + x1 * cos) as f32;
                }
            }
        }
        Ok(Tensor::new(x.shape.clone(), out))
    }

    fn kv_store(&mut self, layer: usize, k: &Tensor, v: &Tensor, pos0: usize) -> Result<()> {
        let kv_dim = self.cfg.n_head_kv * self.cfg.head_dim;
        let n = k.shape[0];
        ensure!(k.len() == n * kv_dim && v.len() == n * kv_dim, "kv_store: K {:?} / V {:?}", k.shape, v.shape);
        if pos0 + n > self.max_ctx {
            bail!("KV cache full: positions {pos0}..{} exceed its {} slots", pos0 + n, self.max_ctx);
        }
        let kv = self.kv_type;
        let (kc, vc) = (&mut self.k_cache[layer], &mut self.v_cache[layer]);
        if kc.len() < (pos0 + n) * kv_dim {
            kc.resize((pos0 + n) * kv_dim, 0.0);
            vc.resize((pos0 + n) * kv_dim, 0.0);
        }
        for i in 0..n * kv_dim {
            kc[pos0 * kv_dim + i] = round_to_cache(k.data[i], kv);
            vc[pos0 * kv_dim + i] = round_to_cache(v.data[i], kv);
        }
        Ok(())
    }

    fn attn_scores(&self, layer: usize, q: &Tensor, pos0: usize, n_kv: usize, head_map: HeadMap) -> Result<Tensor> {
        let (n, heads, hd) = (q.shape[0], self.cfg.n_head, self.cfg.head_dim);
        ensure!(q.len() == n * heads * hd, "attn_scores: q {:?}", q.shape);
        let kv_dim = self.cfg.n_head_kv * hd;
        let kc = &self.k_cache[layer];
        ensure!(kc.len() >= n_kv * kv_dim, "attn_scores: {n_kv} positions but the cache holds {}", kc.len() / kv_dim);
        let mut out = vec![0f32; heads * n * n_kv];
        out.par_chunks_mut(n * n_kv).enumerate().for_each(|(h, head_out)| {
            let g = self.kv_group(h, head_map);
            for t in 0..n {
                let qrow = &q.data[(t * heads + h) * hd..(t * heads + h + 1) * hd];
                // Causal: query at position pos0 + t sees keys 0..=pos0 + t.
                for j in 0..n_kv.min(pos0 + t + 1) {
                    let krow = &kc[j * kv_dim + g * hd..j * kv_dim + (g + 1) * hd];
                    head_out[t * n_kv + j] = dot_f64(qrow, krow) as f32;
                }
            }
        });
        Ok(Tensor::new(vec![heads, n, n_kv], out))
    }

    fn softmax_causal(&self, scores: &Tensor, scale: f32, pos0: usize) -> Result<Tensor> {
        ensure!(scores.shape.len() == 3, "softmax expects [heads, tokens, n_kv], got {:?}", scores.shape);
        let (n, n_kv) = (scores.shape[1], scores.shape[2]);
        let mut out = vec![0f32; scores.len()];
        out.par_chunks_mut(n_kv).zip(scores.data.par_chunks(n_kv)).enumerate().for_each(|(r, (o, s))| {
            let limit = n_kv.min(pos0 + r % n + 1);
            let max = s[..limit].iter().map(|&v| v as f64 * scale as f64).fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s[..limit].iter().map(|&v| (v as f64 * scale as f64 - max).exp()).sum();
            for j in 0..limit {
                o[j] = ((s[j] as f64 * scale as f64 - max).exp() / sum) as f32;
            }
        });
        Ok(Tensor::new(scores.shape.clone(), out))
    }

    fn attn_ctx(&self, layer: usize, probs: &Tensor, n_kv: usize, head_map: HeadMap) -> Result<Tensor> {
        let (heads, hd) = (self.cfg.n_head, self.cfg.head_dim);
        let n = probs.shape[1];
        ensure!(probs.shape == [heads, n, n_kv], "attn_ctx: probs {:?}", probs.shape);
        let kv_dim = self.cfg.n_head_kv * hd;
        let vc = &self.v_cache[layer];
        ensure!(vc.len() >= n_kv * kv_dim, "attn_ctx: {n_kv} positions but the cache holds {}", vc.len() / kv_dim);
        let mut out = vec![0f32; n * heads * hd];
        out.par_chunks_mut(heads * hd).enumerate().for_each(|(t, row)| {
            let mut acc = vec![0f64; hd];
            for h in 0..heads {
                let g = self.kv_group(h, head_map);
                acc.iter_mut().for_each(|a| *a = 0.0);
                let p = &probs.data[(h * n + t) * n_kv..(h * n + t + 1) * n_kv];
                for (j, &pj) in p.iter().enumerate() {
                    if pj == 0.0 {
                        continue;
                    }
                    let vrow = &vc[j * kv_dim + g * hd..j * kv_dim + (g + 1) * hd];
                    for d in 0..hd {
                        acc[d] += pj as f64 * vrow[d] as f64;
                    }
                }
                for d in 0..hd {
                    row[h * hd + d] = acc[d] as f32;
                }
            }
        });
        Ok(Tensor::new(vec![n, heads, hd], out))
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        ensure!(a.len() == b.len(), "add: {:?} + {:?}", a.shape, b.shape);
        Ok(Tensor::new(a.shape.clone(), a.data.iter().zip(&b.data).map(|(x, y)| x + y).collect()))
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
        ensure!(gate.len() == up.len(), "swiglu: {:?} * {:?}", gate.shape, up.shape);
        let data = gate
            .data
            .par_iter()
            .zip(up.data.par_iter())
            .map(|(&g, &u)| {
                let g = g as f64;
                let a = match act {
                    Activation::Silu => g / (1.0 + (-g).exp()),
                    Activation::Gelu => gelu_tanh(g),
                };
                (a * u as f64) as f32
            })
            .collect();
        Ok(Tensor::new(gate.shape.clone(), data))
    }

    fn round_rows(&self, x: &Tensor, ty: GgmlType) -> Result<Tensor> {
        let mut out = x.clone();
        let width = *x.shape.last().unwrap_or(&1);
        if width > 0 {
            out.data.par_chunks_exact_mut(width).for_each(|row| gguf::quant::round_like_ggml(ty, row));
        }
        Ok(out)
    }

    fn reset_cache(&mut self) -> Result<()> {
        for c in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
            c.clear();
        }
        Ok(())
    }
}
