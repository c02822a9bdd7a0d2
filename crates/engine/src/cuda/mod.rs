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
//! - **Weights** stay on the GPU as the GGUF stores them: each matrix's
//!   ggml blocks, uploaded byte for byte (`kernels/quant.cu` reads every type
//!   the host dequantizer knows, F32/F16/BF16, Q4_0..Q8_0, Q2_K..Q6_K, to the
//!   same f32 values bit for bit). Vectors (norms, biases) are f32. Weights
//!   built from f32 tensors ([`CudaBackend::from_weights`], the op tests)
//!   stay f32. A tied LM head is stored once.
//! - **Linear** on a quantized matrix: for at most [`GEMV_MAX_TOKENS`] rows
//!   (decode) a GEMV kernel that reads the blocks themselves; otherwise
//!   (prefill, or the transposed-read fault) the matrix is dequantized on the
//!   GPU into a scratch buffer and multiplied by cuBLAS sgemm (see
//!   [`CudaBackend::linear`] for the transpose flags), plus a bias kernel;
//!   cuBLAS's default math mode for sgemm keeps f32 (no TF32). Both see the
//!   CPU oracle's weights exactly, so CUDA vs CPU differs only by f32
//!   summation order. [`PrefillMatmul`] (`QWEN2_PARITY_CUDA_MATMUL=tf32` or
//!   `f16`) puts the prefill on tensor cores instead: faster, with numerics
//!   of its own, stated in every run's log. Each GEMV lane loads a whole
//!   block (or K-quant group) of 32 values at once, as wide as the block's
//!   alignment allows, against x copied into the block's shared memory
//!   (where a fused RMSNorm writes it); `QWEN2_PARITY_CUDA_GEMV_STAGE=1` has
//!   each block also copy its rows there first, to measure it: the same
//!   bytes, the same bits.
//! - **KV cache** per layer `[max_ctx, n_head_kv, head_dim]` on the GPU, f16
//!   (raw 16-bit words, round-to-nearest-even on store, as ggml's f32->f16) or
//!   f32 per [`BackendOptions::kv_type`]. GQA is an index map inside the
//!   attention kernels ([`HeadMap`]), K/V are never repeated.
//! - **Checkpoints**: ops only launch kernels. [`Backend::to_host`] copies
//!   synchronously (the stream is synchronized and any asynchronous kernel
//!   error surfaces there, with context); a checkpoint that never replaces
//!   its tensor goes through [`Backend::start_to_host`]: copied into a
//!   page-locked arena without waiting, or, once the pass's outputs come
//!   from the device checkpoint arena (`arena.rs`), only noted, and all of
//!   them cross in one copy when [`Backend::finish_to_host`] waits.
//! - **Attention** that no checkpoint observes is one fused kernel per
//!   (head, query) row, its scores in shared memory ([`Backend::attention`]);
//!   the three separate kernels run only when scores or probabilities are
//!   asked for. Both call the same device functions: the same bits.
//! - **Profile**: with `QWEN2_PARITY_CUDA_PROFILE=1` each op is bracketed by
//!   events and its host time is measured; the per-op table is printed to
//!   stderr when the backend is dropped (see `profile.rs`; off by default).

mod arena;
mod graph;
mod host;
mod profile;
mod ptx_cache;
mod upload;

use crate::arch::ArchSpec;
use crate::backend::{Backend, BackendOptions, Weight};
use capture::KvType;
use capture::Tensor;
use crate::fault::{Activation, HeadMap, RopePairing, WeightRead};
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg};
use cudarc::nvrtc::Ptx;
use gguf::{GgmlType, GgufFile, Qwen2Config};
use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// The one message every "no GPU here" path starts with.
pub const NO_DEVICE: &str = "no CUDA device: use --backend cpu";

/// Kernel sources, embedded in the binary: (file name, source).
const SOURCES: [(&str, &str); 3] = [
    ("elementwise.cu", include_str!("../../../../kernels/elementwise.cu")),
    ("quant.cu", include_str!("../../../../kernels/quant.cu")),
    ("attention.cu", include_str!("../../../../kernels/attention.cu")),
];

/// Threads per block of the element-wise (grid-stride) kernels.
const BLOCK: u32 = 256;
/// Threads per block of the row kernels (must match NORM_THREADS / ATTN_THREADS in the .cu files).
const ROW_BLOCK: u32 = 256;
/// Keys up to which the fused attention kernel keeps a row of scores in
/// shared memory (32 KiB, under the 48 KiB every launch may have); longer
/// rows take the three kernels that materialise them.
const FUSED_ATTENTION_MAX_KV: usize = 8192;
/// Bytes of keys the fused attention kernel stages in shared memory at a time.
const ATTENTION_TILE_BYTES: usize = 64 * 1024;
/// Dynamic shared memory the fused attention kernels may use: the longest
/// row of scores and one tile of keys (above the 48 KiB default; an H100
/// block may have 227 KiB).
const ATTENTION_MAX_SHARED: usize = FUSED_ATTENTION_MAX_KV * 4 + ATTENTION_TILE_BYTES;

/// Query rows a block of the fused attention takes in a prefill:
/// `QWEN2_PARITY_CUDA_ATTENTION_ROWS` (1 or 4; the same bits), else 1.
/// Opt-in until the choice below (4 rows where the launch keeps twice as
/// many blocks as SMs) has run on a GPU: the 4-row kernel itself passed
/// the kernel tests on the H100 (reports/gpu/2026-12-07-h100-attention-rows/).
fn attention_rows_from_env() -> Result<usize> {
    match std::env::var("QWEN2_PARITY_CUDA_ATTENTION_ROWS").ok().as_deref() {
        None | Some("1") => Ok(1),
        Some("4") => Ok(4),
        Some(other) => bail!("QWEN2_PARITY_CUDA_ATTENTION_ROWS={other}: expected 1 or 4"),
    }
}

/// Elements between two staged key rows in the fused attention's tile:
/// `head_dim` padded to an odd number of 32-bit words, so that the lanes
/// reading key rows side by side hit different shared-memory banks.
fn attention_key_stride(head_dim: usize, elem: usize) -> usize {
    let per_word = 4 / elem;
    let words = head_dim.div_ceil(per_word);
    (words | 1) * per_word
}

/// Keys per tile of the fused attention: as many key rows of `key_stride`
/// elements of `elem` bytes as ATTENTION_TILE_BYTES holds, a multiple of
/// 32, between 32 and the block's 256 threads (one key each).
fn attention_tile_keys(key_stride: usize, elem: usize) -> usize {
    (ATTENTION_TILE_BYTES / (key_stride * elem) / 32 * 32).clamp(32, ROW_BLOCK as usize)
}

/// Rows of activations up to which a quantized linear is a GEMV over the
/// blocks (must match GEMV_MAX_TOKENS in quant.cu).
pub const GEMV_MAX_TOKENS: usize = 8;
/// Warps per GEMV block (GEMV_WARPS in quant.cu).
const GEMV_WARPS: u32 = 8;
/// Warps a GEMV aims to run at once (`QWEN2_PARITY_CUDA_GEMV_WARPS`
/// overrides it, to measure): a matrix of fewer rows than this gives each
/// row several warps (see [`gemv_warps_per_row`]).
const GEMV_TARGET_WARPS: usize = 32_768;

/// The kernels' code for a RoPE pairing (rope_pair in attention.cu).
fn pairing_code(pairing: RopePairing) -> i32 {
    match pairing {
        RopePairing::Neox => 0,
        RopePairing::Adjacent => 1,
    }
}

/// Warps per output row of a GEMV over `n_rows` rows of `n_cols`: 1, 2, 4
/// or 8, the most that keeps `n_rows * warps` within `target_warps` and
/// gives every warp some of the row (a warp takes 1024 values a step, 32
/// per lane, so a row of 896 has work for one warp, a row of 4864 for 8).
fn gemv_warps_per_row(n_rows: usize, n_cols: usize, target_warps: usize) -> u32 {
    let mut w = 1;
    while w < GEMV_WARPS && n_rows * (w as usize) * 2 <= target_warps && (w as usize) * 1024 < n_cols {
        w *= 2;
    }
    w
}

/// Shared memory a GEMV block may fill with its rows of blocks (all its
/// matrices together); rows longer than that are read where they are.
const GEMV_STAGE_MAX_BYTES: usize = 32 * 1024;
/// Shared memory a GEMV block may fill with its copy of x (see stage_x in
/// quant.cu); a larger x is read where it is, and an RMSNorm before it is
/// its own launch. With the staged rows, under the 48 KiB a launch may
/// have without asking.
const GEMV_X_MAX_BYTES: usize = 24 * 1024;
/// Floats a group of 32 values of x takes in a GEMV block's copy
/// (X_GROUP_STRIDE in quant.cu: padded against bank conflicts).
const GEMV_X_GROUP_STRIDE: usize = 36;
/// GEMV blocks that run at once on one SM (the minimum of GEMV_BOUNDS in
/// quant.cu): a launch has at most this many per SM, each taking several
/// blocks of rows in turn (so x is copied into shared memory once per
/// block, not once per 8 rows).
const GEMV_BLOCKS_PER_SM: u32 = 3;

/// Bytes of shared memory a GEMV block takes for its copy of `n` tokens of
/// x, rows of `n_cols`; `None` when x is read where it is: rows that are
/// not whole groups of 32, or a copy larger than [`GEMV_X_MAX_BYTES`].
fn gemv_x_bytes(n: usize, n_cols: usize) -> Option<usize> {
    n_cols.is_multiple_of(32).then(|| n * (n_cols / 32) * GEMV_X_GROUP_STRIDE * 4).filter(|&b| b <= GEMV_X_MAX_BYTES)
}

/// The launch of a GEMV kernel over `n_out` rows of `row_bytes` each, in
/// `matrices` matrices read side by side (1, or 2 for the gated GEMV),
/// with `x_bytes` of shared memory for the block's copy of x (0: x read
/// where it is), at most `max_blocks` blocks (each then takes several
/// blocks of rows; `u32::MAX`: one block per block of rows, as gemv3
/// needs): the configuration, the warps per row, and whether each block
/// first copies its rows into shared memory (`staged`, see stage_rows in quant.cu).
fn gemv_launch(n_out: usize, n_cols: usize, row_bytes: usize, matrices: usize, x_bytes: usize, max_blocks: u32, tuning: GemvTuning) -> (LaunchConfig, i32, i32) {
    let wpr = gemv_warps_per_row(n_out, n_cols, tuning.target_warps);
    let rows_per_block = (GEMV_WARPS / wpr) as usize;
    // Each matrix's region: its rows, widened to 16-byte loads (see stage_rows).
    let region = (rows_per_block * row_bytes + 31) / 16 * 16;
    let staged = tuning.stage_rows && region * matrices <= GEMV_STAGE_MAX_BYTES && x_bytes + region * matrices <= 48 * 1024;
    let row_blocks = u32::try_from(n_out.div_ceil(rows_per_block)).unwrap_or(u32::MAX);
    let cfg = LaunchConfig {
        grid_dim: (row_blocks.min(max_blocks), 1, 1),
        block_dim: (GEMV_WARPS * 32, 1, 1),
        shared_mem_bytes: (x_bytes + if staged { region * matrices } else { 0 }) as u32,
    };
    (cfg, wpr as i32, staged as i32)
}

/// An RMSNorm fused into the GEMVs after it: its weight and epsilon.
#[derive(Clone, Copy, Debug)]
struct FusedNorm {
    weight: Weight,
    eps: f32,
}

/// How the decode kernels are launched: the defaults, or the environment's
/// for measuring alternatives: `QWEN2_PARITY_CUDA_GEMV_STAGE=1` (rows
/// through shared memory), `QWEN2_PARITY_CUDA_GEMV_STAGE_X=0`,
/// `QWEN2_PARITY_CUDA_GEMV_GRID=0`, `QWEN2_PARITY_CUDA_FUSE_NORM=0` and
/// `QWEN2_PARITY_CUDA_FUSE=0`, which change no bit; `QWEN2_PARITY_CUDA_GEMV_WARPS=<target warps>`, which changes the
/// GEMVs' summation order, so the bits, the same way for every GEMV.
#[derive(Clone, Copy, Debug)]
struct GemvTuning {
    /// Blocks copy their rows of blocks into shared memory first.
    stage_rows: bool,
    /// See [`GEMV_TARGET_WARPS`].
    target_warps: usize,
    /// Q, K and V in one launch (`linear3`), RoPE and the KV store in one
    /// (`rope_qk_kv_store`); `QWEN2_PARITY_CUDA_FUSE=0` runs the separate
    /// launches instead, to measure what the fusion gains (the same bits).
    fuse: bool,
    /// The RMSNorm before Q/K/V and before gate/up computed in the GEMV
    /// blocks (`norm_linear3`, `norm_gated_linear`) where x is staged (the
    /// norm writes the block's copy of x);
    /// `QWEN2_PARITY_CUDA_FUSE_NORM=0` (or `QWEN2_PARITY_CUDA_FUSE=0`)
    /// launches it on its own instead (the same bits).
    fuse_norm: bool,
    /// Each GEMV block copies x into shared memory first (see
    /// [`gemv_x_bytes`]); `QWEN2_PARITY_CUDA_GEMV_STAGE_X=0` reads it where
    /// it is (the same bits), and then no norm is fused.
    stage_x: bool,
    /// Blocks of a gemv or gated GEMV launch: at most this many (the SMs
    /// times [`GEMV_BLOCKS_PER_SM`]), or, with `QWEN2_PARITY_CUDA_GEMV_GRID=0`,
    /// one per block of rows (the same bits).
    max_blocks: u32,
}

impl GemvTuning {
    /// `sms`: the device's multiprocessors.
    fn from_env(sms: i32) -> Result<Self> {
        let target_warps = match std::env::var("QWEN2_PARITY_CUDA_GEMV_WARPS") {
            Ok(v) => v.parse::<usize>().ok().filter(|&w| w > 0).ok_or_else(|| anyhow!("QWEN2_PARITY_CUDA_GEMV_WARPS={v}: expected a positive number of warps"))?,
            Err(_) => GEMV_TARGET_WARPS,
        };
        let sms = u32::try_from(sms).ok().filter(|&n| n > 0).ok_or_else(|| anyhow!("the device reports {sms} SMs"))?;
        let stage_x = std::env::var("QWEN2_PARITY_CUDA_GEMV_STAGE_X").as_deref() != Ok("0");
        Ok(GemvTuning {
            stage_rows: std::env::var("QWEN2_PARITY_CUDA_GEMV_STAGE").as_deref() == Ok("1"),
            stage_x,
            max_blocks: if std::env::var("QWEN2_PARITY_CUDA_GEMV_GRID").as_deref() == Ok("0") { u32::MAX } else { sms * GEMV_BLOCKS_PER_SM },
            target_warps,
            fuse: std::env::var("QWEN2_PARITY_CUDA_FUSE").as_deref() != Ok("0"),
            fuse_norm: std::env::var("QWEN2_PARITY_CUDA_FUSE").as_deref() != Ok("0") && std::env::var("QWEN2_PARITY_CUDA_FUSE_NORM").as_deref() != Ok("0"),
        })
    }
}

