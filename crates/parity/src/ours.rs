//! Running our engine (either backend) the way the verbs need it: same
//! tokens as the reference, checkpoints recorded into a [`Capture`].

use anyhow::{Context, Result};
use engine::backend::{Backend, BackendOptions};
use capture::KvType;
use capture::{argmax, Capture, CaptureConfig, CapturedTensor, StageId};
use std::collections::BTreeMap;
use engine::checkpoint::{Checkpoints, Isolate, NoCheckpoints, Recorder, StageFilter};
use engine::cpu::CpuBackend;
pub use engine::cuda::cuda_available;
use engine::cuda::CudaBackend;
use engine::fault::FaultSpec;
use engine::forward::Model;
use engine::numerics::{Numerics, Rounding};
use gguf::{GgufFile, Qwen2Config};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Cpu,
    Cuda,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// `--kv`: the KV cache element type of both engines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kv {
    F16,
    F32,
}

impl From<Kv> for KvType {
    fn from(kv: Kv) -> KvType {
        match kv {
            Kv::F16 => KvType::F16,
            Kv::F32 => KvType::F32,
        }
    }
}

/// `--numerics`: how our engine rounds activations (see `engine::numerics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NumericsArg {
    /// Round like the linked ggml's CPU backend (q8 activations, f16 attention).
    Ggml,
    /// Float activations (the oracle's own arithmetic).
    Exact,
}

impl From<NumericsArg> for Numerics {
    fn from(n: NumericsArg) -> Numerics {
        match n {
            NumericsArg::Ggml => Numerics::Ggml,
            NumericsArg::Exact => Numerics::Exact,
        }
    }
}

/// How our engine is built for a session.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    pub backend: BackendKind,
    pub kv: KvType,
    pub numerics: Numerics,
    pub fault: FaultSpec,
    /// KV cache capacity in positions (clamped to the model's context).
    pub max_ctx: usize,
}

impl EngineOptions {
    /// The correct engine: f16 KV cache, ggml numerics, no fault.
    pub fn new(backend: BackendKind) -> Self {
        EngineOptions { backend, kv: KvType::F16, numerics: Numerics::Ggml, fault: FaultSpec::NONE, max_ctx: usize::MAX }
    }
}

