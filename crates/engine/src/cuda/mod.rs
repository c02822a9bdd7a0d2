//! The CUDA backend: the same ops as the CPU oracle, on one NVIDIA GPU, through
//! cudarc (driver API, cuBLAS, NVRTC; libraries loaded at run time).
//!
//! - **Probe first.** cudarc's dynamic loader panics where `libcuda` is
//!   missing, so [`cuda_available`] dlopens the driver, cuBLAS and NVRTC itself
//!   (cudarc's non-panicking `is_culib_present`) and counts devices before any
//!   other cudarc call; [`CudaBackend::load`] and [`CudaBackend::from_weights`]
//!   call it and fail with "no CUDA device: use --backend cpu".
//! - **Kernels** are CUDA C in `kernels/*.cu`, embedded with `include_str!`
//!   and compiled by NVRTC once per process (the PTX is cached in a
//!   `OnceLock`); each backend loads the cached PTX into its own context.
//! - **Weights** are dequantized on the host at load (with `gguf`'s
//!   dequantizer, the one the CPU oracle and the weight-level check against
//!   ggml use) and kept on the GPU as f32 in GGUF's `[out, in]` row-major
//!   layout. This is the simplest correct form: every quant type the GGUF
//!   reader knows works without a dequantizing kernel per type, the matmuls
//!   see exactly the weights the CPU oracle sees, so CUDA vs CPU differs only
//!   by f32 summation order, and the cost is memory: Qwen2.5-0.5B is about
//!   0.5 G parameters x 4 bytes = 2 GB (the untied LM head included), a few
//!   per cent of an 80 GB H100. A tied LM head is stored once.
//! - **Linear** is cuBLAS sgemm (see [`CudaBackend::linear`] for the transpose
//!   flags) plus a bias kernel; cuBLAS's default math mode for sgemm keeps
//!   f32 (no TF32).
//! - **KV cache** per layer `[max_ctx, n_head_kv, head_dim]` on the GPU, f16
//!   (raw 16-bit words, round-to-nearest-even on store, as ggml's f32->f16) or
//!   f32 per [`BackendOptions::kv_type`]. GQA is an index map inside the
//!   attention kernels ([`HeadMap`]), K/V are never repeated.
//! - **Checkpoints**: ops only launch kernels; [`Backend::to_host`] is the one
//!   device-to-host copy and is synchronous (the stream is synchronized and
//!   any asynchronous kernel error surfaces there, with context).

use crate::arch::ArchSpec;
use crate::backend::{Backend, BackendOptions, Weight};
use capture::KvType;
use capture::Tensor;
use crate::fault::{Activation, HeadMap, RopePairing, WeightRead};
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use gguf::{GgufFile, Qwen2Config};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// The one message every "no GPU here" path starts with.
pub const NO_DEVICE: &str = "no CUDA device: use --backend cpu";

/// Kernel sources, embedded in the binary: (file name, source).
const SOURCES: [(&str, &str); 4] = [
    ("elementwise.cu", include_str!("../../../../kernels/elementwise.cu")),
    ("norm.cu", include_str!("../../../../kernels/norm.cu")),
    ("rope.cu", include_str!("../../../../kernels/rope.cu")),
    ("attention.cu", include_str!("../../../../kernels/attention.cu")),
];

/// Threads per block of the element-wise (grid-stride) kernels.
const BLOCK: u32 = 256;
/// Threads per block of the row kernels (must match NORM_THREADS / SOFTMAX_THREADS in the .cu files).
const ROW_BLOCK: u32 = 256;

/// Whether this process can use CUDA: the driver library loads, cuBLAS and
/// NVRTC load, and at least one device answers. Never panics (it is the
/// probe that keeps cudarc's panicking loader from ever running without a
/// driver). The error is one line starting with [`NO_DEVICE`].
pub fn cuda_available() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe).clone()
}