/// The ggml types `kernels/quant.cu` reads, with the suffix of their kernels' names.
const QUANT_TYPES: [(GgmlType, &str); 13] = [
    (GgmlType::F32, "F32"),
    (GgmlType::F16, "F16"),
    (GgmlType::BF16, "BF16"),
    (GgmlType::Q4_0, "Q4_0"),
    (GgmlType::Q4_1, "Q4_1"),
    (GgmlType::Q5_0, "Q5_0"),
    (GgmlType::Q5_1, "Q5_1"),
    (GgmlType::Q8_0, "Q8_0"),
    (GgmlType::Q2_K, "Q2_K"),
    (GgmlType::Q3_K, "Q3_K"),
    (GgmlType::Q4_K, "Q4_K"),
    (GgmlType::Q5_K, "Q5_K"),
    (GgmlType::Q6_K, "Q6_K"),
];

/// The arithmetic of the prefill matmuls (more than [`GEMV_MAX_TOKENS`]
/// rows) on quantized matrices, chosen by `QWEN2_PARITY_CUDA_MATMUL`
/// (`f32`, `tf32`, `f16`; `QWEN2_PARITY_CUDA_TF32=1` is `tf32`). Decode
/// GEMVs are f32 in every mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillMatmul {
    /// Dequantized to f32, cuBLAS sgemm without TF32: f32 products, only the
    /// summation order differs from the CPU oracle.
    F32,
    /// The same with cuBLAS in TF32 mode: operands rounded to 10-bit mantissas on tensor cores.
    Tf32,
    /// Dequantized to f16 and activations scaled per row into f16 (11-bit
    /// mantissas, no overflow), f16 tensor cores with f32 accumulation.
    F16,
}

impl PrefillMatmul {
    /// The mode the environment asks for (f32 when it asks for none).
    pub fn from_env() -> Result<Self> {
        match std::env::var("QWEN2_PARITY_CUDA_MATMUL").ok().as_deref() {
            Some("f32") => Ok(Self::F32),
            Some("tf32") => Ok(Self::Tf32),
            Some("f16") => Ok(Self::F16),
            Some(other) => bail!("QWEN2_PARITY_CUDA_MATMUL={other}: expected f32, tf32 or f16"),
            None if std::env::var("QWEN2_PARITY_CUDA_TF32").as_deref() == Ok("1") => Ok(Self::Tf32),
            None => Ok(Self::F32),
        }
    }

    /// The arithmetic in words, for every run's log.
    pub fn describe(self) -> &'static str {
        match self {
            Self::F32 => "matmuls in f32 (cuBLAS sgemm without TF32, f32 GEMVs)",
            Self::Tf32 => "prefill matmuls in TF32 on tensor cores (QWEN2_PARITY_CUDA_MATMUL=tf32: inputs rounded to 10-bit mantissas), decode GEMVs in f32",
            Self::F16 => "prefill matmuls in f16 on tensor cores (QWEN2_PARITY_CUDA_MATMUL=f16: weights and per-row-scaled activations rounded to f16, f32 accumulation), decode GEMVs in f32",
        }
    }
}

/// Whether this process can use CUDA: the driver library loads, cuBLAS and
/// NVRTC load, and at least one device answers. Never panics (it is the
/// probe that keeps cudarc's panicking loader from ever running without a
/// driver). The error is one line starting with [`NO_DEVICE`].
pub fn cuda_available() -> Result<(), String> {
    probed().0.clone()
}

/// Seconds each part of the probe took, in order (dlopen of libcuda, cuInit
/// and the device count, then what was left of opening cuBLAS and NVRTC on
/// a second thread meanwhile), as far as it got: wall time, they add up;
/// empty until the probe has run (once per process, at the first
/// `cuda_available`).
pub fn probe_phases() -> &'static [(&'static str, f64)] {
    PROBE.get().map_or(&[], |(_, phases)| phases.as_slice())
}

/// The probe's verdict and the seconds of its parts (`probe`).
type Probe = (Result<(), String>, Vec<(&'static str, f64)>);
static PROBE: OnceLock<Probe> = OnceLock::new();

fn probed() -> &'static Probe {
    PROBE.get_or_init(|| {
        let mut phases = Vec::new();
        let result = probe(&mut phases);
        (result, phases)
    })
}

/// `step()`, its seconds pushed to `phases` under `name`.
fn timed<T>(phases: &mut Vec<(&'static str, f64)>, name: &'static str, step: impl FnOnce() -> T) -> T {
    let t = std::time::Instant::now();
    let out = step();
    phases.push((name, t.elapsed().as_secs_f64()));
    out
}

fn probe(phases: &mut Vec<(&'static str, f64)>) -> Result<(), String> {
    // Each step timed: the load's first phase is this probe, and which
    // part of it costs what says where a faster load could come from.
    std::thread::scope(|scope| {
        // cuBLAS (with cuBLASLt, hundreds of MB) and NVRTC are opened on a
        // second thread while this one opens libcuda and runs cuInit: the
        // two waits overlap. cuBLAS is then kept open for the process
        // (`culib`), so the handle made at load does not open it again.
        // SAFETY: dlopen of the named libraries (`culib` only after
        // `is_culib_present` found cuBLAS, so its loader cannot panic);
        // nothing is called in them.
        let libraries = scope.spawn(|| unsafe {
            let cublas = cudarc::cublas::sys::is_culib_present();
            if cublas {
                cudarc::cublas::sys::culib();
            }
            (cublas, cudarc::nvrtc::sys::is_culib_present())
        });
        // SAFETY: dlopen of libcuda; nothing is called in it.
        if !timed(phases, "libcuda", || unsafe { cudarc::driver::sys::is_culib_present() }) {
            return Err(NO_DEVICE.to_string());
        }
        // The driver is present; a missing symbol (a driver too old for the
        // CUDA 13.0 bindings) would still panic inside cudarc: catch that too.
        let count = timed(phases, "cuInit", || std::panic::catch_unwind(CudaContext::device_count));
        // Only the wait left after cuInit is the libraries' own phase: the
        // phases add up to the probe's wall time.
        let opened = timed(phases, "cuBLAS and NVRTC libraries (after cuInit, opened beside it)", || libraries.join().unwrap_or((false, false)));
        match opened {
            (false, _) => return Err(format!("{NO_DEVICE} (libcuda loads but cuBLAS does not)")),
            (_, false) => return Err(format!("{NO_DEVICE} (libcuda loads but NVRTC does not)")),
            _ => {}
        }
        match count {
            Ok(Ok(n)) if n > 0 => Ok(()),
            Ok(Ok(_)) => Err(format!("{NO_DEVICE} (the driver reports 0 devices)")),
            Ok(Err(e)) => Err(format!("{NO_DEVICE} (cuInit/cuDeviceGetCount: {e})")),
            Err(_) => Err(format!("{NO_DEVICE} (the CUDA driver is missing symbols: too old for CUDA 13.0?)")),
        }
    })
}

/// NVRTC output for every kernel file, compiled once per process (and kept
/// on disk between processes: `ptx_cache.rs`).
fn ptx() -> Result<&'static [(&'static str, Ptx)]> {
    static PTX: OnceLock<Result<Vec<(&'static str, Ptx)>, String>> = OnceLock::new();
    let compiled = PTX.get_or_init(|| {
        // One thread per file: the slowest file (quant.cu) sets the time.
        std::thread::scope(|scope| {
            let jobs: Vec<_> = SOURCES
                .iter()
                .map(|(name, src)| {
                    scope.spawn(move || {
                        let opts = cudarc::nvrtc::CompileOptions {
                            name: Some(name.to_string()),
                            // Accurate math: no fast-math, IEEE division and sqrt, no flush to zero.
                            ftz: Some(false),
                            prec_div: Some(true),
                            prec_sqrt: Some(true),
                            ..Default::default()
                        };
                        ptx_cache::compile(name, src, opts).map(|p| (*name, p))
                    })
                })
                .collect();
            jobs.into_iter().map(|j| j.join().map_err(|_| "NVRTC panicked".to_string()).and_then(|r| r)).collect()
        })
    });
    match compiled {
        Ok(v) => Ok(v.as_slice()),
        Err(e) => Err(anyhow!("{e}")),
    }
}

/// A tensor on the GPU: f32, row-major, with its shape. Its memory is its
/// own (freed when dropped) or a slice of the checkpoint arena (`arena.rs`:
/// never freed on its own; `arena` counts the slices alive).
pub struct CudaBuf {
    data: ManuallyDrop<CudaSlice<f32>>,
    pub shape: Vec<usize>,
    arena: Option<arena::Ticket>,
}

impl CudaBuf {
    /// A buffer that owns its memory.
    fn owned(data: CudaSlice<f32>, shape: Vec<usize>) -> Self {
        CudaBuf { data: ManuallyDrop::new(data), shape, arena: None }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.len() == 0
    }

    /// Give up the buffer without freeing its memory (a graph frees it).
    fn leak(mut self) -> cudarc::driver::sys::CUdeviceptr {
        // SAFETY: `data` is taken once; `self` is then forgotten, so Drop never sees it again.
        let data = unsafe { ManuallyDrop::take(&mut self.data) };
        let arena = self.arena.take();
        std::mem::forget(self);
        drop(arena);
        data.leak()
    }
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        // SAFETY: `data` is taken here and only here (`leak` forgets `self`
        // after taking it), so it is never used or dropped again.
        let data = unsafe { ManuallyDrop::take(&mut self.data) };
        match self.arena.take() {
            // The arena's memory stays allocated: the slice only lets go of it.
            Some(ticket) => {
                data.leak();
                drop(ticket);
            }
            None => drop(data),
        }
    }
}

/// The three kernels of one weight type in `kernels/quant.cu`.
struct QuantKernels {
    dequant: CudaFunction,
    dequant_f16: CudaFunction,
    gemv: CudaFunction,
    gemv3: CudaFunction,
    gemv_glu: CudaFunction,
    get_rows: CudaFunction,
}

struct Kernels {
    quant: HashMap<GgmlType, QuantKernels>,
    round_half: CudaFunction,
    round_q8_0: CudaFunction,
    round_q8_k: CudaFunction,
    rows_to_f16: CudaFunction,
    scale_rows_add_bias: CudaFunction,
    embed: CudaFunction,
    add_bias: CudaFunction,
    add: CudaFunction,
    swiglu: CudaFunction,
    rms_norm: CudaFunction,
    rope: CudaFunction,
    rope_qk_kv_store_f32: CudaFunction,
    rope_qk_kv_store_f16: CudaFunction,
    kv_store_f32: CudaFunction,
    kv_store_f16: CudaFunction,
    attn_scores_f32: CudaFunction,
    attn_scores_f16: CudaFunction,
    attn_ctx_f32: CudaFunction,
    attn_ctx_f16: CudaFunction,
    softmax_causal: CudaFunction,
    attention_f32: CudaFunction,
    attention_f16: CudaFunction,
    /// `attention` for 4 query rows a block (a prefill), per cache type.
    attention_rows4_f32: CudaFunction,
    attention_rows4_f16: CudaFunction,
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
        // The fused attention's scores and key tile pass the 48 KiB a launch
        // may have without asking (ATTENTION_MAX_SHARED).
        let big_shared = |func: &str| -> Result<CudaFunction> {
            let k = f("attention.cu", func)?;
            use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            k.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, ATTENTION_MAX_SHARED as i32)
                .with_context(|| format!("allowing {func} {ATTENTION_MAX_SHARED} bytes of shared memory"))?;
            Ok(k)
        };
        let mut quant = HashMap::new();
        for (ty, suffix) in QUANT_TYPES {
            let q = QuantKernels {
                dequant: f("quant.cu", &format!("dequant_{suffix}"))?,
                dequant_f16: f("quant.cu", &format!("dequant_f16_{suffix}"))?,
                gemv: f("quant.cu", &format!("gemv_{suffix}"))?,
                gemv3: f("quant.cu", &format!("gemv3_{suffix}"))?,
                gemv_glu: f("quant.cu", &format!("gemv_glu_{suffix}"))?,
                get_rows: f("quant.cu", &format!("get_rows_{suffix}"))?,
            };
            quant.insert(ty, q);
        }
        Ok(Kernels {
            quant,
            round_half: f("quant.cu", "round_half")?,
            round_q8_0: f("quant.cu", "round_q8_0")?,
            round_q8_k: f("quant.cu", "round_q8_k")?,
            rows_to_f16: f("quant.cu", "rows_to_f16")?,
            scale_rows_add_bias: f("elementwise.cu", "scale_rows_add_bias")?,
            embed: f("elementwise.cu", "embed_f32")?,
            add_bias: f("elementwise.cu", "add_bias_f32")?,
            add: f("elementwise.cu", "add_f32")?,
            swiglu: f("quant.cu", "swiglu_f32")?,
            rms_norm: f("quant.cu", "rms_norm_f32")?,
            rope: f("attention.cu", "rope_f32")?,
            rope_qk_kv_store_f32: f("attention.cu", "rope_qk_kv_store_f32")?,
            rope_qk_kv_store_f16: f("attention.cu", "rope_qk_kv_store_f16")?,
            kv_store_f32: f("attention.cu", "kv_store_f32")?,
            kv_store_f16: f("attention.cu", "kv_store_f16")?,
            attn_scores_f32: f("attention.cu", "attn_scores_f32")?,
            attn_scores_f16: f("attention.cu", "attn_scores_f16")?,
            attn_ctx_f32: f("attention.cu", "attn_ctx_f32")?,
            attn_ctx_f16: f("attention.cu", "attn_ctx_f16")?,
            softmax_causal: f("attention.cu", "softmax_causal_f32")?,
            attention_f32: big_shared("attention_f32")?,
            attention_f16: big_shared("attention_f16")?,
            attention_rows4_f32: big_shared("attention_rows4_f32")?,
            attention_rows4_f16: big_shared("attention_rows4_f16")?,
        })
    }
}

/// Per-layer K and V caches, `[max_ctx, n_head_kv, head_dim]` each.
enum KvCache {
    F32 { k: Vec<CudaSlice<f32>>, v: Vec<CudaSlice<f32>> },
    /// IEEE half as raw 16-bit words.
    F16 { k: Vec<CudaSlice<u16>>, v: Vec<CudaSlice<u16>> },
}

/// A weight as the GPU holds it.
enum DeviceWeight {
    /// f32, row-major: vectors, and matrices built from f32 tensors.
    F32(CudaBuf),
    /// A matrix `[rows, cols]` as ggml blocks, `row_bytes` per row, exactly
    /// the GGUF's bytes. `flags` goes to every kernel that reads it (bit 0:
    /// the `q5-0-high-bit` fault).
    Blocks { ty: GgmlType, data: CudaSlice<u8>, rows: usize, cols: usize, row_bytes: usize, flags: i32 },
}