/// What to do at the checkpoints.
pub enum Mode<'a> {
    /// Record our tensors; the engine runs on its own outputs.
    Observe,
    /// Observe, and end each pass after the last selected layer: nothing
    /// past it (final norm, logits) is computed (the free-running side of a
    /// `--layer` comparison).
    ObserveSelected,
    /// Record ours, then continue with the reference's tensor at every
    /// stage: each recorded tensor carries one op's own error.
    Isolate(&'a Capture),
    /// Isolate, and end each pass after the last selected layer (a
    /// comparison of some layers whose reference ended there too).
    IsolateSelected(&'a Capture),
}

/// One forward pass of ours: the tensors recorded, and the greedy token of
/// its last row (`None` when the pass ended before the logits).
pub struct Pass {
    pub tensors: BTreeMap<StageId, CapturedTensor>,
    pub picked: Option<i32>,
}

/// Our engine, loaded once and run for many prompts.
pub struct OurEngine {
    model: Loaded,
    /// The KV cache type the backend was built with (recorded in captures).
    kv_type: KvType,
    /// The parts of the CUDA probe and their seconds, when this load ran it
    /// (dlopen of libcuda, cuBLAS and NVRTC, cuInit); empty when an earlier
    /// load in the process did, and on the CPU backend.
    driver_phases: Vec<(&'static str, f64)>,
}

// One per engine, never in a collection: boxing the larger variant buys nothing.
#[allow(clippy::large_enum_variant)]
enum Loaded {
    Cpu(Model<CpuBackend>),
    Cuda(Model<CudaBackend>),
}

impl OurEngine {
    pub fn load(gguf: &GgufFile, cfg: &Qwen2Config, eo: EngineOptions) -> Result<Self> {
        let (backend, kv_type, fault) = (eo.backend, eo.kv, eo.fault);
        let dequant_bug = fault.fault.at_load().then_some(fault.layer);
        let opts = BackendOptions { kv_type, max_ctx: eo.max_ctx.min(cfg.n_ctx_train.max(1)), dequant_bug };
        let rounding = Rounding::from_gguf(eo.numerics, kv_type, gguf, cfg)?;
        let mut progress = crate::progress::Progress::new(format!("ours-{}", backend.name()), 0, crate::progress::Unit::Items("weights"), crate::progress::Milestones::EveryTenth);
        let mut on_weight = |done: usize, total: usize| progress.set(done as u64, total as u64, "");
        // The probe's parts when this load ran it (the first in the process).
        let mut driver_phases = Vec::new();
        let model = match backend {
            BackendKind::Cpu => {
                let be = CpuBackend::load_observed(gguf, cfg, opts, &mut on_weight).context("loading the model on the CPU backend")?;
                Loaded::Cpu(Model::new(be, cfg.clone(), fault).with_rounding(rounding))
            }
            BackendKind::Cuda => {
                // Probe before cudarc touches the driver: it panics where libcuda is missing.
                let probed_before = !engine::cuda::probe_phases().is_empty();
                cuda_available().map_err(anyhow::Error::msg)?;
                if !probed_before {
                    driver_phases = engine::cuda::probe_phases().to_vec();
                }
                let be = CudaBackend::load_observed(gguf, cfg, opts, &mut on_weight).context("loading the model on the CUDA backend")?;
                crate::progress::note(&format!("ours-cuda: device {}; {}", be.device_name(), be.matmul_arithmetic()));
                Loaded::Cuda(Model::new(be, cfg.clone(), fault).with_rounding(rounding))
            }
        };
        progress.finish("weights loaded");
        Ok(OurEngine { model, kv_type, driver_phases })
    }

    /// Bytes of weights held on the GPU (None on the CPU backend, whose
    /// matrices are views of the mapped file).
    pub fn device_weight_bytes(&self) -> Option<usize> {
        match &self.model {
            Loaded::Cpu(_) => None,
            Loaded::Cuda(model) => Some(model.backend.weight_bytes()),
        }
    }

    /// Seconds each phase of the CUDA load took, in order: the driver
    /// probe's parts, then the backend's phases (None on the CPU backend, which maps
    /// the file and copies nothing).
    pub fn load_phases(&self) -> Option<Vec<(&'static str, f64)>> {
        match &self.model {
            Loaded::Cpu(_) => None,
            Loaded::Cuda(model) => Some(self.driver_phases.iter().chain(model.backend.load_phases()).copied().collect()),
        }
    }

    /// The arithmetic of the engine's matmuls (CUDA: f32 or TF32 tensor cores).
    pub fn matmul_arithmetic(&self) -> &'static str {
        match &self.model {
            Loaded::Cpu(_) => "matmuls in f64 (the CPU oracle)",
            Loaded::Cuda(model) => model.backend.matmul_arithmetic(),
        }
    }

    /// How unobserved decode steps run: recorded (a CUDA graph) or op by op, and why.
    pub fn recording_status(&self) -> String {
        match &self.model {
            Loaded::Cpu(model) => model.backend.recording_status(),
            Loaded::Cuda(model) => model.backend.recording_status(),
        }
    }

    /// The numerics mode the engine rounds in now (its rounding holds it).
    pub fn numerics(&self) -> Numerics {
        match &self.model {
            Loaded::Cpu(model) => model.rounding.numerics,
            Loaded::Cuda(model) => model.rounding.numerics,
        }
    }

    /// Switch the numerics mode of the loaded engine (the weight types it
    /// rounds for were read at load).
    pub fn set_numerics(&mut self, numerics: Numerics) {
        match &mut self.model {
            Loaded::Cpu(model) => model.rounding.numerics = numerics,
            Loaded::Cuda(model) => model.rounding.numerics = numerics,
        }
    }

    /// Seed a fault (or none) into the loaded engine. Faults that act at
    /// load (`Fault::at_load`) need `OurEngine::load` instead: the caller
    /// reloads for those.
    pub fn set_fault(&mut self, fault: FaultSpec) {
        match &mut self.model {
            Loaded::Cpu(model) => model.fault = fault,
            Loaded::Cuda(model) => model.fault = fault,
        }
    }

    /// Start a new sequence for [`OurEngine::pass`]: the KV cache emptied.
    pub fn reset(&mut self) -> Result<()> {
        match &mut self.model {
            Loaded::Cpu(model) => model.reset(),
            Loaded::Cuda(model) => model.reset(),
        }
    }

    /// One forward pass over `tokens` at the next cache positions, recorded
    /// as step `step` (0 for every chunk of a prefill): a long prompt is run
    /// chunk by chunk, each chunk's tensors compared and dropped before the
    /// next. `mode` and `layers` as in [`OurEngine::run`]; under
    /// `Mode::Isolate` the reference holds this pass's tensors.
    pub fn pass(&mut self, tokens: &[i32], step: usize, layers: Option<&[usize]>, mode: Mode) -> Result<Pass> {
        match &mut self.model {
            Loaded::Cpu(model) => drive_pass(model, tokens, step, layers, mode),
            Loaded::Cuda(model) => drive_pass(model, tokens, step, layers, mode),
        }
    }

    /// How a capture of ours over `layers` with `n_decode` steps records
    /// its configuration (the header of a comparison built pass by pass).
    pub fn capture_config(&self, layers: Option<&[usize]>, n_decode: usize, teacher_forced: bool, ended_after_layer: Option<usize>) -> CaptureConfig {
        let cfg = match &self.model {
            Loaded::Cpu(model) => &model.cfg,
            Loaded::Cuda(model) => &model.cfg,
        };
        let mut config = capture_config(cfg, self.kv_type, layers, n_decode, teacher_forced, ended_after_layer);
        config.numerics = self.numerics().name().to_string();
        config
    }

    /// "ours-cpu" or "ours-cuda".
    pub fn name(&self) -> String {
        match &self.model {
            Loaded::Cpu(model) => format!("ours-{}", model.backend.name()),
            Loaded::Cuda(model) => format!("ours-{}", model.backend.name()),
        }
    }

    /// Run over `tokens` (prefill) and `n_decode` decode steps fed with
    /// `forced` (the reference's greedy tokens) when given.
    pub fn run(&mut self, tokens: &[i32], n_decode: usize, forced: Option<&[i32]>, layers: Option<Vec<usize>>, mode: Mode) -> Result<Capture> {
        let (kv_type, numerics) = (self.kv_type, self.numerics());
        match &mut self.model {
            Loaded::Cpu(model) => drive(model, tokens, n_decode, forced, layers, kv_type, mode),
            Loaded::Cuda(model) => drive(model, tokens, n_decode, forced, layers, kv_type, mode),
        }
        .map(|mut c| {
            c.config.numerics = numerics.name().to_string();
            c
        })
    }
}

impl OurEngine {
    /// Prefill `tokens` and decode `n_decode` greedy steps with no
    /// checkpoint at all, as a plain inference engine runs: the tokens
    /// picked (the "none" rows of `parity bench`).
    pub fn generate_unobserved(&mut self, tokens: &[i32], n_decode: usize) -> Result<Vec<i32>> {
        match &mut self.model {
            Loaded::Cpu(model) => model.generate(tokens, n_decode, None, &mut NoCheckpoints),
            Loaded::Cuda(model) => model.generate(tokens, n_decode, None, &mut NoCheckpoints),
        }
    }
}

/// Run `f` with the checkpoints `mode` asks for over `layers`: returns its
/// result, the tensors recorded, and the layer the passes ended after
/// (`Mode::ObserveSelected`).
fn with_checkpoints<R>(
    mode: Mode,
    layers: Option<&[usize]>,
    engine_name: &str,
    f: impl FnOnce(&mut dyn Checkpoints) -> Result<R>,
) -> Result<(R, BTreeMap<StageId, CapturedTensor>, Option<usize>)> {
    let mut recorder = Recorder::new(StageFilter { layers: layers.map(<[usize]>::to_vec) }, engine_name);
    match mode {
        Mode::Observe | Mode::ObserveSelected => {
            if matches!(mode, Mode::ObserveSelected) {
                recorder.end_after = layers.and_then(|ls| ls.iter().max().copied());
            }
            let out = f(&mut recorder)?;
            let end_after = recorder.end_after;
            Ok((out, recorder.tensors, end_after))
        }
        Mode::Isolate(reference) | Mode::IsolateSelected(reference) => {
            if matches!(mode, Mode::IsolateSelected(_)) {
                recorder.end_after = layers.and_then(|ls| ls.iter().max().copied());
            }
            let mut iso = Isolate { reference, recorder };
            let out = f(&mut iso)?;
            let end_after = iso.recorder.end_after;
            Ok((out, iso.recorder.tensors, end_after))
        }
    }
}

/// What a capture of ours records about how it was made.
fn capture_config(cfg: &Qwen2Config, kv_type: KvType, layers: Option<&[usize]>, n_decode: usize, teacher_forced: bool, ended_after_layer: Option<usize>) -> CaptureConfig {
    CaptureConfig {
        kv_type: kv_type.name().to_string(),
        flash_attn: false,
        layers: layers.map_or_else(|| (0..cfg.n_layer).collect(), <[usize]>::to_vec),
        n_decode,
        threads: rayon::current_num_threads(),
        fed: if teacher_forced { "teacher-forced" } else { "" }.to_string(),
        ended_after_layer,
        ..CaptureConfig::with_dims(crate::session::dims_of(cfg))
    }
}

fn drive<B: Backend>(
    model: &mut Model<B>,
    tokens: &[i32],
    n_decode: usize,
    forced: Option<&[i32]>,
    layers: Option<Vec<usize>>,
    kv_type: KvType,
    mode: Mode,
) -> Result<Capture> {
    let engine_name = format!("ours-{}", model.backend.name());
    let started = Instant::now();
    let teacher_forced = matches!(mode, Mode::Isolate(_) | Mode::IsolateSelected(_));
    let (generated, tensors, ended_after_layer) =
        with_checkpoints(mode, layers.as_deref(), &engine_name, |cps| model.generate(tokens, n_decode, forced, cps))?;
    crate::progress::note(&format!(
        "{engine_name}: {} prompt tokens + {n_decode} decode steps in {:.1} s",
        tokens.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(Capture {
        engine: engine_name,
        tokens: tokens.to_vec(),
        generated,
        config: capture_config(&model.cfg, kv_type, layers.as_deref(), n_decode, teacher_forced, ended_after_layer),
        tensors,
        ..Capture::default()
    })
}

/// One forward pass of a sequence run pass by pass (see [`OurEngine::pass`]).
fn drive_pass<B: Backend>(model: &mut Model<B>, tokens: &[i32], step: usize, layers: Option<&[usize]>, mode: Mode) -> Result<Pass> {
    let engine_name = format!("ours-{}", model.backend.name());
    let (logits, tensors, _) = with_checkpoints(mode, layers, &engine_name, |cps| model.forward(tokens, step, cps))?;
    Ok(Pass { tensors, picked: logits.map(|l| argmax(&l) as i32) })
}