fn probe() -> Result<(), String> {
    // SAFETY: dlopen of the named libraries; nothing is called in them.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(NO_DEVICE.to_string());
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(format!("{NO_DEVICE} (libcuda loads but cuBLAS does not)"));
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(format!("{NO_DEVICE} (libcuda loads but NVRTC does not)"));
    }
    // The driver is present; a missing symbol (a driver too old for the
    // CUDA 13.0 bindings) would still panic inside cudarc: catch that too.
    match std::panic::catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err(format!("{NO_DEVICE} (the driver reports 0 devices)")),
        Ok(Err(e)) => Err(format!("{NO_DEVICE} (cuInit/cuDeviceGetCount: {e})")),
        Err(_) => Err(format!("{NO_DEVICE} (the CUDA driver is missing symbols: too old for CUDA 13.0?)")),
    }
}

/// NVRTC output for every kernel file, compiled once per process.
fn ptx() -> Result<&'static [(&'static str, Ptx)]> {
    static PTX: OnceLock<Result<Vec<(&'static str, Ptx)>, String>> = OnceLock::new();
    let compiled = PTX.get_or_init(|| {
        SOURCES
            .iter()
            .map(|(name, src)| {
                let opts = cudarc::nvrtc::CompileOptions {
                    name: Some(name.to_string()),
                    // Accurate math: no fast-math, IEEE division and sqrt, no flush to zero.
                    ftz: Some(false),
                    prec_div: Some(true),
                    prec_sqrt: Some(true),
                    ..Default::default()
                };
                cudarc::nvrtc::compile_ptx_with_opts(*src, opts)
                    .map(|p| (*name, p))
                    .map_err(|e| format!("NVRTC failed to compile kernels/{name}: {e:?}"))
            })
            .collect()
    });
    match compiled {
        Ok(v) => Ok(v.as_slice()),
        Err(e) => Err(anyhow!("{e}")),
    }
}

/// A tensor on the GPU: f32, row-major, with its shape.
pub struct CudaBuf {
    pub data: CudaSlice<f32>,
    pub shape: Vec<usize>,
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.len() == 0
    }
}

struct Kernels {
    embed: CudaFunction,
    add_bias: CudaFunction,
    add: CudaFunction,
    swiglu: CudaFunction,
    rms_norm: CudaFunction,
    rope: CudaFunction,
    kv_store_f32: CudaFunction,
    kv_store_f16: CudaFunction,
    attn_scores_f32: CudaFunction,
    attn_scores_f16: CudaFunction,
    attn_ctx_f32: CudaFunction,
    attn_ctx_f16: CudaFunction,
    softmax_causal: CudaFunction,
}

impl Kernels {
    fn load(ctx: &Arc<CudaContext>) -> Result<Kernels> {
        let mut modules: HashMap<&str, Arc<CudaModule>> = HashMap::new();
        for (name, p) in ptx()? {
            let m = ctx.load_module(p.clone()).with_context(|| format!("loading the PTX of kernels/{name}"))?;
            modules.insert(name, m);
        }
        let f = |file: &str, func: &str| -> Result<CudaFunction> {
            modules[file].load_function(func).with_context(|| format!("kernel {func} in kernels/{file}"))
        };
        Ok(Kernels {
            embed: f("elementwise.cu", "embed_f32")?,
            add_bias: f("elementwise.cu", "add_bias_f32")?,
            add: f("elementwise.cu", "add_f32")?,
            swiglu: f("elementwise.cu", "swiglu_f32")?,
            rms_norm: f("norm.cu", "rms_norm_f32")?,
            rope: f("rope.cu", "rope_f32")?,
            kv_store_f32: f("attention.cu", "kv_store_f32")?,
            kv_store_f16: f("attention.cu", "kv_store_f16")?,
            attn_scores_f32: f("attention.cu", "attn_scores_f32")?,
            attn_scores_f16: f("attention.cu", "attn_scores_f16")?,
            attn_ctx_f32: f("attention.cu", "attn_ctx_f32")?,
            attn_ctx_f16: f("attention.cu", "attn_ctx_f16")?,
            softmax_causal: f("attention.cu", "softmax_causal_f32")?,
        })
    }
}