impl DeviceWeight {
    fn bytes(&self) -> usize {
        match self {
            DeviceWeight::F32(b) => b.len() * 4,
            DeviceWeight::Blocks { data, .. } => data.len(),
        }
    }
}

/// Where [`CudaBackend::dequantize_into`] writes a block matrix's values.
enum Dequantized<'a> {
    F32(&'a mut CudaSlice<f32>),
    /// f16 bits, for the tensor-core prefill.
    F16(&'a mut CudaSlice<u16>),
}

/// A matrix as f32: a resident f32 weight, or blocks dequantized for one use.
enum F32Matrix<'a> {
    Resident(&'a CudaBuf),
    Scratch(CudaBuf),
}

impl std::ops::Deref for F32Matrix<'_> {
    type Target = CudaBuf;
    fn deref(&self) -> &CudaBuf {
        match self {
            F32Matrix::Resident(b) => b,
            F32Matrix::Scratch(b) => b,
        }
    }
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
    weights: HashMap<Weight, DeviceWeight>,
    cache: KvCache,
    /// Per-op GPU and host time when `QWEN2_PARITY_CUDA_PROFILE=1`.
    profile: Option<profile::Profile>,
    /// Page-locked host memory every device-to-host copy lands in first,
    /// grown to the largest checkpoint seen. Pageable copies measured
    /// 0.7 GB/s on the H200 (90% of a prefill with every stage captured);
    /// through this buffer the H100 measured 0.6 GB/s, no faster: the cost
    /// is on the host side (the fresh vector each checkpoint lands in).
    staging: RefCell<Option<PinnedHostSlice<f32>>>,
    /// Copies started for checkpoints and not yet waited for.
    in_flight: RefCell<InFlight>,
    /// Device memory an observed pass's outputs are carved from (`arena.rs`).
    arena: RefCell<arena::Arena>,
    /// The recorded decode step, or why none is (`graph.rs`).
    recording: graph::Recording,
    /// Token and position of the step a recorded pass replays.
    step: graph::StepInputs,
    /// The prefill matmuls' arithmetic ([`PrefillMatmul`]).
    prefill_matmul: PrefillMatmul,
    /// How GEMVs are launched ([`GemvTuning`]).
    gemv_tuning: GemvTuning,
    /// Query rows one block of the fused attention takes in a prefill (1,
    /// or 4 with `QWEN2_PARITY_CUDA_ATTENTION_ROWS=4`), see `attention`.
    attention_rows: usize,
    /// The least blocks a several-row attention launch must have (twice
    /// the SMs): with fewer, one row a block fills the GPU better.
    attention_rows_min_blocks: usize,
    /// Seconds each phase of the load took, in order (`load_phases`).
    load_phases: Vec<(&'static str, f64)>,
    /// Page-locked buffers the weights' bytes cross (`upload_blocks`),
    /// freed once the load is done.
    uploader: Option<upload::Uploader>,
}

/// Values (64 MiB) of the page-locked memory that started copies land in,
/// one after another: a decode step's checkpoints all fit, so the step waits
/// once instead of once per checkpoint; a prefill's wait when it is full.
const IN_FLIGHT_VALUES: usize = 16 << 20;

/// Device-to-host copies started by `start_to_host` and not yet waited for.
#[derive(Default)]
struct InFlight {
    /// Page-locked memory they land in (grown for a tensor larger than it).
    arena: Option<PinnedHostSlice<f32>>,
    /// Values of the arena in use.
    used: usize,
    /// Where each checkpoint's values are, in the order started.
    copies: Vec<(Held, Vec<usize>)>,
    /// Page-locked memory the device checkpoint arena's values land in at
    /// the end (allocated at the first use, as large as that arena).
    landing: Option<PinnedHostSlice<f32>>,
    /// Copies already finished (the arena was full), in the order started.
    done: Vec<Tensor>,
}

/// Where a started checkpoint's values are until `drain_in_flight`.
#[derive(Clone, Copy)]
enum Held {
    /// Copied (in flight) into the page-locked arena at this offset.
    Pinned(usize),
    /// Still on the device, in the checkpoint arena at this offset.
    Device(usize),
}

/// Let the device's default memory pool keep what is freed. Every buffer
/// comes from it (`cuMemAllocAsync`), and with its default release
/// threshold of 0 the pool hands all freed memory back to the driver at
/// every synchronization (each checkpoint copy, each decode step), so the
/// next pass maps it again: a prefill's hundreds of MB of logits and
/// dequantized scratch, a decode step's many small buffers.
fn keep_freed_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut pool: cudarc::driver::sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: `pool` is a valid out-pointer for the device's default pool
    // handle (owned by the driver, never freed by us); the release threshold
    // attribute takes a pointer to a cuuint64_t, which `threshold` is, and
    // the driver reads it before returning.
    unsafe {
        cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .context("cuDeviceGetDefaultMemPool")?;
        cudarc::driver::sys::cuMemPoolSetAttribute(
            pool,
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .context("setting the memory pool's release threshold")?;
    }
    Ok(())
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

/// The `act` argument of swiglu_f32 and gemv_glu.
fn activation_code(act: Activation) -> i32 {
    match act {
        Activation::Silu => 0,
        Activation::Gelu => 1,
    }
}

/// cuBLAS's operation on a weight matrix stored `[n_out, n_in]` row-major
/// (column-major `[n_in, n_out]` to cuBLAS), and its leading dimension:
/// transposed for `Rows`, as it is for the `Transposed` read (the fault
/// that reads the buffer as `[n_in, n_out]`).
fn weight_op(read: WeightRead, n_out: usize, n_in: usize) -> (cublasOperation_t, usize) {
    match read {
        WeightRead::Rows => (cublasOperation_t::CUBLAS_OP_T, n_in),
        WeightRead::Transposed => (cublasOperation_t::CUBLAS_OP_N, n_out),
    }
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("{what} = {v} does not fit a 32-bit kernel argument"))
}

impl CudaBackend {
    /// Upload every weight of `gguf`: matrices as their ggml blocks (f32 on
    /// the host only for a type without a kernel), vectors as f32.
    pub fn load(gguf: &GgufFile, cfg: &Qwen2Config, opts: BackendOptions) -> Result<Self> {
        Self::load_observed(gguf, cfg, opts, &mut |_, _| {})
    }

    /// [`CudaBackend::load`], calling `on_weight(done, total)` after each
    /// group of weights is uploaded: the caller shows progress (this crate
    /// never prints).
    pub fn load_observed(gguf: &GgufFile, cfg: &Qwen2Config, opts: BackendOptions, on_weight: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let mut backend = Self::empty(cfg.clone(), opts)?;
        let started = std::time::Instant::now();
        // A tied LM head is token_embd: stored once, resolved by `weight`.
        let all = Weight::all(&ArchSpec::qwen2(cfg), cfg.n_layer);
        // QWEN2_PARITY_CUDA_F32_WEIGHTS=1: every weight dequantized on the host
        // and kept as f32 (the backend before the block kernels; 4 bytes a
        // parameter), to tell a block-kernel bug from anything else.
        let f32_only = std::env::var("QWEN2_PARITY_CUDA_F32_WEIGHTS").as_deref() == Ok("1");
        for (done, &w) in all.iter().enumerate() {
            let name = w.gguf_name(cfg.tied_output);
            let info = gguf.tensor(&name).ok_or_else(|| anyhow!("{}: tensor {name} is missing", gguf.path().display()))?;
            let shape = w.shape(cfg);
            if !f32_only && shape.len() == 2 && backend.k.quant.contains_key(&info.ggml_type) {
                let dims: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
                ensure!(dims == shape, "tensor {name} has shape {dims:?}, expected {shape:?}");
                let flags = i32::from(w.dequant_bug_applies(info.ggml_type, opts.dequant_bug));
                backend.upload_blocks(w, info.ggml_type, gguf.tensor_data(info), flags).with_context(|| format!("uploading {name}"))?;
            } else {
                let t = w.dequantize_for(gguf, cfg, opts.dequant_bug)?;
                backend.upload_weight(w, &t.data).with_context(|| format!("uploading {name}"))?;
            }
            on_weight(done + 1, all.len());
        }
        backend.finish_uploads()?;
        backend.load_phases.push(("weights", started.elapsed().as_secs_f64()));
        Ok(backend)
    }

    /// Seconds each phase of `load` took, in order: the CUDA context; the
    /// stream; the kernels' modules; what was left of making the cuBLAS
    /// handle beside them; the KV cache; the weights (read from the mapped
    /// file and copied to the GPU). Wall time: the phases add up.
    pub fn load_phases(&self) -> &[(&'static str, f64)] {
        &self.load_phases
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
        // The attention kernels give each (query, head) one block of ROW_BLOCK threads, one or more per dimension.
        ensure!(cfg.head_dim <= ROW_BLOCK as usize, "head_dim {} is over {ROW_BLOCK}, which the CUDA attention kernels do not support", cfg.head_dim);
        ensure!(opts.max_ctx > 0, "max_ctx must be positive");
        let mut load_phases = Vec::new();
        let mut phase = std::time::Instant::now();
        let mut lap = |name: &'static str| {
            load_phases.push((name, phase.elapsed().as_secs_f64()));
            phase = std::time::Instant::now();
        };
        let ctx = CudaContext::new(0).context("creating a CUDA context on device 0")?;
        // SAFETY: this backend uses one stream for every allocation, kernel and
        // copy, so stream order alone orders every use of every buffer; the
        // per-buffer events cudarc would otherwise create for cross-stream
        // synchronization are never needed.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        // Checkpoints copied to the host land in heap pages already mapped.
        host::keep_freed_host_memory();
        let device_name = ctx.name().context("cuDeviceGetName")?;
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .context("cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)")?;
        lap("CUDA context");
        // A stream of our own: the legacy default stream cannot be captured
        // into a graph (recorded decode steps, `graph.rs`).
        let stream = ctx.new_stream().context("creating a CUDA stream")?;
        lap("stream");
        // The cuBLAS handle (tens of ms: cuBLAS sets up its own state on the
        // device) is made on a second thread while this one loads the
        // kernels' modules; both are driver calls on one context, which the
        // driver serialises where it must.
        let (blas, k) = std::thread::scope(|scope| {
            let blas = scope.spawn(|| CudaBlas::new(stream.clone()));
            let k = Kernels::load(&ctx);
            lap("kernels");
            let blas = blas.join().map_err(|_| anyhow!("creating the cuBLAS handle: its thread panicked"));
            lap("cuBLAS handle (after the kernels, made beside them)");
            (blas, k)
        });
        let blas = blas?.context("creating the cuBLAS handle")?;
        let k = k?;
        let prefill_matmul = PrefillMatmul::from_env()?;
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
        lap("KV cache");
        let profile = profile::Profile::from_env();
        let recording = if profile.is_some() {
            graph::Recording::Off("op by op: the profile times each op with events, which a recording cannot hold".into())
        } else if std::env::var("QWEN2_PARITY_CUDA_GRAPHS").as_deref() == Ok("0") {
            graph::Recording::Off("op by op: QWEN2_PARITY_CUDA_GRAPHS=0".into())
        } else if opts.max_ctx > FUSED_ATTENTION_MAX_KV {
            graph::Recording::Off(format!("op by op: a cache of {} positions is longer than the fused attention's {FUSED_ATTENTION_MAX_KV}", opts.max_ctx))
        } else {
            graph::Recording::Idle
        };
        let step = graph::StepInputs {
            token: stream.alloc_zeros::<i32>(1).context("allocating the step's token")?,
            pos: stream.alloc_zeros::<i32>(1).context("allocating the step's position")?,
        };
        let mut backend = CudaBackend {
            cfg,
            opts,
            device_name,
            ctx,
            stream,
            blas,
            k,
            weights: HashMap::new(),
            cache,
            profile,
            staging: RefCell::new(None),
            in_flight: RefCell::new(InFlight::default()),
            arena: RefCell::new(arena::Arena::from_env()?),
            recording,
            step,
            prefill_matmul,
            gemv_tuning: GemvTuning::from_env(sms)?,
            attention_rows: attention_rows_from_env()?,
            attention_rows_min_blocks: 2 * usize::try_from(sms).unwrap_or(0),
            load_phases,
            uploader: None,
        };
        backend.set_prefill_matmul(prefill_matmul)?;
        Ok(backend)
    }

    /// Choose the prefill matmuls' arithmetic (the environment's at load).
    pub fn set_prefill_matmul(&mut self, mode: PrefillMatmul) -> Result<()> {
        use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
        let math = if mode == PrefillMatmul::Tf32 { cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH } else { cublasMath_t::CUBLAS_DEFAULT_MATH };
        // SAFETY: the handle is this backend's, used by one thread at a time (&mut self).
        let status = unsafe { cublasSetMathMode(*self.blas.handle(), math) };
        ensure!(status == cublasStatus_t::CUBLAS_STATUS_SUCCESS, "cublasSetMathMode({math:?}): {status:?}");
        self.prefill_matmul = mode;
        Ok(())
    }

    /// Whether GEMV blocks copy their rows into shared memory first (the
    /// environment's `QWEN2_PARITY_CUDA_GEMV_STAGE=1` at load): the same
    /// bits either way, so the kernel tests can hold one against the other.
    pub fn set_gemv_staging(&mut self, on: bool) {
        self.gemv_tuning.stage_rows = on;
    }

    /// How GEMV blocks read x and how many there are at most (the
    /// environment's `QWEN2_PARITY_CUDA_GEMV_STAGE_X` and
    /// `QWEN2_PARITY_CUDA_GEMV_GRID` at load): `stage_x`, x copied into
    /// shared memory first (without it no norm is fused); `max_blocks`,
    /// `None` for one block per block of rows. The same bits either way.
    pub fn set_gemv_x_and_grid(&mut self, stage_x: bool, max_blocks: Option<u32>) {
        self.gemv_tuning.stage_x = stage_x;
        self.gemv_tuning.max_blocks = max_blocks.unwrap_or(u32::MAX);
    }

    /// Query rows a block of the fused attention takes in a prefill (1 or
    /// 4; the environment's `QWEN2_PARITY_CUDA_ATTENTION_ROWS` at load),
    /// and the least blocks a 4-row launch must have (0: any, for tests):
    /// the same bits whatever they are.
    pub fn set_attention_rows(&mut self, rows: usize, min_blocks: usize) -> Result<()> {
        ensure!([1, 4].contains(&rows), "attention rows {rows}: expected 1 or 4");
        self.attention_rows = rows;
        self.attention_rows_min_blocks = min_blocks;
        Ok(())
    }

    /// The checkpoint arena's size in MiB (0 turns it off; the
    /// environment's `QWEN2_PARITY_CUDA_CHECKPOINT_ARENA_MIB` at load):
    /// the same values reach the host either way, so the kernel tests can
    /// hold one against the other.
    pub fn set_checkpoint_arena_mib(&mut self, mib: usize) -> Result<()> {
        self.arena.borrow_mut().resize(mib)
    }

    fn upload_weight(&mut self, w: Weight, data: &[f32]) -> Result<()> {
        let shape = w.shape(&self.cfg);
        let n: usize = shape.iter().product();
        ensure!(data.len() == n, "{w:?} has {} values, expected {n} for shape {shape:?}", data.len());
        let data = self.stream.clone_htod(data).context("host-to-device copy")?;
        self.weights.insert(w, DeviceWeight::F32(CudaBuf::owned(data, shape)));
        Ok(())
    }

    /// `len` values of page-locked host memory for device-to-host copies,
    /// uninitialized: its callers read a range only after a copy into it
    /// has finished.
    fn alloc_pinned(&self, len: usize) -> Result<PinnedHostSlice<f32>> {
        // SAFETY: flags 0 asks for plain page-locked memory (not
        // write-combined, which the CPU reads slowly); its contents are
        // uninitialized, and every caller reads only ranges a finished copy
        // has written (see the callers).
        unsafe { self.ctx.alloc_pinned_with_flags::<f32>(len, 0) }.with_context(|| format!("allocating {} MiB of page-locked host memory", (len * 4) >> 20))
    }

    /// The values of `src` on the host: copied at the link's speed into
    /// the page-locked staging buffer (grown when too small), then into a
    /// fresh vector once the stream has finished the copy.
    fn copy_to_host(&self, src: &impl DevicePtr<f32>) -> Result<Vec<f32>> {
        let n = src.len();
        let mut staging = self.staging.borrow_mut();
        if staging.as_ref().is_none_or(|p| p.len() < n) {
            // Drop the old buffer first (its drop waits for its last copy).
            *staging = None;
            // Whole MiB, at least 4: most checkpoints then share one buffer.
            // Only the first `n` values are read, after the copy below.
            *staging = Some(self.alloc_pinned(n.max(1 << 20).next_multiple_of(1 << 18))?);
        }
        let pinned = staging.as_mut().expect("allocated above");
        // The first `n` values as a plain slice: cudarc copies as many bytes
        // as the destination holds, so the destination must be exactly `n`
        // long (the whole buffer would read past `src`). The memory is
        // still page-locked, so the driver copies it at the link's speed.
        let host = &mut pinned.as_mut_slice().context("page-locked staging buffer")?[..n];
        self.stream.memcpy_dtoh(src, host).context("device-to-host copy")?;
        // Into page-locked memory the copy is truly asynchronous, and cudarc
        // does not wait for a plain-slice destination: wait here.
        self.synchronize()?;
        Ok(host::copy_to_fresh_vec(host))
    }

    /// Wait for the copies in the arena and move them into fresh vectors,
    /// emptying the arena.
    fn drain_in_flight(&self, f: &mut InFlight) -> Result<()> {
        if f.copies.is_empty() {
            return Ok(());
        }
        // The device arena's values up to its last noted checkpoint, in one copy.
        let on_device = f.copies.iter().filter_map(|(held, shape)| match held {
            Held::Device(offset) => Some(offset + shape.iter().product::<usize>()),
            Held::Pinned(_) => None,
        });
        if let Some(end) = on_device.max() {
            if f.landing.as_ref().is_none_or(|l| l.len() < end) {
                f.landing = None;
                // Only its first `end` values are read, after the copy below.
                f.landing = Some(self.alloc_pinned(end.max(IN_FLIGHT_VALUES))?);
            }
            let landing = &mut f.landing.as_mut().expect("allocated above").as_mut_slice().context("page-locked landing buffer")?[..end];
            let arena = self.arena.borrow();
            self.stream.memcpy_dtoh(&arena.prefix(end)?, landing).context("device-to-host copy of the checkpoint arena")?;
        }
        self.synchronize()?;
        let pinned = match f.arena.as_ref() {
            Some(a) => a.as_slice().context("page-locked arena")?,
            None => &[],
        };
        let landing = match f.landing.as_ref() {
            Some(l) => l.as_slice().context("page-locked landing buffer")?,
            None => &[],
        };
        let copies = std::mem::take(&mut f.copies);
        let srcs: Vec<&[f32]> = copies
            .iter()
            .map(|(held, shape)| {
                let n = shape.iter().product::<usize>();
                match *held {
                    Held::Pinned(offset) => pinned.get(offset..offset + n),
                    Held::Device(offset) => landing.get(offset..offset + n),
                }
                .context("a checkpoint's values outside the memory they were copied to")
            })
            .collect::<Result<_>>()?;
        // All at once: the host fills them on every core (`host.rs`).
        let filled = host::copy_to_fresh_vecs(&srcs);
        f.done.extend(copies.into_iter().zip(filled).map(|((_, shape), data)| Tensor::new(shape, data)));
        f.used = 0;
        Ok(())
    }

    /// Keep the matrix `w` on the GPU as `bytes`, rows of `ty` blocks in
    /// GGUF's layout (`flags` bit 0: read Q5_0 with the `q5-0-high-bit`
    /// fault). Replaces any earlier copy of `w`. The copy may still be in
    /// flight on return (ordered before every kernel on the stream);
    /// `finish_uploads` waits for it and frees the upload buffers.
    pub fn upload_blocks(&mut self, w: Weight, ty: GgmlType, bytes: &[u8], flags: i32) -> Result<()> {
        let shape = w.shape(&self.cfg);
        ensure!(shape.len() == 2, "{w:?} is not a matrix");
        ensure!(self.k.quant.contains_key(&ty), "no CUDA kernel reads {} weights", ty.name());
        let (rows, cols) = (shape[0], shape[1]);
        let row_bytes = ty.row_bytes(cols).ok_or_else(|| anyhow!("{w:?}: rows of {cols} values are not whole {} blocks", ty.name()))?;
        ensure!(bytes.len() == rows * row_bytes, "{w:?}: {} bytes of {}, expected {rows} rows of {row_bytes}", bytes.len(), ty.name());
        i32_of(rows, "rows")?;
        i32_of(cols, "cols")?;
        let uploader = match &mut self.uploader {
            Some(u) => u,
            None => self.uploader.insert(upload::Uploader::new(&self.ctx, &self.stream)?),
        };
        let data = uploader.upload(bytes)?;
        // The GEMVs load blocks with loads as wide as a 16-byte-aligned
        // matrix makes their blocks (group32 in quant.cu).
        let ptr = data.device_ptr(&self.stream).0;
        ensure!(ptr % 16 == 0, "{w:?}: device memory at {ptr:#x} is not 16-byte aligned");
        self.weights.insert(w, DeviceWeight::Blocks { ty, data, rows, cols, row_bytes, flags });
        Ok(())
    }

    /// Wait for the copies `upload_blocks` started and free its page-locked buffers.
    pub fn finish_uploads(&mut self) -> Result<()> {
        match self.uploader.take() {
            Some(mut u) => u.finish(),
            None => Ok(()),
        }
    }

    fn weight(&self, w: Weight) -> Result<&DeviceWeight> {
        let w = if w == Weight::Output && self.cfg.tied_output && !self.weights.contains_key(&w) { Weight::TokenEmbd } else { w };
        self.weights.get(&w).ok_or_else(|| anyhow!("weight {w:?} not loaded"))
    }

    /// An f32 vector (norm weight, bias).
    fn vector(&self, w: Weight) -> Result<&CudaBuf> {
        match self.weight(w)? {
            DeviceWeight::F32(b) => Ok(b),
            DeviceWeight::Blocks { ty, .. } => bail!("weight {w:?} is stored as {} blocks, expected an f32 vector", ty.name()),
        }
    }

    /// The storage type of a weight on the GPU: its GGUF type for blocks, F32 otherwise.
    pub fn weight_type(&self, w: Weight) -> Result<GgmlType> {
        Ok(match self.weight(w)? {
            DeviceWeight::F32(_) => GgmlType::F32,
            DeviceWeight::Blocks { ty, .. } => *ty,
        })
    }

    /// A matrix as f32 on the GPU: its own buffer, or its blocks dequantized
    /// by `kernels/quant.cu` into a new one.
    fn dequantized(&self, w: Weight) -> Result<F32Matrix<'_>> {
        match self.weight(w)? {
            DeviceWeight::F32(b) => Ok(F32Matrix::Resident(b)),
            blocks @ DeviceWeight::Blocks { rows, cols, .. } => {
                // Scratch, read by the one matmul: never from the checkpoint
                // arena, which it would fill (17 MB for one of Qwen2-0.5B's
                // FFN matrices) before the pass's checkpoints reach it.
                let mut out = self.alloc_from_pool(vec![*rows, *cols])?;
                self.dequantize_into(blocks, Dequantized::F32(&mut out.data))?;
                Ok(F32Matrix::Scratch(out))
            }
        }
    }

    /// Decodes a block matrix into `out` (rows * cols values) with
    /// `kernels/quant.cu`'s dequant_<ty> (f32) or dequant_f16_<ty> (f16 bits).
    fn dequantize_into(&self, blocks: &DeviceWeight, out: Dequantized<'_>) -> Result<()> {
        let DeviceWeight::Blocks { ty, data, rows, cols, row_bytes, flags } = blocks else {
            bail!("dequantize: the weight is f32, not blocks");
        };
        let (r, c) = (i32_of(*rows, "rows")?, i32_of(*cols, "cols")?);
        let rb = *row_bytes as u64;
        let kernels = &self.k.quant[ty];
        let (mut b, prefix) = match out {
            Dequantized::F32(out) => {
                ensure!(out.len() == rows * cols, "dequantize: {} outputs for a {rows}x{cols} matrix", out.len());
                let mut b = self.stream.launch_builder(&kernels.dequant);
                b.arg(data).arg(&rb).arg(out);
                (b, "dequant")
            }
            Dequantized::F16(out) => {
                ensure!(out.len() == rows * cols, "dequantize: {} outputs for a {rows}x{cols} matrix", out.len());
                let mut b = self.stream.launch_builder(&kernels.dequant_f16);
                b.arg(data).arg(&rb).arg(out);
                (b, "dequant_f16")
            }
        };
        b.arg(&r).arg(&c).arg(flags);
        // SAFETY: `data` holds rows * row_bytes bytes (checked at upload), `out` rows * cols values (checked above).
        unsafe { b.launch(grid_for(rows * cols)) }.with_context(|| format!("launching {prefix}_{}", ty.name()))?;
        Ok(())
    }

    /// [`Backend::linear`], then `residual + y` when a residual is given:
    /// added by the GEMV kernel itself (as `add_f32` adds it, the same
    /// bits), or by `add` after the other paths. `keep_product` (with a
    /// residual): y too, as `linear` alone gives it (the GEMV writes it
    /// beside the sum).
    fn linear_then_add(&self, x: &CudaBuf, weight: Weight, bias: Option<Weight>, read: WeightRead, residual: Option<&CudaBuf>, keep_product: bool) -> Result<(CudaBuf, Option<CudaBuf>)> {
        let t0 = self.prof_start()?;
        let (n_out, n_in) = match self.weight(weight)? {
            DeviceWeight::F32(w) if w.shape.len() == 2 => (w.shape[0], w.shape[1]),
            DeviceWeight::F32(_) => bail!("linear: {weight:?} is not a matrix"),
            DeviceWeight::Blocks { rows, cols, .. } => (*rows, *cols),
        };
        let last = *x.shape.last().ok_or_else(|| anyhow!("linear of a scalar"))?;
        ensure!(last == n_in, "linear: x rows have {last} values, {weight:?} expects {n_in}");
        let n = x.len() / n_in;
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap() = n_out;
        if shape.len() > 2 {
            shape = vec![n, n_out];
        }
        let mut y = self.alloc(shape)?;
        if let Some(res) = residual {
            ensure!(res.len() == y.len(), "linear: residual of shape {:?} for an output of shape {:?}", res.shape, y.shape);
        }
        // The GEMV's copy of the product before the residual, when kept.
        let mut product = None;
        // Whether the residual still has to be added after the product.
        let mut residual_left = residual;
        let bias = match bias {
            Some(bw) => {
                let bvec = self.vector(bw)?;
                ensure!(bvec.len() == n_out, "bias {bw:?} has {} values, output rows {n_out}", bvec.len());
                Some(bvec)
            }
            None => None,
        };
        // Whether the bias still has to be added after the product.
        let mut bias_left = bias;
        let path = match self.weight(weight)? {
            DeviceWeight::Blocks { ty, data, row_bytes, flags, .. } if read == WeightRead::Rows && n <= GEMV_MAX_TOKENS => {
                let (nt, r, c) = (i32_of(n, "n_tokens")?, i32_of(n_out, "rows")?, i32_of(n_in, "cols")?);
                let rb = *row_bytes as u64;
                let x_bytes = self.gemv_x_bytes(n, n_in);
                let (cfg, wpr_arg, staged) = gemv_launch(n_out, n_in, *row_bytes, 1, x_bytes.unwrap_or(0), self.gemv_tuning.max_blocks, self.gemv_tuning);
                let x_staged = i32::from(x_bytes.is_some());
                let no_bias: u64 = 0;
                if keep_product && residual.is_some() {
                    product = Some(self.alloc(y.shape.clone())?);
                }
                let mut b = self.stream.launch_builder(&self.k.quant[ty].gemv);
                b.arg(data).arg(&rb).arg(&*x.data);
                match bias_left.take() {
                    Some(bvec) => b.arg(&*bvec.data),
                    // A null `const float*`: the kernel adds no bias.
                    None => b.arg(&no_bias),
                };
                match residual_left.take() {
                    Some(res) => b.arg(&*res.data),
                    None => b.arg(&no_bias),
                };
                b.arg(&mut *y.data);
                match product.as_mut() {
                    Some(p) => b.arg(&mut *p.data),
                    // A null `float*`: the kernel writes the sum alone.
                    None => b.arg(&no_bias),
                };
                b.arg(&nt).arg(&r).arg(&c).arg(flags).arg(&wpr_arg).arg(&staged).arg(&x_staged);
                // SAFETY: the blocks hold n_out rows of row_bytes (checked at upload); x is [n, n_in], y [n, n_out],
                // n <= GEMV_MAX_TOKENS; the bias, when given, holds n_out values, the residual n * n_out (checked
                // above), the kept product, when given, is y's shape; the launch gives the shared memory of x's
                // copy when x_staged, then of the rows stage_rows fills when staged (gemv_launch).
                unsafe { b.launch(cfg) }.with_context(|| format!("launching gemv_{} for {weight:?}", ty.name()))?;
                "linear (gemv on blocks)"
            }
            DeviceWeight::Blocks { .. } if self.prefill_matmul == PrefillMatmul::F16 => {
                self.linear_f16(x, weight, read, n, n_out, n_in, bias_left.take(), &mut y)?;
                "linear (f16 tensor cores)"
            }
            other => {
                let path = if matches!(other, DeviceWeight::F32(_)) { "linear (sgemm on f32)" } else { "linear (dequantize + sgemm)" };
                let w = self.dequantized(weight)?;
                let (transa, lda) = weight_op(read, n_out, n_in);
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
                // SAFETY: the dimensions above describe w ([n_out, n_in]), x ([n, n_in]) and y ([n, n_out]) exactly.
                unsafe { self.blas.gemm(cfg, &*w.data, &*x.data, &mut *y.data) }.with_context(|| format!("cublasSgemm for {weight:?}"))?;
                path
            }
        };
        if let Some(bvec) = bias_left {
            let (nr, nc) = (i32_of(n, "rows")?, i32_of(n_out, "cols")?);
            let cfg = grid_for(y.len());
            let mut b = self.stream.launch_builder(&self.k.add_bias);
            b.arg(&mut *y.data).arg(&*bvec.data).arg(&nr).arg(&nc);
            unsafe { b.launch(cfg) }.context("launching add_bias_f32")?;
        }
        self.prof_end(path, t0)?;
        match residual_left {
            // The product is y itself: kept as it is, the sum a new buffer.
            Some(res) => Ok((self.add(res, &y)?, keep_product.then_some(y))),
            None => Ok((y, product)),
        }
    }

    /// The fused norm's weight vector (checked to hold `n_cols` values) and
    /// epsilon, for a GEMV kernel's `norm_w` and `eps` arguments.
    fn fused_norm_args(&self, norm: Option<FusedNorm>, n_cols: usize) -> Result<Option<(&CudaSlice<f32>, f32)>> {
        let Some(nm) = norm else { return Ok(None) };
        let v = self.vector(nm.weight)?;
        ensure!(v.len() == n_cols, "fused RMSNorm: weight {:?} of {} values for rows of {n_cols}", nm.weight, v.len());
        Ok(Some((&*v.data, nm.eps)))
    }

    /// [`gemv_x_bytes`] unless `QWEN2_PARITY_CUDA_GEMV_STAGE_X=0`.
    fn gemv_x_bytes(&self, n: usize, n_cols: usize) -> Option<usize> {
        if self.gemv_tuning.stage_x {
            gemv_x_bytes(n, n_cols)
        } else {
            None
        }
    }

    /// `linear3` of x, or of `rms_norm(x)` when `norm` is given. Runs of
    /// projections that are GEMVs on blocks of one type go to one gemv3
    /// launch each ([`CudaBackend::gemv_group`]), the norm fused into each
    /// (so computed once per run, the same bits each time) when every
    /// projection is such a GEMV and the tokens fit in shared memory; else
    /// the norm is its own launch, and the rest go to `linear`. `keep_norm`
    /// (with a norm): its output too (the first gemv3 launch writes it).
    fn linear3_normed(&self, x: &CudaBuf, norm: Option<FusedNorm>, projections: [(Weight, Option<Weight>, WeightRead); 3], keep_norm: bool) -> Result<([CudaBuf; 3], Option<CudaBuf>)> {
        let n_in = *x.shape.last().ok_or_else(|| anyhow!("linear of a scalar"))?;
        let n = x.len() / n_in.max(1);
        // The block type of each projection that is a GEMV over blocks.
        let mut gemv_type = [None; 3];
        for (slot, (w, _, read)) in gemv_type.iter_mut().zip(&projections) {
            if let DeviceWeight::Blocks { ty, cols, .. } = self.weight(*w)? {
                if *read == WeightRead::Rows && n <= GEMV_MAX_TOKENS && *cols == n_in {
                    *slot = Some(*ty);
                }
            }
        }
        if let Some(nm) = norm {
            if !self.gemv_tuning.fuse_norm || gemv_type.contains(&None) || self.gemv_x_bytes(n, n_in).is_none() {
                let h = self.rms_norm(x, nm.weight, nm.eps)?;
                let (out, _) = self.linear3_normed(&h, None, projections, false)?;
                return Ok((out, keep_norm.then_some(h)));
            }
        }
        if !self.gemv_tuning.fuse {
            return Ok((crate::backend::linear3_separately(self, x, projections)?, None));
        }
        // The norm's output, written by the first launch that fuses it.
        let mut kept = match norm {
            Some(_) if keep_norm => Some(self.alloc(vec![n, n_in])?),
            _ => None,
        };
        let mut norm_out = kept.as_mut();
        let mut out: Vec<CudaBuf> = Vec::with_capacity(3);
        let mut i = 0;
        while i < 3 {
            let Some(ty) = gemv_type[i] else {
                let (w, b, read) = projections[i];
                out.push(self.linear(x, w, b, read)?);
                i += 1;
                continue;
            };
            let end = (i..3).find(|&j| gemv_type[j] != Some(ty)).unwrap_or(3);
            let group: Vec<(Weight, Option<Weight>)> = projections[i..end].iter().map(|&(w, b, _)| (w, b)).collect();
            out.extend(self.gemv_group(x, n, ty, &group, norm, norm_out.take())?);
            i = end;
        }
        let out = out.try_into().map_err(|_| anyhow!("linear3: not three outputs"))?;
        Ok((out, kept))
    }

    /// `gated_linear` of x, or of `rms_norm(x)` when `norm` is given: the
    /// norm fused into the gated GEMV when both matrices are blocks of one
    /// shape and the tokens fit in shared memory, else by its own launch.
    /// `keep`: the two products too; `keep_norm` (with a norm): its output.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn gated_linear_normed(&self, x: &CudaBuf, norm: Option<FusedNorm>, a: Weight, b: Weight, act: Activation, keep: bool, keep_norm: bool) -> Result<(CudaBuf, Option<(CudaBuf, CudaBuf)>, Option<CudaBuf>)> {
        let n_in = *x.shape.last().ok_or_else(|| anyhow!("gated_linear of a scalar"))?;
        let n = x.len() / n_in.max(1);
        let x_bytes = self.gemv_x_bytes(n, n_in);
        let fused = match (self.weight(a)?, self.weight(b)?) {
            (
                DeviceWeight::Blocks { ty, data: wa, rows, cols, row_bytes, flags },
                DeviceWeight::Blocks { ty: ty_b, data: wb, rows: rows_b, cols: cols_b, row_bytes: rb_b, flags: flags_b },
            ) if ty == ty_b && rows == rows_b && cols == cols_b && row_bytes == rb_b && flags == flags_b && n <= GEMV_MAX_TOKENS => {
                Some((*ty, wa, wb, *rows, *cols, *row_bytes, *flags))
            }
            _ => None,
        };
        let (Some((ty, wa, wb, n_out, cols, row_bytes, flags)), true) = (fused, norm.is_none() || (self.gemv_tuning.fuse_norm && x_bytes.is_some())) else {
            if let Some(nm) = norm {
                let h = self.rms_norm(x, nm.weight, nm.eps)?;
                let (y, products, _) = self.gated_linear_normed(&h, None, a, b, act, keep, false)?;
                return Ok((y, products, keep_norm.then_some(h)));
            }
            let ya = self.linear(x, a, None, WeightRead::Rows)?;
            let yb = self.linear(x, b, None, WeightRead::Rows)?;
            let y = self.swiglu(&ya, &yb, act)?;
            return Ok((y, keep.then_some((ya, yb)), None));
        };
        let t0 = self.prof_start()?;
        ensure!(n_in == cols, "gated_linear: x rows have {n_in} values, {a:?} expects {cols}");
        let mut y = self.alloc(vec![n, n_out])?;
        // What the kernel writes besides y, when kept.
        let mut products = if keep { Some((self.alloc(vec![n, n_out])?, self.alloc(vec![n, n_out])?)) } else { None };
        let mut kept_norm = if keep_norm && norm.is_some() { Some(self.alloc(vec![n, n_in])?) } else { None };
        let (nt, r, c) = (i32_of(n, "n_tokens")?, i32_of(n_out, "rows")?, i32_of(cols, "cols")?);
        let rb = row_bytes as u64;
        let (cfg, wpr_arg, staged) = gemv_launch(n_out, cols, row_bytes, 2, x_bytes.unwrap_or(0), self.gemv_tuning.max_blocks, self.gemv_tuning);
        let x_staged = i32::from(x_bytes.is_some());
        let act_code = activation_code(act);
        let mut l = self.stream.launch_builder(&self.k.quant[&ty].gemv_glu);
        let (null, no_eps) = (0u64, 0.0f32);
        l.arg(wa).arg(wb).arg(&rb).arg(&*x.data).arg(&mut *y.data);
        match products.as_mut() {
            Some((ya, yb)) => l.arg(&mut *ya.data).arg(&mut *yb.data),
            None => l.arg(&null).arg(&null),
        };
        l.arg(&nt).arg(&r).arg(&c).arg(&flags).arg(&wpr_arg).arg(&act_code).arg(&staged);
        let norm_args = self.fused_norm_args(norm, cols)?;
        match &norm_args {
            Some((v, _)) => l.arg(*v),
            None => l.arg(&null),
        };
        match kept_norm.as_mut() {
            Some(h) => l.arg(&mut *h.data),
            None => l.arg(&null),
        };
        match &norm_args {
            Some((_, eps)) => l.arg(eps),
            None => l.arg(&no_eps),
        };
        l.arg(&x_staged);
        // SAFETY: both matrices hold n_out rows of row_bytes (checked at upload, and equal above); x is [n, cols],
        // y and the kept products [n, n_out], n <= GEMV_MAX_TOKENS; the norm weight, when fused, holds cols values
        // (x is then staged: checked above), its kept output [n, cols]; the shared memory holds x's copy when
        // x_staged, then, when staged, both matrices' regions (gemv_launch).
        unsafe { l.launch(cfg) }.with_context(|| format!("launching gemv_glu_{} for {a:?} and {b:?}", ty.name()))?;
        self.prof_end("gated linear (gemv on blocks)", t0)?;
        Ok((y, products, kept_norm))
    }

    /// One to three GEMVs of x (`n` tokens) over block matrices of type
    /// `ty` with the same row length, in one gemv3 launch: each matrix's
    /// blocks are launched as its own gemv launch would be, so each output
    /// has the bits of `linear` (and its bias added as `linear` adds it).
    /// `norm`: the RMSNorm of x before them, fused (the bits of `rms_norm`
    /// then the GEMVs; x must then fit in shared memory, [`CudaBackend::gemv_x_bytes`]).
    /// `norm_out` (with `norm`): the norm's output goes there too, `[n, n_in]`.
    fn gemv_group(&self, x: &CudaBuf, n: usize, ty: GgmlType, group: &[(Weight, Option<Weight>)], norm: Option<FusedNorm>, norm_out: Option<&mut CudaBuf>) -> Result<Vec<CudaBuf>> {
        ensure!((1..=3).contains(&group.len()), "gemv3 takes 1 to 3 matrices, not {}", group.len());
        let t0 = self.prof_start()?;
        let n_in = *x.shape.last().ok_or_else(|| anyhow!("linear of a scalar"))?;
        struct Segment<'a> {
            data: &'a CudaSlice<u8>,
            bias: Option<&'a CudaBuf>,
            rows: i32,
            flags: i32,
            wpr: i32,
            staged: i32,
            blocks: u32,
        }
        let mut segments = Vec::with_capacity(3);
        // The outputs, one per matrix ([n, rows]).
        let mut ys: Vec<CudaBuf> = Vec::with_capacity(3);
        let mut row_bytes_all = None;
        let mut shared = 0u32;
        let x_bytes = self.gemv_x_bytes(n, n_in);
        ensure!(norm.is_none() || x_bytes.is_some(), "gemv3: {n} rows of {n_in} cannot be normalized in shared memory");
        for &(w, b) in group {
            let DeviceWeight::Blocks { ty: wty, data, rows, cols, row_bytes, flags } = self.weight(w)? else {
                bail!("gemv3: {w:?} is not blocks");
            };
            ensure!(*wty == ty && *cols == n_in, "gemv3: {w:?} is {} [{rows}, {cols}], expected {} rows of {n_in}", wty.name(), ty.name());
            ensure!(*row_bytes_all.get_or_insert(*row_bytes) == *row_bytes, "gemv3: {w:?} has rows of {row_bytes} bytes, unlike the others");
            let bias = match b {
                Some(bw) => {
                    let bvec = self.vector(bw)?;
                    ensure!(bvec.len() == *rows, "bias {bw:?} has {} values, output rows {rows}", bvec.len());
                    Some(bvec)
                }
                None => None,
            };
            let (cfg, wpr, staged) = gemv_launch(*rows, n_in, *row_bytes, 1, x_bytes.unwrap_or(0), u32::MAX, self.gemv_tuning);
            shared = shared.max(cfg.shared_mem_bytes);
            segments.push(Segment { data, bias, rows: i32_of(*rows, "rows")?, flags: *flags, wpr, staged, blocks: cfg.grid_dim.0 });
            ys.push(self.alloc(vec![n, *rows])?);
        }
        let row_bytes = row_bytes_all.unwrap_or(0) as u64;
        // Block starts of matrices 1 and 2; an absent matrix starts at the end.
        let total: u32 = segments.iter().map(|s| s.blocks).sum();
        let start1 = segments.first().map_or(total, |s| s.blocks);
        let start2 = if segments.len() > 2 { start1 + segments[1].blocks } else { total };
        let (nt, c) = (i32_of(n, "n_tokens")?, i32_of(n_in, "cols")?);
        let (null, zero) = (0u64, 0i32);
        let mut b = self.stream.launch_builder(&self.k.quant[&ty].gemv3);
        for k in 0..3 {
            match segments.get(k) {
                Some(s) => b.arg(s.data),
                None => b.arg(&null),
            };
        }
        b.arg(&row_bytes).arg(&*x.data);
        for k in 0..3 {
            match segments.get(k).and_then(|s| s.bias) {
                Some(bvec) => b.arg(&*bvec.data),
                None => b.arg(&null),
            };
        }
        let mut ys_left = ys.iter_mut();
        for _ in 0..3 {
            match ys_left.next() {
                Some(y) => b.arg(&mut *y.data),
                None => b.arg(&null),
            };
        }
        b.arg(&nt);
        for k in 0..3 {
            b.arg(segments.get(k).map_or(&zero, |s| &s.rows));
        }
        b.arg(&c);
        for k in 0..3 {
            b.arg(segments.get(k).map_or(&zero, |s| &s.flags));
        }
        for k in 0..3 {
            b.arg(segments.get(k).map_or(&zero, |s| &s.wpr));
        }
        for k in 0..3 {
            b.arg(segments.get(k).map_or(&zero, |s| &s.staged));
        }
        let (s1, s2) = (start1 as i32, start2 as i32);
        b.arg(&s1).arg(&s2);
        let norm_args = self.fused_norm_args(norm, n_in)?;
        ensure!(norm_out.as_ref().is_none_or(|o| norm.is_some() && o.len() == n * n_in), "gemv3: a norm output without a fused norm, or not [{n}, {n_in}]");
        let no_eps = 0.0f32;
        match &norm_args {
            Some((v, _)) => b.arg(*v),
            None => b.arg(&null),
        };
        match norm_out {
            Some(o) => b.arg(&mut *o.data),
            None => b.arg(&null),
        };
        match &norm_args {
            Some((_, eps)) => b.arg(eps),
            None => b.arg(&no_eps),
        };
        let x_staged = i32::from(x_bytes.is_some());
        b.arg(&x_staged);
        let cfg = LaunchConfig { grid_dim: (total, 1, 1), block_dim: (GEMV_WARPS * 32, 1, 1), shared_mem_bytes: shared };
        // SAFETY: each present matrix holds `rows` rows of row_bytes (checked at
        // upload; one row_bytes for all, checked above); x is [n, n_in] with
        // n <= GEMV_MAX_TOKENS (linear3); each y is [n, rows], each bias (when
        // given) `rows` values; absent matrices have 0 rows and null pointers,
        // and no block is theirs (their start is the grid's end); the shared
        // memory is the largest a segment's staging needs, after x's copy
        // when x_staged (always when the norm, n_in values, is fused); the
        // norm's output, when given, is [n, n_in] (checked above).
        unsafe { b.launch(cfg) }.with_context(|| format!("launching gemv3_{} for {:?}", ty.name(), group.iter().map(|g| g.0).collect::<Vec<_>>()))?;
        self.prof_end("linear (gemv3 on blocks)", t0)?;
        Ok(ys)
    }

    /// `y = x · W^T (+ bias)` on f16 tensor cores for a quantized W: W
    /// dequantized to f16, each row of x scaled by a power of two into f16
    /// (`rows_to_f16`), cuBLAS GemmEx with f32 accumulation (the transpose
    /// flags of [`Backend::linear`]), then each row scaled back and the bias
    /// added in one pass.
    #[allow(clippy::too_many_arguments)]
    fn linear_f16(&self, x: &CudaBuf, weight: Weight, read: WeightRead, n: usize, n_out: usize, n_in: usize, bias: Option<&CudaBuf>, y: &mut CudaBuf) -> Result<()> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasGemmEx, cublasStatus_t, cudaDataType};
        let (r, c, nt) = (i32_of(n_out, "rows")?, i32_of(n_in, "cols")?, i32_of(n, "n_tokens")?);
        // SAFETY (the three allocations): each kernel below writes all of its output.
        let mut w16 = unsafe { self.stream.alloc::<u16>(n_out * n_in) }.context("allocating the f16 weight scratch")?;
        let mut x16 = unsafe { self.stream.alloc::<u16>(n * n_in) }.context("allocating the f16 activations")?;
        let mut scales = unsafe { self.stream.alloc::<f32>(n) }.context("allocating the row scales")?;
        self.dequantize_into(self.weight(weight)?, Dequantized::F16(&mut w16))?;
        let mut b = self.stream.launch_builder(&self.k.rows_to_f16);
        b.arg(&*x.data).arg(&mut x16).arg(&mut scales).arg(&c);
        // SAFETY: x is [n, n_in] (checked by linear), x16 [n, n_in], scales [n]; one block per row.
        unsafe { b.launch(rows_grid(n)?) }.context("launching rows_to_f16")?;
        let (transa, lda) = weight_op(read, n_out, n_in);
        let (alpha, beta) = (1.0f32, 0.0f32);
        {
            let (a_ptr, _a) = w16.device_ptr(&self.stream);
            let (b_ptr, _b) = x16.device_ptr(&self.stream);
            let (c_ptr, _c) = y.data.device_ptr(&self.stream);
            // SAFETY: the pointers are live device buffers of the sizes the
            // dimensions describe (A [n_out, n_in] f16, B [n, n_in] f16, C
            // [n, n_out] f32, column-major as in `linear`); alpha and beta are
            // host f32 (cuBLAS's default pointer mode); the handle is bound to
            // this backend's stream, so stream order keeps the buffers alive
            // and written before use.
            let status = unsafe {
                cublasGemmEx(
                    *self.blas.handle(),
                    transa,
                    cublasOperation_t::CUBLAS_OP_N,
                    r,
                    nt,
                    c,
                    (&alpha as *const f32).cast(),
                    a_ptr as *const std::ffi::c_void,
                    cudaDataType::CUDA_R_16F,
                    i32_of(lda, "lda")?,
                    b_ptr as *const std::ffi::c_void,
                    cudaDataType::CUDA_R_16F,
                    c,
                    (&beta as *const f32).cast(),
                    c_ptr as *mut std::ffi::c_void,
                    cudaDataType::CUDA_R_32F,
                    r,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            };
            ensure!(status == cublasStatus_t::CUBLAS_STATUS_SUCCESS, "cublasGemmEx (f16) for {weight:?}: {status:?}");
        }
        let no_bias: u64 = 0;
        let mut b = self.stream.launch_builder(&self.k.scale_rows_add_bias);
        b.arg(&mut *y.data).arg(&scales);
        match bias {
            Some(bvec) => b.arg(&*bvec.data),
            None => b.arg(&no_bias),
        };
        b.arg(&nt).arg(&r);
        // SAFETY: y is [n, n_out], scales [n], the bias (when given) n_out values (checked by linear).
        unsafe { b.launch(grid_for(n * n_out)) }.context("launching scale_rows_add_bias")?;
        Ok(())
    }

    /// A weight's values as the kernels read them, on the host (for tests:
    /// blocks dequantized on the GPU must equal the host dequantizer's).
    pub fn weight_to_host(&self, w: Weight) -> Result<Tensor> {
        let values = self.dequantized(w)?;
        self.to_host(&values)
    }

    /// The device's name, as the driver reports it (e.g. "NVIDIA H100 80GB HBM3").
    /// The arithmetic of the matmuls, for every run's log ([`PrefillMatmul::describe`]).
    pub fn matmul_arithmetic(&self) -> &'static str {
        self.prefill_matmul.describe()
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    pub fn config(&self) -> &Qwen2Config {
        &self.cfg
    }

    /// Bytes of GPU memory held by the weights.
    pub fn weight_bytes(&self) -> usize {
        self.weights.values().map(DeviceWeight::bytes).sum()
    }

    /// Wait for every queued kernel; surfaces asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().context("synchronizing the CUDA stream")
    }

    /// An op's output: from the checkpoint arena while it is active and has
    /// room (`arena.rs`), else from the memory pool.
    fn alloc(&self, shape: Vec<usize>) -> Result<CudaBuf> {
        let n: usize = shape.iter().product();
        ensure!(n > 0, "empty tensor of shape {shape:?}");
        if let Some((data, ticket)) = self.arena.borrow_mut().take(&self.stream, n) {
            return Ok(CudaBuf { data: ManuallyDrop::new(data), shape, arena: Some(ticket) });
        }
        self.alloc_from_pool(shape)
    }

    /// A buffer from the device's memory pool (`cuMemAllocAsync`).
    fn alloc_from_pool(&self, shape: Vec<usize>) -> Result<CudaBuf> {
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
        Ok(CudaBuf::owned(data, shape))
    }

    /// Start timing an op (only when profiling).
    fn prof_start(&self) -> Result<Option<profile::OpTimer>> {
        self.profile.as_ref().map(|p| p.start(&self.stream)).transpose()
    }

    /// End timing `op` (nothing is waited for: see [`profile`]).
    fn prof_end(&self, op: &'static str, started: Option<profile::OpTimer>) -> Result<()> {
        match (&self.profile, started) {
            (Some(p), Some(t)) => p.end(op, t, &self.stream),
            _ => Ok(()),
        }
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        ensure!(layer < self.cfg.n_layer, "layer {layer} out of range (n_layer {})", self.cfg.n_layer);
        Ok(())
    }

    /// Run every decode step op by op from now on (`why` goes to
    /// `recording_status`): for A/B timings and tests.
    pub fn disable_recording(&mut self, why: &str) {
        self.recording = graph::Recording::Off(format!("op by op: {why}"));
    }

    /// A position as the position-taking kernels get it: `(value, step_pos)`.
    /// Outside a recording, the position itself and a null pointer; while
    /// recording the step at `pos0`, the position relative to `pos0` and the
    /// device int each replay writes its own position into (the kernels add
    /// the two), so the recorded kernels follow the replayed step.
    fn position(&self, pos: usize) -> Result<(i32, u64)> {
        match &self.recording {
            graph::Recording::Capturing { pos0, .. } => {
                let rel = i32_of(pos, "position")? - i32_of(*pos0, "position")?;
                let (ptr, _sync) = self.step.pos.device_ptr(&self.stream);
                Ok((rel, ptr))
            }
            _ => Ok((i32_of(pos, "position")?, 0)),
        }
    }

    /// Drop the errors cudarc set aside during a failed capture (buffers
    /// freed into an invalidated capture): they belong to the abandoned
    /// recording, and cudarc would otherwise return one from the next
    /// unrelated call.
    fn forget_capture_errors(&self) {
        let _ = self.ctx.check_err();
    }

    fn capturing(&self) -> bool {
        matches!(self.recording, graph::Recording::Capturing { .. })
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

    fn reshape(&self, mut buf: CudaBuf, shape: &[usize]) -> Result<CudaBuf> {
        let n: usize = shape.iter().product();
        ensure!(n == buf.len(), "cannot reshape {:?} ({} values) to {shape:?}", buf.shape, buf.len());
        buf.shape = shape.to_vec();
        Ok(buf)
    }

    fn to_host(&self, buf: &CudaBuf) -> Result<Tensor> {
        let t0 = self.prof_start()?;
        let data = self.copy_to_host(&*buf.data)?;
        ensure!(data.len() == buf.shape.iter().product::<usize>(), "buffer of {} values has shape {:?}", data.len(), buf.shape);
        self.prof_end("to_host", t0)?;
        Ok(Tensor::new(buf.shape.clone(), data))
    }

    fn start_to_host(&self, buf: &CudaBuf) -> Result<Option<Tensor>> {
        let t0 = self.prof_start()?;
        // Outputs from here to the end of the pass come from the arena.
        self.arena.borrow_mut().activate(&self.stream)?;
        let mut f = self.in_flight.borrow_mut();
        if buf.arena.is_some() {
            let offset = self.arena.borrow().offset_of(&self.stream, &buf.data).context("a buffer of the checkpoint arena outside it")?;
            f.copies.push((Held::Device(offset), buf.shape.clone()));
            self.prof_end("to_host", t0)?;
            return Ok(None);
        }
        let n = buf.len();
        let capacity = f.arena.as_ref().map_or(0, |a| a.len());
        if f.used + n > capacity {
            self.drain_in_flight(&mut f)?;
            if n > capacity {
                // Nothing is in flight into the old arena any more.
                f.arena = None;
                // A range of it is only read after a copy into it finished.
                f.arena = Some(self.alloc_pinned(n.max(IN_FLIGHT_VALUES))?);
            }
        }
        let offset = f.used;
        let arena = f.arena.as_mut().expect("allocated above");
        let dst = &mut arena.as_mut_slice().context("page-locked arena")?[offset..offset + n];
        // Asynchronous into page-locked memory: `drain_in_flight` waits.
        self.stream.memcpy_dtoh(&*buf.data, dst).context("device-to-host copy")?;
        f.copies.push((Held::Pinned(offset), buf.shape.clone()));
        f.used += n;
        self.prof_end("to_host", t0)?;
        Ok(None)
    }

    fn finish_to_host(&self) -> Result<Vec<Tensor>> {
        let t0 = self.prof_start()?;
        let mut f = self.in_flight.borrow_mut();
        let drained = self.drain_in_flight(&mut f);
        // The pass is over: its outputs are gone, so the arena may start again.
        self.arena.borrow_mut().deactivate();
        if let Err(e) = drained {
            // Nothing of this pass is delivered; the next starts empty.
            f.copies.clear();
            f.done.clear();
            f.used = 0;
            return Err(e);
        }
        self.prof_end("to_host", t0)?;
        Ok(std::mem::take(&mut f.done))
    }

    fn rows_to_host(&self, buf: &CudaBuf, start: usize, n: usize) -> Result<Tensor> {
        let t0 = self.prof_start()?;
        let cols = *buf.shape.last().ok_or_else(|| anyhow!("rows of a scalar"))?;
        ensure!((start + n) * cols <= buf.len(), "rows {start}..{} of a buffer of shape {:?}", start + n, buf.shape);
        let data = self.copy_to_host(&buf.data.slice(start * cols..(start + n) * cols))?;
        self.prof_end("to_host", t0)?;
        Ok(Tensor::new(vec![n, cols], data))
    }

    fn rows(&self, buf: &CudaBuf, start: usize, n: usize) -> Result<CudaBuf> {
        let cols = *buf.shape.last().ok_or_else(|| anyhow!("rows of a scalar"))?;
        ensure!((start + n) * cols <= buf.len(), "rows {start}..{} of a buffer of shape {:?}", start + n, buf.shape);
        let mut out = self.alloc(vec![n, cols])?;
        self.stream.memcpy_dtod(&buf.data.slice(start * cols..(start + n) * cols), &mut *out.data).context("device-to-device copy")?;
        Ok(out)
    }

    fn from_host(&self, tensor: &Tensor) -> Result<CudaBuf> {
        ensure!(!tensor.data.is_empty(), "empty tensor");
        let data = self.stream.clone_htod(&tensor.data).context("host-to-device copy")?;
        Ok(CudaBuf::owned(data, tensor.shape.clone()))
    }

    fn embed(&self, tokens: &[i32], read: WeightRead) -> Result<CudaBuf> {
        let t0 = self.prof_start()?;
        ensure!(!tokens.is_empty(), "no tokens");
        if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t as usize >= self.cfg.n_vocab) {
            bail!("token id {bad} out of range (n_vocab {})", self.cfg.n_vocab);
        }
        // A recorded pass reads the token each replay writes into `step.token`.
        let uploaded;
        let ids = if self.capturing() {
            ensure!(tokens.len() == 1, "a recorded pass embeds one token, not {}", tokens.len());
            &self.step.token
        } else {
            uploaded = self.stream.clone_htod(tokens).context("uploading token ids")?;
            &uploaded
        };
        let n_embd = self.cfg.n_embd;
        let mut out = self.alloc(vec![tokens.len(), n_embd])?;
        let (nt, ne, nv) = (i32_of(tokens.len(), "n_tokens")?, i32_of(n_embd, "n_embd")?, i32_of(self.cfg.n_vocab, "n_vocab")?);
        let transposed = i32::from(read == WeightRead::Transposed);
        let cfg = grid_for(out.len());
        match self.weight(Weight::TokenEmbd)? {
            DeviceWeight::F32(table) => {
                let mut b = self.stream.launch_builder(&self.k.embed);
                b.arg(&*table.data).arg(ids).arg(&mut *out.data).arg(&nt).arg(&ne).arg(&nv).arg(&transposed);
                // SAFETY: ids are range-checked above; table is [n_vocab, n_embd], out [n_tokens, n_embd].
                unsafe { b.launch(cfg) }.context("launching embed_f32")?;
            }
            DeviceWeight::Blocks { ty, data, row_bytes, flags, .. } => {
                let rb = *row_bytes as u64;
                let mut b = self.stream.launch_builder(&self.k.quant[ty].get_rows);
                b.arg(data).arg(&rb).arg(ids).arg(&mut *out.data).arg(&nt).arg(&nv).arg(&ne).arg(&transposed).arg(flags);
                // SAFETY: as above; the blocks hold n_vocab rows of row_bytes (checked at upload).
                unsafe { b.launch(cfg) }.with_context(|| format!("launching get_rows_{}", ty.name()))?;
            }
        }
        self.prof_end("embed", t0)?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaBuf, weight: Weight, eps: f32) -> Result<CudaBuf> {
        let t0 = self.prof_start()?;
        let w = self.vector(weight)?;
        let n_cols = *x.shape.last().ok_or_else(|| anyhow!("rms_norm of a scalar"))?;
        ensure!(w.len() == n_cols, "rms_norm: weight {weight:?} has {} values, rows have {n_cols}", w.len());
        let rows = x.len() / n_cols;
        let mut out = self.alloc(x.shape.clone())?;
        let nc = i32_of(n_cols, "n_cols")?;
        let mut b = self.stream.launch_builder(&self.k.rms_norm);
        b.arg(&*x.data).arg(&*w.data).arg(&mut *out.data).arg(&nc).arg(&eps);
        unsafe { b.launch(rows_grid(rows)?) }.context("launching rms_norm_f32")?;
        self.prof_end("rms_norm", t0)?;
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
    ///
    /// A quantized matrix and at most [`GEMV_MAX_TOKENS`] rows of `x` (read
    /// as rows) take the GEMV kernel over the blocks instead.
    fn linear(&self, x: &CudaBuf, weight: Weight, bias: Option<Weight>, read: WeightRead) -> Result<CudaBuf> {
        self.linear_then_add(x, weight, bias, read, None, false).map(|(y, _)| y)
    }

    /// The GEMV adds the residual itself ([`CudaBackend::linear_then_add`]).
    fn linear_residual(&self, x: &CudaBuf, weight: Weight, read: WeightRead, residual: &CudaBuf, keep: bool) -> Result<(CudaBuf, Option<CudaBuf>)> {
        self.linear_then_add(x, weight, None, read, Some(residual), keep)
    }

    fn rope(&self, x: &CudaBuf, pos0: usize, freq_base: f32, pairing: RopePairing) -> Result<CudaBuf> {
        let t0 = self.prof_start()?;
        ensure!(x.shape.len() == 3, "rope expects [n_tokens, n_heads, head_dim], got {:?}", x.shape);
        let (nt, nh, hd) = (x.shape[0], x.shape[1], x.shape[2]);
        ensure!(hd.is_multiple_of(2), "rope: odd head_dim {hd}");
        let mut out = self.alloc(x.shape.clone())?;
        let (nt_, nh_, hd_) = (i32_of(nt, "n_tokens")?, i32_of(nh, "n_heads")?, i32_of(hd, "head_dim")?);
        let (p0, step_pos) = self.position(pos0)?;
        i32_of(pos0 + nt, "last position")?;
        let pairing = pairing_code(pairing);
        let mut b = self.stream.launch_builder(&self.k.rope);
        b.arg(&*x.data).arg(&mut *out.data).arg(&nt_).arg(&nh_).arg(&hd_).arg(&p0).arg(&freq_base).arg(&pairing).arg(&step_pos);
        // SAFETY: x and out are [nt, nh, hd]; step_pos is null or the step's device int.
        unsafe { b.launch(grid_for(nt * nh * hd / 2)) }.context("launching rope_f32")?;
        self.prof_end("rope", t0)?;
        Ok(out)
    }

    /// One kernel for the three launches (rope_qk_kv_store in attention.cu).
    fn rope_qk_kv_store(
        &mut self,
        layer: usize,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        rope_pos0: usize,
        freq_base: f32,
        pairing: RopePairing,
        kv_pos0: usize,
    ) -> Result<(CudaBuf, CudaBuf)> {
        if !self.gemv_tuning.fuse {
            return crate::backend::rope_qk_kv_store_separately(self, layer, q, k, v, rope_pos0, freq_base, pairing, kv_pos0);
        }
        let t0 = self.prof_start()?;
        self.check_layer(layer)?;
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_head_kv, self.cfg.head_dim);
        ensure!(q.shape.len() == 3 && q.shape[1..] == [nh, hd], "rope: q {:?} is not [n_tokens, {nh}, {hd}]", q.shape);
        let nt = q.shape[0];
        ensure!(k.shape == [nt, nkv, hd] && v.shape == k.shape, "rope/kv_store: K {:?} and V {:?} are not [{nt}, {nkv}, {hd}]", k.shape, v.shape);
        ensure!(hd.is_multiple_of(2), "rope: odd head_dim {hd}");
        ensure!(kv_pos0 + nt <= self.opts.max_ctx, "kv_store: positions {kv_pos0}..{} beyond the cache capacity {}", kv_pos0 + nt, self.opts.max_ctx);
        i32_of(rope_pos0 + nt, "last position")?;
        let mut q_out = self.alloc(q.shape.clone())?;
        let mut k_out = self.alloc(k.shape.clone())?;
        let a = [i32_of(nt, "n_tokens")?, i32_of(nh, "n_head")?, i32_of(nkv, "n_head_kv")?, i32_of(hd, "head_dim")?];
        let (rope_p0, step_pos) = self.position(rope_pos0)?;
        let (kv_p0, _) = self.position(kv_pos0)?;
        let pairing = pairing_code(pairing);
        let work = nt * (nh + nkv) * hd / 2 + v.len();
        let stream = self.stream.clone();
        let mut b = match &mut self.cache {
            KvCache::F32 { k: kc, v: vc } => {
                let mut b = stream.launch_builder(&self.k.rope_qk_kv_store_f32);
                b.arg(&*q.data).arg(&*k.data).arg(&*v.data).arg(&mut *q_out.data).arg(&mut *k_out.data).arg(&mut kc[layer]).arg(&mut vc[layer]);
                b
            }
            KvCache::F16 { k: kc, v: vc } => {
                let mut b = stream.launch_builder(&self.k.rope_qk_kv_store_f16);
                b.arg(&*q.data).arg(&*k.data).arg(&*v.data).arg(&mut *q_out.data).arg(&mut *k_out.data).arg(&mut kc[layer]).arg(&mut vc[layer]);
                b
            }
        };
        for x in &a {
            b.arg(x);
        }
        b.arg(&rope_p0).arg(&kv_p0).arg(&freq_base).arg(&pairing).arg(&step_pos);
        // SAFETY: q and q_out are [nt, nh, hd], k, v and k_out [nt, nkv, hd]
        // (checked above); the layer's caches hold max_ctx >= kv_pos0 + nt rows
        // of nkv * hd; step_pos is null or the step's device int.
        unsafe { b.launch(grid_for(work)) }.context("launching rope_qk_kv_store")?;
        self.prof_end("rope + kv_store", t0)?;
        Ok((q_out, k_out))
    }

    fn kv_store(&mut self, layer: usize, k: &CudaBuf, v: &CudaBuf, pos0: usize) -> Result<()> {
        let t0 = self.prof_start()?;
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
        let (nt_, row_) = (i32_of(nt, "n_tokens")?, i32_of(kv_row, "kv_row")?);
        let (p0, step_pos) = self.position(pos0)?;
        let cfg = grid_for(k.len());
        match &mut self.cache {
            KvCache::F32 { k: kc, v: vc } => {
                let mut b = self.stream.launch_builder(&self.k.kv_store_f32);
                b.arg(&*k.data).arg(&*v.data).arg(&mut kc[layer]).arg(&mut vc[layer]).arg(&nt_).arg(&row_).arg(&p0).arg(&step_pos);
                unsafe { b.launch(cfg) }.context("launching kv_store_f32")?;
            }
            KvCache::F16 { k: kc, v: vc } => {
                let mut b = self.stream.launch_builder(&self.k.kv_store_f16);
                b.arg(&*k.data).arg(&*v.data).arg(&mut kc[layer]).arg(&mut vc[layer]).arg(&nt_).arg(&row_).arg(&p0).arg(&step_pos);
                unsafe { b.launch(cfg) }.context("launching kv_store_f16")?;
            }
        }
        self.prof_end("kv_store", t0)?;
        Ok(())
    }

    fn attn_scores(&self, layer: usize, q: &CudaBuf, pos0: usize, n_kv: usize, head_map: HeadMap) -> Result<CudaBuf> {
        // Its output's size follows n_kv: a recording could not replay it.
        ensure!(!self.capturing(), "attn_scores in a recorded pass");
        let t0 = self.prof_start()?;
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
                b.arg(&*q.data).arg(&k[layer]);
                b
            }
            KvCache::F16 { k, .. } => {
                let mut b = self.stream.launch_builder(&self.k.attn_scores_f16);
                b.arg(&*q.data).arg(&k[layer]);
                b
            }
        };
        b.arg(&mut *out.data);
        for v in &a {
            b.arg(v);
        }
        unsafe { b.launch(cfg) }.context("launching attn_scores")?;
        self.prof_end("attn_scores", t0)?;
        Ok(out)
    }

    fn softmax_causal(&self, scores: &CudaBuf, scale: f32, pos0: usize) -> Result<CudaBuf> {
        let t0 = self.prof_start()?;
        ensure!(scores.shape.len() == 3, "softmax_causal expects [n_head, n_tokens, n_kv], got {:?}", scores.shape);
        let (nh, nt, n_kv) = (scores.shape[0], scores.shape[1], scores.shape[2]);
        let mut out = self.alloc(scores.shape.clone())?;
        let (nt_, nkv_, p0) = (i32_of(nt, "n_tokens")?, i32_of(n_kv, "n_kv")?, i32_of(pos0, "pos0")?);
        let mut b = self.stream.launch_builder(&self.k.softmax_causal);
        b.arg(&*scores.data).arg(&mut *out.data).arg(&nt_).arg(&nkv_).arg(&scale).arg(&p0);
        unsafe { b.launch(rows_grid(nh * nt)?) }.context("launching softmax_causal_f32")?;
        self.prof_end("softmax", t0)?;
        Ok(out)
    }

    fn attn_ctx(&self, layer: usize, probs: &CudaBuf, n_kv: usize, head_map: HeadMap) -> Result<CudaBuf> {
        let t0 = self.prof_start()?;
        self.check_layer(layer)?;
        ensure!(probs.shape.len() == 3 && probs.shape[2] == n_kv, "attn_ctx: probs {:?} is not [n_head, n_tokens, {n_kv}]", probs.shape);
        ensure!(n_kv <= self.opts.max_ctx, "attn_ctx: n_kv {n_kv} beyond the cache capacity {}", self.opts.max_ctx);
        let (nh, nt) = (probs.shape[0], probs.shape[1]);
        let hd = self.cfg.head_dim;
        let hm = self.head_map_code(nh, head_map)?;
        let mut out = self.alloc(vec![nt, nh, hd])?;
        let a = [i32_of(nh, "n_head")?, i32_of(nt, "n_tokens")?, i32_of(n_kv, "n_kv")?, i32_of(hd, "head_dim")?, i32_of(self.cfg.n_head_kv, "n_head_kv")?, hm];
        let cfg = rows_grid(nt * nh)?;
        let mut b = match &self.cache {
            KvCache::F32 { v, .. } => {
                let mut b = self.stream.launch_builder(&self.k.attn_ctx_f32);
                b.arg(&*probs.data).arg(&v[layer]);
                b
            }
            KvCache::F16 { v, .. } => {
                let mut b = self.stream.launch_builder(&self.k.attn_ctx_f16);
                b.arg(&*probs.data).arg(&v[layer]);
                b
            }
        };
        b.arg(&mut *out.data);
        for v in &a {
            b.arg(v);
        }
        unsafe { b.launch(cfg) }.context("launching attn_ctx")?;
        self.prof_end("attn_ctx", t0)?;
        Ok(out)
    }

    fn attention(&self, layer: usize, q: &CudaBuf, scale: f32, pos0: usize, n_kv: usize, head_map: HeadMap, round_probs: bool, keep: bool) -> Result<(CudaBuf, Option<(CudaBuf, CudaBuf)>)> {
        if n_kv > FUSED_ATTENTION_MAX_KV {
            return crate::backend::attention_in_three_ops(self, layer, q, scale, pos0, n_kv, head_map, round_probs, keep);
        }
        // A recorded step's row lengths follow each replay's position: its
        // scores would not have the shape they are kept under.
        ensure!(!(keep && self.capturing()), "attention: a recorded decode step keeps no scores");
        let t0 = self.prof_start()?;
        self.check_layer(layer)?;
        ensure!(q.shape.len() == 3 && q.shape[2] == self.cfg.head_dim, "attention: q {:?} is not [n_tokens, n_head, {}]", q.shape, self.cfg.head_dim);
        ensure!(n_kv > 0 && n_kv <= self.opts.max_ctx, "attention: n_kv {n_kv} outside 1..={}", self.opts.max_ctx);
        let (nt, nh, hd) = (q.shape[0], q.shape[1], q.shape[2]);
        let hm = self.head_map_code(nh, head_map)?;
        let mut out = self.alloc(vec![nt, nh, hd])?;
        // Scores and probabilities, [n_head, n_tokens, n_kv], when kept.
        let mut kept = if keep { Some((self.alloc(vec![nh, nt, n_kv])?, self.alloc(vec![nh, nt, n_kv])?)) } else { None };
        let (p0, step_pos) = self.position(pos0)?;
        let (n_kv_arg, _) = self.position(n_kv)?;
        let a = [i32_of(nh, "n_head")?, i32_of(nt, "n_tokens")?, n_kv_arg, i32_of(hd, "head_dim")?, i32_of(self.cfg.n_head_kv, "n_head_kv")?, p0, hm];
        // A recorded kernel serves every later length: room for the longest row.
        let longest = if self.capturing() { self.opts.max_ctx } else { n_kv };
        let elem = match self.cache {
            KvCache::F32 { .. } => 4,
            KvCache::F16 { .. } => 2,
        };
        let key_stride = attention_key_stride(hd, elem);
        let tile_keys = attention_tile_keys(key_stride, elem);
        let (row_bytes, tile_bytes) = (longest.next_multiple_of(4) * 4, tile_keys * key_stride * elem);
        // Query rows a block takes: a prefill's rows of one head read the
        // same keys and values, so with `attention_rows` 4 a block takes 4
        // of them where shared memory holds their scores and the launch
        // still has twice as many blocks as the GPU has SMs (H100, 4 rows
        // for every launch: 29% less time at 512 tokens, 32% at 128, 20%
        // more at 32 tokens, where 4 rows a block leave SMs idle). A single
        // row (decode, recording) takes the one-row kernel, which reads the
        // step's position from device memory.
        let four = 4 * row_bytes + tile_bytes <= ATTENTION_MAX_SHARED && nh * nt.div_ceil(4) >= self.attention_rows_min_blocks;
        let rows = if nt > 1 && !self.capturing() && self.attention_rows == 4 && four { 4 } else { 1 };
        let shared = rows * row_bytes + tile_bytes;
        ensure!(shared <= ATTENTION_MAX_SHARED, "attention: {shared} bytes of shared memory for head_dim {hd} and {longest} keys (limit {ATTENTION_MAX_SHARED})");
        let mut cfg = rows_grid(nh * nt.div_ceil(rows))?;
        cfg.shared_mem_bytes = shared as u32;
        let (max_kv_arg, tile_keys_arg, key_stride_arg) = (i32_of(longest, "max_kv")?, tile_keys as i32, i32_of(key_stride, "key_stride")?);
        let round: i32 = round_probs.into();
        let kernel = match (&self.cache, rows) {
            (KvCache::F32 { .. }, 4) => &self.k.attention_rows4_f32,
            (KvCache::F16 { .. }, 4) => &self.k.attention_rows4_f16,
            (KvCache::F32 { .. }, _) => &self.k.attention_f32,
            (KvCache::F16 { .. }, _) => &self.k.attention_f16,
        };
        let mut b = self.stream.launch_builder(kernel);
        match &self.cache {
            KvCache::F32 { k, v } => b.arg(&*q.data).arg(&k[layer]).arg(&v[layer]),
            KvCache::F16 { k, v } => b.arg(&*q.data).arg(&k[layer]).arg(&v[layer]),
        };
        b.arg(&mut *out.data);
        let null = 0u64;
        match kept.as_mut() {
            Some((scores, probs)) => b.arg(&mut *scores.data).arg(&mut *probs.data),
            None => b.arg(&null).arg(&null),
        };
        for v in &a {
            b.arg(v);
        }
        b.arg(&scale).arg(&round);
        if rows == 1 {
            b.arg(&step_pos);
        }
        b.arg(&max_kv_arg).arg(&tile_keys_arg).arg(&key_stride_arg);
        // SAFETY: q is [nt, nh, hd], the layer's caches hold max_ctx >= n_kv
        // rows of n_head_kv * hd, out is [nt, nh, hd]; the dynamic shared
        // memory holds the scores of the longest row (n_kv <= FUSED_ATTENTION_MAX_KV;
        // recording: max_ctx, which replays never pass, <= FUSED_ATTENTION_MAX_KV)
        // (`rows` of them for the several-row kernels, which take no step position and are
        // never recorded) and tile_keys padded key rows, under the limit set at load
        // (ATTENTION_MAX_SHARED); the grid has a block per head and `rows` query rows; the
        // kept scores and probabilities, when given, are [nh, nt, n_kv] (never while recording).
        unsafe { b.launch(cfg) }.context("launching attention")?;
        self.prof_end(if rows == 1 { "attention (fused)" } else { "attention (fused, rows)" }, t0)?;
        Ok((out, kept))
    }

    /// Runs of projections that are GEMVs on blocks of one type go to one
    /// gemv3 launch each ([`CudaBackend::gemv_group`]); the others to `linear`.
    fn linear3(&self, x: &CudaBuf, projections: [(Weight, Option<Weight>, WeightRead); 3]) -> Result<[CudaBuf; 3]> {
        self.linear3_normed(x, None, projections, false).map(|(out, _)| out)
    }

    /// RMSNorm in each GEMV block when every projection is a GEMV on blocks
    /// and the tokens fit in shared memory; else `rms_norm`, then `linear3`.
    fn norm_linear3(&self, x: &CudaBuf, norm: Weight, eps: f32, projections: [(Weight, Option<Weight>, WeightRead); 3], keep_norm: bool) -> Result<([CudaBuf; 3], Option<CudaBuf>)> {
        self.linear3_normed(x, Some(FusedNorm { weight: norm, eps }), projections, keep_norm)
    }

    /// The same choice as `norm_linear3`, for the gated GEMV.
    fn norm_gated_linear(&self, x: &CudaBuf, norm: Weight, eps: f32, a: Weight, b: Weight, act: Activation, keep: bool, keep_norm: bool) -> Result<(CudaBuf, Option<(CudaBuf, CudaBuf)>, Option<CudaBuf>)> {
        self.gated_linear_normed(x, Some(FusedNorm { weight: norm, eps }), a, b, act, keep, keep_norm)
    }

    fn gated_linear(&self, x: &CudaBuf, a: Weight, b: Weight, act: Activation, keep: bool) -> Result<(CudaBuf, Option<(CudaBuf, CudaBuf)>)> {
        self.gated_linear_normed(x, None, a, b, act, keep, false).map(|(y, products, _)| (y, products))
    }

    fn add(&self, a: &CudaBuf, b: &CudaBuf) -> Result<CudaBuf> {
        let t0 = self.prof_start()?;
        ensure!(a.len() == b.len(), "add: shapes {:?} and {:?} differ in size", a.shape, b.shape);
        let mut out = self.alloc(a.shape.clone())?;
        let n = out.len() as u64;
        let cfg = grid_for(out.len());
        let mut l = self.stream.launch_builder(&self.k.add);
        l.arg(&*a.data).arg(&*b.data).arg(&mut *out.data).arg(&n);
        unsafe { l.launch(cfg) }.context("launching add_f32")?;
        self.prof_end("add", t0)?;
        Ok(out)
    }

    fn swiglu(&self, gate: &CudaBuf, up: &CudaBuf, act: Activation) -> Result<CudaBuf> {
        let t0 = self.prof_start()?;
        ensure!(gate.len() == up.len(), "swiglu: shapes {:?} and {:?} differ in size", gate.shape, up.shape);
        let mut out = self.alloc(gate.shape.clone())?;
        let n = out.len() as u64;
        let cfg = grid_for(out.len());
        let code = activation_code(act);
        let mut l = self.stream.launch_builder(&self.k.swiglu);
        l.arg(&*gate.data).arg(&*up.data).arg(&mut *out.data).arg(&n).arg(&code);
        unsafe { l.launch(cfg) }.context("launching swiglu_f32")?;
        self.prof_end("swiglu", t0)?;
        Ok(out)
    }

    fn round_rows(&self, x: &CudaBuf, ty: GgmlType) -> Result<CudaBuf> {
        let t0 = self.prof_start()?;
        let width = *x.shape.last().ok_or_else(|| anyhow!("round_rows of a scalar"))?;
        let mut out = self.alloc(x.shape.clone())?;
        self.stream.memcpy_dtod(&*x.data, &mut *out.data).context("device-to-device copy")?;
        let n = out.len() as u64;
        let launched = match ty {
            GgmlType::F32 => Ok(()),
            GgmlType::F16 | GgmlType::BF16 => {
                let kind: i32 = if ty == GgmlType::F16 { 0 } else { 1 };
                let mut b = self.stream.launch_builder(&self.k.round_half);
                b.arg(&mut *out.data).arg(&n).arg(&kind);
                // SAFETY: out holds n f32.
                unsafe { b.launch(grid_for(n as usize)) }.map(|_| ())
            }
            GgmlType::Q8_0 | GgmlType::Q8_1 if width.is_multiple_of(32) => {
                let blocks = n / 32;
                let warps = 8u32;
                let cfg = LaunchConfig { grid_dim: (blocks.div_ceil(warps as u64) as u32, 1, 1), block_dim: (warps * 32, 1, 1), shared_mem_bytes: 0 };
                let mut b = self.stream.launch_builder(&self.k.round_q8_0);
                b.arg(&mut *out.data).arg(&blocks);
                // SAFETY: out holds `blocks` whole blocks of 32 f32 (rows are whole blocks).
                unsafe { b.launch(cfg) }.map(|_| ())
            }
            GgmlType::Q8_K if width.is_multiple_of(256) => {
                let blocks = n / 256;
                let grid = u32::try_from(blocks).map_err(|_| anyhow!("{blocks} q8_K blocks: too many for one launch"))?;
                let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                let mut b = self.stream.launch_builder(&self.k.round_q8_k);
                b.arg(&mut *out.data).arg(&blocks);
                // SAFETY: out holds `blocks` whole blocks of 256 f32 (rows are whole blocks).
                unsafe { b.launch(cfg) }.map(|_| ())
            }
            GgmlType::Q8_0 | GgmlType::Q8_1 | GgmlType::Q8_K => Ok(()),
            other => bail!("round_rows: ggml never converts activations to {}", other.name()),
        };
        launched.with_context(|| format!("launching the {} rounding", ty.name()))?;
        self.prof_end("round_rows", t0)?;
        Ok(out)
    }

    fn replay_step(&mut self, key: u64, token: i32, pos0: usize) -> Result<Option<Vec<f32>>> {
        if matches!(&self.recording, graph::Recording::Ready(step) if step.key != key) {
            // Recorded under other settings: record again.
            self.recording = graph::Recording::Idle;
        }
        let graph::Recording::Ready(step) = &self.recording else {
            return Ok(None);
        };
        ensure!(token >= 0 && (token as usize) < self.cfg.n_vocab, "token id {token} out of range (n_vocab {})", self.cfg.n_vocab);
        ensure!(pos0 < self.opts.max_ctx, "position {pos0} beyond the cache capacity {}", self.opts.max_ctx);
        let pos = i32_of(pos0, "position")?;
        self.stream.memcpy_htod(&[token], &mut self.step.token).context("writing the step's token")?;
        self.stream.memcpy_htod(&[pos], &mut self.step.pos).context("writing the step's position")?;
        step.graph.launch().context("launching the recorded decode step")?;
        // SAFETY: `step.logits` is the graph's allocation of n_vocab f32,
        // live from this launch until freed; the slice frees it when dropped
        // below (after the copy, in stream order), as the graph's next launch
        // requires.
        let logits = unsafe { self.stream.upgrade_device_ptr::<f32>(step.logits, self.cfg.n_vocab) };
        let host = self.copy_to_host(&logits);
        drop(logits);
        Ok(Some(host?))
    }

    fn begin_recording(&mut self, key: u64, pos0: usize) -> Result<bool> {
        match self.recording {
            graph::Recording::Idle => {}
            graph::Recording::Ready(_) => self.recording = graph::Recording::Idle,
            graph::Recording::Off(_) => return Ok(false),
            graph::Recording::Capturing { .. } => bail!("a recording started inside another"),
        }
        let mode = cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        if let Err(e) = self.stream.begin_capture(mode) {
            self.recording = graph::Recording::Off(format!("op by op: the stream cannot be recorded ({e})"));
            return Ok(false);
        }
        self.recording = graph::Recording::Capturing { key, pos0 };
        Ok(true)
    }

    fn end_recording(&mut self, logits: CudaBuf) -> Result<()> {
        let graph::Recording::Capturing { key, .. } = self.recording else {
            bail!("end_recording without a recording");
        };
        ensure!(logits.len() == self.cfg.n_vocab, "a recorded pass ended with {} logits, not {}", logits.len(), self.cfg.n_vocab);
        // The graph allocates the logits at each launch; the replay frees them.
        let ptr = logits.leak();
        let flags = cudarc::driver::sys::CUgraphInstantiate_flags(0);
        match self.stream.end_capture(flags) {
            Ok(Some(graph)) => {
                self.recording = graph::Recording::Ready(graph::StepGraph { key, graph, logits: ptr });
                Ok(())
            }
            Ok(None) => {
                self.forget_capture_errors();
                self.recording = graph::Recording::Off("op by op: stream capture recorded no graph".into());
                bail!("recording a decode step gave no graph")
            }
            Err(e) => {
                self.forget_capture_errors();
                self.recording = graph::Recording::Off(format!("op by op: recording failed ({e})"));
                Err(e).context("recording a decode step (stream capture)")
            }
        }
    }

    fn abort_recording(&mut self, why: &str) {
        if self.capturing() {
            // Discard what was captured; the capture's own error, if any, is `why`.
            if let Ok(Some(g)) = self.stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)) {
                drop(g);
            }
        }
        self.forget_capture_errors();
        self.recording = graph::Recording::Off(format!("op by op: recording a decode step failed: {why}"));
    }

    fn recording_status(&self) -> String {
        match &self.recording {
            graph::Recording::Off(why) => why.clone(),
            _ => "recorded: an unobserved decode step is one CUDA graph, replayed".into(),
        }
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
        if let Some(p) = &self.profile {
            match p.report(&self.device_name) {
                Ok(table) => eprint!("{table}"),
                Err(e) => eprintln!("cuda profile: {e:#}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A warp takes 32 values a lane: rows of Qwen2-0.5B's 896 values get
    /// one warp, its 4864-value down projection eight; a matrix of many
    /// rows gets one warp a row whatever its length.
    #[test]
    fn gemv_warps_follow_the_row_length() {
        let w = |rows, cols| gemv_warps_per_row(rows, cols, GEMV_TARGET_WARPS);
        assert_eq!(w(896, 896), 1);
        assert_eq!(w(128, 896), 1);
        assert_eq!(w(896, 4864), 8);
        assert_eq!(w(896, 2048), 2);
        assert_eq!(w(896, 2049), 4);
        assert_eq!(w(151_936, 4864), 1);
        assert_eq!(w(100, 64), 1);
    }

    #[test]
    fn staged_key_rows_are_an_odd_number_of_words() {
        for hd in [32, 63, 64, 80, 96, 128, 256] {
            for elem in [2, 4] {
                let stride = attention_key_stride(hd, elem);
                assert!(stride >= hd && stride < hd + 2 * 4 / elem, "head_dim {hd}, elem {elem}: stride {stride}");
                assert_eq!(stride * elem % 4, 0, "rows must stay 4-byte aligned");
                assert_eq!(stride * elem / 4 % 2, 1, "head_dim {hd}, elem {elem}: an even number of words");
            }
        }
        // Qwen2's head_dim 64: one word of padding, as the kernel was tuned with.
        assert_eq!(attention_key_stride(64, 4), 65);
        assert_eq!(attention_key_stride(64, 2), 66);
    }

    #[test]
    fn a_key_tile_fits_the_shared_memory_it_is_given() {
        for hd in [64, 128] {
            for elem in [2, 4] {
                let stride = attention_key_stride(hd, elem);
                let keys = attention_tile_keys(stride, elem);
                assert!(keys.is_multiple_of(32) && (32..=ROW_BLOCK as usize).contains(&keys));
                assert!(keys * stride * elem <= ATTENTION_TILE_BYTES);
                assert!(FUSED_ATTENTION_MAX_KV * 4 + keys * stride * elem <= ATTENTION_MAX_SHARED);
            }
        }
    }
}