/// Per-layer K and V caches, `[max_ctx, n_head_kv, head_dim]` each.
enum KvCache {
    F32 { k: Vec<CudaSlice<f32>>, v: Vec<CudaSlice<f32>> },
    /// IEEE half as raw 16-bit words.
    F16 { k: Vec<CudaSlice<u16>>, v: Vec<CudaSlice<u16>> },
}

/// The Qwen2 ops on one CUDA device.
pub struct CudaBackend {
    cfg: Qwen2Config,
    opts: BackendOptions,
    device_name: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    weights: HashMap<Weight, CudaBuf>,
    cache: KvCache,
}

/// Grid for a grid-stride kernel over `n` elements (n > 0).
fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn rows_grid(rows: usize) -> Result<LaunchConfig> {
    let rows = u32::try_from(rows).ok().filter(|&r| r < i32::MAX as u32).ok_or_else(|| anyhow!("{rows} rows: too many for one launch"))?;
    Ok(LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (ROW_BLOCK, 1, 1), shared_mem_bytes: 0 })
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("{what} = {v} does not fit a 32-bit kernel argument"))
}

impl CudaBackend {
    /// Dequantize every weight of `gguf` on the host and upload it as f32.
    pub fn load(gguf: &GgufFile, cfg: &Qwen2Config, opts: BackendOptions) -> Result<Self> {
        Self::load_observed(gguf, cfg, opts, &mut |_, _| {})
    }

    /// [`CudaBackend::load`], calling `on_weight(done, total)` after each
    /// group of weights is uploaded: the caller shows progress (this crate
    /// never prints).
    pub fn load_observed(gguf: &GgufFile, cfg: &Qwen2Config, opts: BackendOptions, on_weight: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        use rayon::prelude::*;
        let mut backend = Self::empty(cfg.clone(), opts)?;
        // A tied LM head is token_embd: stored once, resolved by `weight`.
        let all = Weight::all(&ArchSpec::qwen2(cfg), cfg.n_layer);
        let mut done = 0;
        // Dequantize a layer's worth of tensors in parallel, upload, go on:
        // host memory stays at a few layers' f32, not the whole model's.
        for group in all.chunks(12) {
            let data: Vec<(Weight, Tensor)> =
                group.par_iter().map(|&w| Ok((w, w.dequantize_for(gguf, cfg, opts.dequant_bug)?))).collect::<Result<_>>()?;
            for (w, d) in data {
                backend.upload_weight(w, &d.data).with_context(|| format!("uploading {}", w.gguf_name(cfg.tied_output)))?;
            }
            done += group.len();
            on_weight(done, all.len());
        }
        Ok(backend)
    }

    /// Build from f32 weights in GGUF layout (matrices `[out, in]`, vectors
    /// `[n]`). With a tied output, `Weight::Output` may be absent.
    pub fn from_weights(cfg: Qwen2Config, weights: HashMap<Weight, Tensor>, opts: BackendOptions) -> Result<Self> {
        let mut backend = Self::empty(cfg.clone(), opts)?;
        for w in Weight::all(&ArchSpec::qwen2(&cfg), cfg.n_layer) {
            let t = weights.get(&w).ok_or_else(|| anyhow!("weight {w:?} missing"))?;
            backend.upload_weight(w, &t.data).with_context(|| format!("uploading weight {w:?}"))?;
        }
        Ok(backend)
    }

    fn empty(cfg: Qwen2Config, opts: BackendOptions) -> Result<Self> {
        cuda_available().map_err(|e| anyhow!(e))?;
        ensure!(cfg.n_head > 0 && cfg.n_head_kv > 0 && cfg.n_head.is_multiple_of(cfg.n_head_kv), "n_head {} is not a multiple of n_head_kv {}", cfg.n_head, cfg.n_head_kv);
        ensure!(cfg.head_dim.is_multiple_of(2), "head_dim {} is odd: RoPE needs pairs", cfg.head_dim);
        ensure!(opts.max_ctx > 0, "max_ctx must be positive");
        let ctx = CudaContext::new(0).context("creating a CUDA context on device 0")?;
        let device_name = ctx.name().context("cuDeviceGetName")?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).context("creating the cuBLAS handle")?;
        let k = Kernels::load(&ctx)?;
        let per_layer = opts
            .max_ctx
            .checked_mul(cfg.n_head_kv * cfg.head_dim)
            .filter(|&n| n <= isize::MAX as usize / 4)
            .ok_or_else(|| anyhow!("KV cache of {} positions is too large", opts.max_ctx))?;
        let cache = match opts.kv_type {
            KvType::F32 => {
                let mut k = Vec::new();
                let mut v = Vec::new();
                for _ in 0..cfg.n_layer {
                    k.push(stream.alloc_zeros::<f32>(per_layer).context("allocating the K cache")?);
                    v.push(stream.alloc_zeros::<f32>(per_layer).context("allocating the V cache")?);
                }
                KvCache::F32 { k, v }
            }
            KvType::F16 => {
                let mut k = Vec::new();
                let mut v = Vec::new();
                for _ in 0..cfg.n_layer {
                    k.push(stream.alloc_zeros::<u16>(per_layer).context("allocating the K cache")?);
                    v.push(stream.alloc_zeros::<u16>(per_layer).context("allocating the V cache")?);
                }
                KvCache::F16 { k, v }
            }
        };
        Ok(CudaBackend { cfg, opts, device_name, ctx, stream, blas, k, weights: HashMap::new(), cache })
    }

    fn upload_weight(&mut self, w: Weight, data: &[f32]) -> Result<()> {
        let shape = w.shape(&self.cfg);
        let n: usize = shape.iter().product();
        ensure!(data.len() == n, "{w:?} has {} values, expected {n} for shape {shape:?}", data.len());
        let data = self.stream.clone_htod(data).context("host-to-device copy")?;
        self.weights.insert(w, CudaBuf { data, shape });
        Ok(())
    }

    fn weight(&self, w: Weight) -> Result<&CudaBuf> {
        let w = if w == Weight::Output && self.cfg.tied_output && !self.weights.contains_key(&w) { Weight::TokenEmbd } else { w };
        self.weights.get(&w).ok_or_else(|| anyhow!("weight {w:?} not loaded"))
    }

    /// The device's name, as the driver reports it (e.g. "NVIDIA H100 80GB HBM3").
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    pub fn config(&self) -> &Qwen2Config {
        &self.cfg
    }

    /// Bytes of GPU memory held by the weights.
    pub fn weight_bytes(&self) -> usize {
        self.weights.values().map(|b| b.len() * 4).sum()
    }

    /// Wait for every queued kernel; surfaces asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().context("synchronizing the CUDA stream")
    }

    fn alloc(&self, shape: Vec<usize>) -> Result<CudaBuf> {
        let n: usize = shape.iter().product();
        ensure!(n > 0, "empty tensor of shape {shape:?}");
        // SAFETY: every kernel that receives a fresh buffer writes all of it.
        let data = unsafe { self.stream.alloc::<f32>(n) }.with_context(|| {
            format!(
                "allocating a [{}] tensor ({:.2} GiB) on the GPU failed (out of GPU memory?): ask for a shorter prompt, fewer decode steps, or --backend cpu",
                shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
                n as f64 * 4.0 / (1u64 << 30) as f64
            )
        })?;
        Ok(CudaBuf { data, shape })
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        ensure!(layer < self.cfg.n_layer, "layer {layer} out of range (n_layer {})", self.cfg.n_layer);
        Ok(())
    }

    fn head_map_code(&self, n_head: usize, head_map: HeadMap) -> Result<i32> {
        ensure!(n_head.is_multiple_of(self.cfg.n_head_kv), "{n_head} query heads are not a multiple of {} KV heads", self.cfg.n_head_kv);
        Ok(match head_map {
            HeadMap::Grouped => 0,
            HeadMap::Modulo => 1,
            HeadMap::Ratio => 2,
        })
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn kv_type(&self) -> KvType {
        self.opts.kv_type
    }

    fn shape<'a>(&self, buf: &'a CudaBuf) -> &'a [usize] {
        &buf.shape
    }

    fn reshape(&self, buf: CudaBuf, shape: &[usize]) -> Result<CudaBuf> {
        let n: usize = shape.iter().product();
        ensure!(n == buf.len(), "cannot reshape {:?} ({} values) to {shape:?}", buf.shape, buf.len());
        Ok(CudaBuf { data: buf.data, shape: shape.to_vec() })
    }

    fn to_host(&self, buf: &CudaBuf) -> Result<Tensor> {
        let data = self.stream.clone_dtoh(&buf.data).context("device-to-host copy")?;
        self.synchronize()?;
        ensure!(data.len() == buf.shape.iter().product::<usize>(), "buffer of {} values has shape {:?}", data.len(), buf.shape);
        Ok(Tensor::new(buf.shape.clone(), data))
    }

    fn from_host(&self, tensor: &Tensor) -> Result<CudaBuf> {
        ensure!(!tensor.data.is_empty(), "empty tensor");
        let data = self.stream.clone_htod(&tensor.data).context("host-to-device copy")?;
        Ok(CudaBuf { data, shape: tensor.shape.clone() })
    }

    fn embed(&self, tokens: &[i32], read: WeightRead) -> Result<CudaBuf> {
        ensure!(!tokens.is_empty(), "no tokens");
        if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t as usize >= self.cfg.n_vocab) {
            bail!("token id {bad} out of range (n_vocab {})", self.cfg.n_vocab);
        }
        let table = self.weight(Weight::TokenEmbd)?;
        let ids = self.stream.clone_htod(tokens).context("uploading token ids")?;
        let n_embd = self.cfg.n_embd;
        let mut out = self.alloc(vec![tokens.len(), n_embd])?;
        let (nt, ne, nv) = (i32_of(tokens.len(), "n_tokens")?, i32_of(n_embd, "n_embd")?, i32_of(self.cfg.n_vocab, "n_vocab")?);
        let transposed = i32::from(read == WeightRead::Transposed);
        let cfg = grid_for(out.len());
        let mut b = self.stream.launch_builder(&self.k.embed);
        b.arg(&table.data).arg(&ids).arg(&mut out.data).arg(&nt).arg(&ne).arg(&nv).arg(&transposed);
        unsafe { b.launch(cfg) }.context("launching embed_f32")?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaBuf, weight: Weight, eps: f32) -> Result<CudaBuf> {
        let w = self.weight(weight)?;
        let n_cols = *x.shape.last().ok_or_else(|| anyhow!("rms_norm of a scalar"))?;
        ensure!(w.len() == n_cols, "rms_norm: weight {weight:?} has {} values, rows have {n_cols}", w.len());
        let rows = x.len() / n_cols;
        let mut out = self.alloc(x.shape.clone())?;
        let nc = i32_of(n_cols, "n_cols")?;
        let mut b = self.stream.launch_builder(&self.k.rms_norm);
        b.arg(&x.data).arg(&w.data).arg(&mut out.data).arg(&nc).arg(&eps);
        unsafe { b.launch(rows_grid(rows)?) }.context("launching rms_norm_f32")?;
        Ok(out)
    }

    /// Row-major `y[n, out] = x[n, in] · W[out, in]^T (+ b)` through
    /// column-major cuBLAS: a row-major `[r, c]` array is the column-major
    /// `[c, r]` matrix, its transpose. So `y^T[out, n] = W · x^T`, with
    /// A = W's storage (column-major `[in, out]` = W^T, ld = in, op T gives
    /// W), B = x's storage (column-major `[in, n]` = x^T, ld = in, op N),
    /// C = y's storage (column-major `[out, n]` = y^T, ld = out);
    /// m = out, n = n_tokens, k = in.
    ///
    /// `WeightRead::Transposed` (a fault) flips A's flag and takes its
    /// leading dimension from the other side: A's storage as column-major
    /// `[out, in]` (ld = out, op N), i.e. W's buffer read as `[in, out]`.
    fn linear(&self, x: &CudaBuf, weight: Weight, bias: Option<Weight>, read: WeightRead) -> Result<CudaBuf> {
        let w = self.weight(weight)?;
        ensure!(w.shape.len() == 2, "linear: {weight:?} is not a matrix");
        let (n_out, n_in) = (w.shape[0], w.shape[1]);
        let last = *x.shape.last().ok_or_else(|| anyhow!("linear of a scalar"))?;
        ensure!(last == n_in, "linear: x rows have {last} values, {weight:?} expects {n_in}");
        let n = x.len() / n_in;
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap() = n_out;
        if shape.len() > 2 {
            shape = vec![n, n_out];
        }
        let mut y = self.alloc(shape)?;
        let (transa, lda) = match read {
            WeightRead::Rows => (cublasOperation_t::CUBLAS_OP_T, n_in),
            WeightRead::Transposed => (cublasOperation_t::CUBLAS_OP_N, n_out),
        };
        let cfg = GemmConfig {
            transa,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: i32_of(n_out, "out")?,
            n: i32_of(n, "n_tokens")?,
            k: i32_of(n_in, "in")?,
            alpha: 1.0f32,
            lda: i32_of(lda, "lda")?,
            ldb: i32_of(n_in, "ldb")?,
            beta: 0.0f32,
            ldc: i32_of(n_out, "ldc")?,
        };
        unsafe { self.blas.gemm(cfg, &w.data, &x.data, &mut y.data) }.with_context(|| format!("cublasSgemm for {weight:?}"))?;
        if let Some(bw) = bias {
            let bvec = self.weight(bw)?;
            ensure!(bvec.len() == n_out, "bias {bw:?} has {} values, output rows {n_out}", bvec.len());
            let (nr, nc) = (i32_of(n, "rows")?, i32_of(n_out, "cols")?);
            let cfg = grid_for(y.len());
            let mut b = self.stream.launch_builder(&self.k.add_bias);
            b.arg(&mut y.data).arg(&bvec.data).arg(&nr).arg(&nc);
            unsafe { b.launch(cfg) }.context("launching add_bias_f32")?;
        }
        Ok(y)
    }

    fn rope(&self, x: &CudaBuf, pos0: usize, freq_base: f32, pairing: RopePairing) -> Result<CudaBuf> {
        ensure!(x.shape.len() == 3, "rope expects [n_tokens, n_heads, head_dim], got {:?}", x.shape);
        let (nt, nh, hd) = (x.shape[0], x.shape[1], x.shape[2]);
        ensure!(hd.is_multiple_of(2), "rope: odd head_dim {hd}");
        let mut out = self.alloc(x.shape.clone())?;
        let (nt_, nh_, hd_, p0) = (i32_of(nt, "n_tokens")?, i32_of(nh, "n_heads")?, i32_of(hd, "head_dim")?, i32_of(pos0, "pos0")?);
        i32_of(pos0 + nt, "last position")?;
        let pairing: i32 = match pairing {
            RopePairing::Neox => 0,
            RopePairing::Adjacent => 1,
        };
        let mut b = self.stream.launch_builder(&self.k.rope);
        b.arg(&x.data).arg(&mut out.data).arg(&nt_).arg(&nh_).arg(&hd_).arg(&p0).arg(&freq_base).arg(&pairing);
        unsafe { b.launch(grid_for(nt * nh * hd / 2)) }.context("launching rope_f32")?;
        Ok(out)
    }

    fn kv_store(&mut self, layer: usize, k: &CudaBuf, v: &CudaBuf, pos0: usize) -> Result<()> {
        self.check_layer(layer)?;
        let kv_row = self.cfg.n_head_kv * self.cfg.head_dim;
        ensure!(k.shape == v.shape, "kv_store: K {:?} and V {:?} differ", k.shape, v.shape);
        let shape_ok = match k.shape.as_slice() {
            [_, h, d] => *h == self.cfg.n_head_kv && *d == self.cfg.head_dim,
            [_, r] => *r == kv_row,
            _ => false,
        };
        ensure!(shape_ok, "kv_store: K of shape {:?} is not [n_tokens, {}, {}]", k.shape, self.cfg.n_head_kv, self.cfg.head_dim);
        let nt = k.len() / kv_row;
        ensure!(pos0 + nt <= self.opts.max_ctx, "kv_store: positions {pos0}..{} beyond the cache capacity {}", pos0 + nt, self.opts.max_ctx);
        let (nt_, row_, p0) = (i32_of(nt, "n_tokens")?, i32_of(kv_row, "kv_row")?, i32_of(pos0, "pos0")?);
        let cfg = grid_for(k.len());
        match &mut self.cache {
            KvCache::F32 { k: kc, v: vc } => {
                let mut b = self.stream.launch_builder(&self.k.kv_store_f32);
                b.arg(&k.data).arg(&v.data).arg(&mut kc[layer]).arg(&mut vc[layer]).arg(&nt_).arg(&row_).arg(&p0);
                unsafe { b.launch(cfg) }.context("launching kv_store_f32")?;
            }
            KvCache::F16 { k: kc, v: vc } => {
                let mut b = self.stream.launch_builder(&self.k.kv_store_f16);
                b.arg(&k.data).arg(&v.data).arg(&mut kc[layer]).arg(&mut vc[layer]).arg(&nt_).arg(&row_).arg(&p0);
                unsafe { b.launch(cfg) }.context("launching kv_store_f16")?;
            }
        }
        Ok(())
    }

    fn attn_scores(&self, layer: usize, q: &CudaBuf, pos0: usize, n_kv: usize, head_map: HeadMap) -> Result<CudaBuf> {
        self.check_layer(layer)?;
        ensure!(q.shape.len() == 3 && q.shape[2] == self.cfg.head_dim, "attn_scores: q {:?} is not [n_tokens, n_head, {}]", q.shape, self.cfg.head_dim);
        ensure!(n_kv > 0 && n_kv <= self.opts.max_ctx, "attn_scores: n_kv {n_kv} outside 1..={}", self.opts.max_ctx);
        let (nt, nh, hd) = (q.shape[0], q.shape[1], q.shape[2]);
        let hm = self.head_map_code(nh, head_map)?;
        let mut out = self.alloc(vec![nh, nt, n_kv])?;
        let a = [i32_of(nh, "n_head")?, i32_of(nt, "n_tokens")?, i32_of(n_kv, "n_kv")?, i32_of(hd, "head_dim")?, i32_of(self.cfg.n_head_kv, "n_head_kv")?, i32_of(pos0, "pos0")?, hm];
        let cfg = grid_for(out.len());
        let mut b = match &self.cache {
            KvCache::F32 { k, .. } => {
                let mut b = self.stream.launch_builder(&self.k.attn_scores_f32);
                b.arg(&q.data).arg(&k[layer]);
                b
            }
            KvCache::F16 { k, .. } => {
                let mut b = self.stream.launch_builder(&self.k.attn_scores_f16);
                b.arg(&q.data).arg(&k[layer]);
                b
            }
        };
        b.arg(&mut out.data);
        for v in &a {
            b.arg(v);
        }
        unsafe { b.launch(cfg) }.context("launching attn_scores")?;
        Ok(out)
    }

    fn softmax_causal(&self, scores: &CudaBuf, scale: f32, pos0: usize) -> Result<CudaBuf> {
        ensure!(scores.shape.len() == 3, "softmax_causal expects [n_head, n_tokens, n_kv], got {:?}", scores.shape);
        let (nh, nt, n_kv) = (scores.shape[0], scores.shape[1], scores.shape[2]);
        let mut out = self.alloc(scores.shape.clone())?;
        let (nt_, nkv_, p0) = (i32_of(nt, "n_tokens")?, i32_of(n_kv, "n_kv")?, i32_of(pos0, "pos0")?);
        let mut b = self.stream.launch_builder(&self.k.softmax_causal);
        b.arg(&scores.data).arg(&mut out.data).arg(&nt_).arg(&nkv_).arg(&scale).arg(&p0);
        unsafe { b.launch(rows_grid(nh * nt)?) }.context("launching softmax_causal_f32")?;
        Ok(out)
    }

    fn attn_ctx(&self, layer: usize, probs: &CudaBuf, n_kv: usize, head_map: HeadMap) -> Result<CudaBuf> {
        self.check_layer(layer)?;
        ensure!(probs.shape.len() == 3 && probs.shape[2] == n_kv, "attn_ctx: probs {:?} is not [n_head, n_tokens, {n_kv}]", probs.shape);
        ensure!(n_kv <= self.opts.max_ctx, "attn_ctx: n_kv {n_kv} beyond the cache capacity {}", self.opts.max_ctx);
        let (nh, nt) = (probs.shape[0], probs.shape[1]);
        let hd = self.cfg.head_dim;
        let hm = self.head_map_code(nh, head_map)?;
        let mut out = self.alloc(vec![nt, nh, hd])?;
        let a = [i32_of(nh, "n_head")?, i32_of(nt, "n_tokens")?, i32_of(n_kv, "n_kv")?, i32_of(hd, "head_dim")?, i32_of(self.cfg.n_head_kv, "n_head_kv")?, hm];
        let cfg = grid_for(out.len());
        let mut b = match &self.cache {
            KvCache::F32 { v, .. } => {
                let mut b = self.stream.launch_builder(&self.k.attn_ctx_f32);
                b.arg(&probs.data).arg(&v[layer]);
                b
            }
            KvCache::F16 { v, .. } => {
                let mut b = self.stream.launch_builder(&self.k.attn_ctx_f16);
                b.arg(&probs.data).arg(&v[layer]);
                b
            }
        };
        b.arg(&mut out.data);
        for v in &a {
            b.arg(v);
        }
        unsafe { b.launch(cfg) }.context("launching attn_ctx")?;
        Ok(out)
    }

    fn add(&self, a: &CudaBuf, b: &CudaBuf) -> Result<CudaBuf> {
        ensure!(a.len() == b.len(), "add: shapes {:?} and {:?} differ in size", a.shape, b.shape);
        let mut out = self.alloc(a.shape.clone())?;
        let n = out.len() as u64;
        let cfg = grid_for(out.len());
        let mut l = self.stream.launch_builder(&self.k.add);
        l.arg(&a.data).arg(&b.data).arg(&mut out.data).arg(&n);
        unsafe { l.launch(cfg) }.context("launching add_f32")?;
        Ok(out)
    }

    fn swiglu(&self, gate: &CudaBuf, up: &CudaBuf, act: Activation) -> Result<CudaBuf> {
        ensure!(gate.len() == up.len(), "swiglu: shapes {:?} and {:?} differ in size", gate.shape, up.shape);
        let mut out = self.alloc(gate.shape.clone())?;
        let n = out.len() as u64;
        let cfg = grid_for(out.len());
        let code: i32 = match act {
            Activation::Silu => 0,
            Activation::Gelu => 1,
        };
        let mut l = self.stream.launch_builder(&self.k.swiglu);
        l.arg(&gate.data).arg(&up.data).arg(&mut out.data).arg(&n).arg(&code);
        unsafe { l.launch(cfg) }.context("launching swiglu_f32")?;
        Ok(out)
    }

    fn reset_cache(&mut self) -> Result<()> {
        match &mut self.cache {
            KvCache::F32 { k, v } => {
                for s in k.iter_mut().chain(v.iter_mut()) {
                    self.stream.memset_zeros(s).context("clearing the KV cache")?;
                }
            }
            KvCache::F16 { k, v } => {
                for s in k.iter_mut().chain(v.iter_mut()) {
                    self.stream.memset_zeros(s).context("clearing the KV cache")?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Let queued work finish before the buffers go; errors here have nowhere to go.
        let _ = self.ctx.synchronize();
    }
}
