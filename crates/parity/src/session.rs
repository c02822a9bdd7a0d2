//! A comparison session: the model opened once, llama.cpp and our engine
//! loaded once, and both run on the same tokens for as many prompts as asked.

use crate::cache::{RefCache, RefKey};
use crate::diff::{diff_captures, DiffReport};
use crate::ours::{BackendKind, EngineOptions, Mode, OurEngine};
use engine::fault::FaultSpec;
use crate::thresholds::{Comparison, Thresholds};
use anyhow::{bail, Context, Result};
use capture::{Capture, Dims, KvType, Stage, StageId};
use gguf::{GgufFile, Qwen2Config};
use llama_ref::{LlamaRef, RefOptions};
use sha2::{Digest, Sha256};
use crate::progress::{Milestones, Progress, Unit};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A GGUF opened once and checked as a Qwen2 model.
pub struct ModelFile {
    pub path: PathBuf,
    pub gguf: GgufFile,
    pub cfg: Qwen2Config,
}

impl ModelFile {
    pub fn open(path: &Path) -> Result<ModelFile> {
        let gguf = GgufFile::open(path)?;
        let cfg = Qwen2Config::from_gguf(&gguf)?;
        Ok(ModelFile { path: path.to_path_buf(), gguf, cfg })
    }
}

/// The prompt plus the decode steps must fit in the model's training context.
pub fn check_context(n_prompt: usize, n_decode: usize, n_ctx_train: usize) -> Result<()> {
    if n_prompt == 0 {
        bail!("the prompt has no tokens");
    }
    if n_prompt + n_decode > n_ctx_train {
        bail!("prompt of {n_prompt} tokens + {n_decode} decode steps exceeds the model's context of {n_ctx_train}");
    }
    Ok(())
}

/// The capture dimensions of a model's config.
pub fn dims_of(cfg: &Qwen2Config) -> Dims {
    Dims {
        n_layer: cfg.n_layer,
        n_embd: cfg.n_embd,
        n_head: cfg.n_head,
        n_head_kv: cfg.n_head_kv,
        head_dim: cfg.head_dim,
        n_ff: cfg.n_ff,
        n_vocab: cfg.n_vocab,
    }
}

/// Bytes one capture holds: every stage of `layers` (all when `None`) and
/// the global stages `globals` admits, over the prefill of `n_prompt`
/// tokens and `n_decode` single-token steps, at 4 bytes a value.
pub fn capture_bytes(d: &Dims, n_prompt: usize, n_decode: usize, layers: Option<&[usize]>, globals: &dyn Fn(Stage) -> bool) -> u64 {
    (0..=n_decode)
        .map(|step| {
            let (n_t, n_kv) = if step == 0 { (n_prompt, n_prompt) } else { (1, n_prompt + step) };
            pass_bytes(d, n_t, n_kv, layers, globals)
        })
        .sum()
}

/// Bytes a reference capture of `layers` holds when the layers `out_only`
/// (among them) are captured at `layer_out` alone.
pub fn reference_bytes(d: &Dims, n_prompt: usize, n_decode: usize, layers: Option<&[usize]>, out_only: &[usize]) -> u64 {
    let full: Option<Vec<usize>> = layers.map(|ls| ls.iter().copied().filter(|l| !out_only.contains(l)).collect());
    let layer_out: u64 = (0..=n_decode).map(|step| if step == 0 { n_prompt } else { 1 } as u64).sum::<u64>() * d.n_embd as u64 * 4;
    capture_bytes(d, n_prompt, n_decode, full.as_deref(), &|_| true) + out_only.len() as u64 * layer_out
}

/// Bytes one forward pass of `n_t` tokens with `n_kv` cache positions
/// filled after it captures (see [`capture_bytes`]).
pub fn pass_bytes(d: &Dims, n_t: usize, n_kv: usize, layers: Option<&[usize]>, globals: &dyn Fn(Stage) -> bool) -> u64 {
    let n_layers = layers.map_or(d.n_layer, |ls| ls.len()) as u64;
    let mut values = 0u64;
    for stage in Stage::all() {
        let n: u64 = stage.layout().shape(d, n_t, n_kv).iter().map(|&x| x as u64).product();
        if stage.is_global() {
            values += if globals(stage) { n } else { 0 };
        } else {
            values += n * n_layers;
        }
    }
    values * 4
}

/// llama.cpp's own largest buffers for a forward pass of `n_t` tokens over
/// `n_kv` positions: its logits output and result node, and a layer's
/// scores and softmax.
pub fn llama_working_bytes(d: &Dims, n_t: usize, n_kv: usize) -> u64 {
    let (n_t, n_kv) = (n_t as u64, n_kv as u64);
    4 * (2 * n_t * d.n_vocab as u64 + 2 * d.n_head as u64 * n_t * n_kv)
}

/// Memory the kernel says a new allocation can have now (`MemAvailable`).
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuse a comparison whose captures cannot fit in memory, before any of
/// them is allocated, with the figure it would need.
pub fn check_memory(what: &str, needed: u64, n_prompt: usize, n_decode: usize) -> Result<()> {
    let Some(available) = available_memory() else { return Ok(()) };
    if needed > available {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        bail!(
            "{what} of a {n_prompt}-token prompt with {n_decode} decode steps needs about {:.1} GiB, and {:.1} GiB is available: ask for fewer layers (--layer), fewer decode steps or a shorter prompt",
            gib(needed),
            gib(available)
        );
    }
    Ok(())
}

/// sha256 of a file, streamed; progress on stderr.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut progress = Progress::new(format!("sha256 {}", path.display()), total, Unit::Bytes, Milestones::EveryTenth);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = file.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress.set(done, total, "");
    }
    progress.finish("hashed");
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// What the gates are asked for, and what they must have been made for.
#[derive(Clone, Copy, Debug)]
pub struct GateRequest<'a> {
    /// `--threshold X`: one max-abs threshold for every stage of `comparison`.
    pub threshold: Option<f64>,
    /// `--thresholds FILE`: a file (calibrated) for the comparison it records.
    pub file: Option<&'a Path>,
    pub model_sha256: &'a str,
    pub backend: &'a str,
    pub kv_type: &'a str,
    pub numerics: &'a str,
    /// The reference computes in float (llama.cpp on an F32 copy, f32 KV):
    /// its matmuls quantize nothing, so exact numerics get the tight gates.
    pub float_reference: bool,
}

/// The thresholds one comparison gates on: `--threshold X`, else a
/// `--thresholds FILE` recorded for this comparison (checked against the
/// model, backend, KV type and numerics: a file made for another
/// combination is refused, naming the difference), else the built-in
/// defaults for the numerics mode, which need no calibration.
pub fn resolve_thresholds(req: &GateRequest, comparison: Comparison, verdict: Comparison) -> Result<Thresholds> {
    if let Some(x) = req.threshold.filter(|_| comparison == verdict) {
        if !(x.is_finite() && x > 0.0) {
            bail!("--threshold {x}: must be a positive number");
        }
        return Ok(Thresholds::uniform(x));
    }
    if let Some(path) = req.file {
        let t = Thresholds::load(path).context("reading --thresholds")?;
        if t.comparison.unwrap_or(Comparison::FreeRunning) == comparison {
            check_recorded_for(&t, req).with_context(|| format!("--thresholds {}", path.display()))?;
            return Ok(t);
        }
    }
    let numerics = if req.numerics.is_empty() { "exact" } else { req.numerics };
    Ok(Thresholds::defaults(numerics, comparison, req.float_reference))
}

/// A thresholds file applies only to the combination it was made for.
fn check_recorded_for(t: &Thresholds, req: &GateRequest) -> Result<()> {
    let file_numerics = if t.numerics.is_empty() { "exact" } else { &t.numerics };
    let checks = [
        ("model sha256", t.model_sha256.as_str(), req.model_sha256),
        ("backend", t.backend.as_str(), req.backend),
        ("KV type", t.kv_type.as_str(), req.kv_type),
        ("numerics", file_numerics, if req.numerics.is_empty() { "exact" } else { req.numerics }),
    ];
    for (what, recorded, asked) in checks {
        if !recorded.is_empty() && !asked.is_empty() && !recorded.eq_ignore_ascii_case(asked) {
            bail!("recorded for {what} {recorded}, but this comparison has {what} {asked}: calibrate for this combination or drop --thresholds");
        }
    }
    Ok(())
}

/// "ours-cpu" -> "cpu", "ours-cuda" -> "cuda"; other names unchanged.
pub fn backend_of(engine: &str) -> &str {
    engine.strip_prefix("ours-").unwrap_or(engine)
}

/// A reference captured whole, or the prompt's tokens when the comparison
/// runs chunk by chunk instead.
// One per prompt at a time: boxing the larger variant buys nothing.
#[allow(clippy::large_enum_variant)]
enum Reference {
    Whole(Capture),
    Chunked(Vec<i32>),
}

/// The captures of one prompt (teacher-forced, free-running, reference), or
/// its tokens when the comparison runs chunk by chunk (`chunked::judge`).
// One per prompt at a time: boxing the larger variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Captured {
    Whole(Capture, Capture, Capture),
    Chunked(Vec<i32>),
}

/// Everything both engines need for a series of prompts on one model.
pub struct Pair {
    /// llama.cpp, loaded on the first reference the cache cannot answer.
    llama: Option<LlamaRef>,
    /// Where llama.cpp's captures are kept between runs (`None`: `--no-cache`).
    cache: Option<RefCache>,
    pub ours: OurEngine,
    /// What `ours` was loaded from and with: a fault that acts at load
    /// (`Fault::at_load`) is seeded by loading it again.
    model_path: PathBuf,
    engine: EngineOptions,
    pub model_sha256: String,
    pub n_layer: usize,
    pub n_ctx_train: usize,
    dims: Dims,
    pub kv: KvType,
    pub threads: Option<usize>,
    /// `--reference oracle`: our CPU engine in the engine under test's
    /// numerics and KV type is the reference, in place of llama.cpp (which
    /// then only tokenizes).
    oracle: Option<OurEngine>,
    /// A second copy of our engine (same fault), for the free-running side
    /// of a comparison run pass by pass, loaded when first needed.
    free_running: Option<OurEngine>,
    /// Unload llama.cpp once a whole reference is captured (one prompt:
    /// `run`): its mapping of the model then leaves the process before our
    /// engine maps the same pages again, so the peak holds them once.
    pub release_llama_after_reference: bool,
}

impl Pair {
    /// Both engines on `model`, with the reference cache of the environment
    /// (`RefCache::from_env`).
    pub fn load(model: &ModelFile, eo: EngineOptions, threads: Option<usize>) -> Result<Pair> {
        Pair::load_with_cache(model, eo, threads, Some(RefCache::from_env()))
    }

    /// Both engines on `model`; llama.cpp's captures come from `cache` when
    /// it has them (none: every reference is computed, and the model hashed
    /// afresh).
    pub fn load_with_cache(model: &ModelFile, eo: EngineOptions, threads: Option<usize>, cache: Option<RefCache>) -> Result<Pair> {
        let n_layer = model.cfg.n_layer;
        // A fault at a layer the model lacks would never act: every verb refuses it.
        if let Some(l) = eo.fault.layer.filter(|&l| l >= n_layer) {
            bail!("--fault {}: layer {l} out of range: the model has {n_layer} layers (0..={})", eo.fault, n_layer - 1);
        }
        let backend = eo.backend;
        if threads == Some(0) {
            bail!("--threads must be at least 1");
        }
        if backend == BackendKind::Cuda {
            crate::ours::cuda_available().map_err(anyhow::Error::msg)?;
        }
        let cfg = &model.cfg;
        let model_sha256 = crate::cache::model_sha256(&model.path, cache.is_none())?;
        let ours = OurEngine::load(&model.gguf, cfg, eo)?;
        Ok(Pair {
            llama: None,
            cache,
            ours,
            model_path: model.path.clone(),
            engine: eo,
            model_sha256,
            n_layer: cfg.n_layer,
            n_ctx_train: cfg.n_ctx_train,
            dims: dims_of(cfg),
            kv: eo.kv,
            threads,
            oracle: None,
            free_running: None,
            release_llama_after_reference: false,
        })
    }

    /// Make our CPU engine, in the same numerics and KV type and without
    /// the fault, the reference of every later comparison (`--reference
    /// oracle`): the engine under test (CUDA) is then judged against the
    /// oracle it was written from, with llama.cpp's rounding out of the
    /// picture.
    pub fn use_oracle_reference(&mut self, model: &ModelFile) -> Result<()> {
        let eo = EngineOptions {
            kv: self.kv,
            numerics: self.ours.numerics(),
            fault: FaultSpec::NONE,
            max_ctx: self.engine.max_ctx,
            backend: BackendKind::Cpu,
        };
        self.oracle = Some(OurEngine::load(&model.gguf, &model.cfg, eo).context("loading the CPU oracle (--reference oracle)")?);
        Ok(())
    }

    /// The CPU oracle's capture on one prompt: greedy on its own logits.
    fn oracle_reference(&mut self, prompt: &str, chat: bool, n_decode: usize, layers: Option<Vec<usize>>) -> Result<Capture> {
        let n_ctx_train = self.n_ctx_train;
        let tokens = self.llama()?.tokenize(prompt, chat)?;
        check_context(tokens.len(), n_decode, n_ctx_train)?;
        let needed = capture_bytes(&self.dims, tokens.len(), n_decode, layers.as_deref(), &|_| true);
        check_memory("the oracle's capture", needed, tokens.len(), n_decode)?;
        let oracle = self.oracle.as_mut().expect("called with an oracle");
        let mut reference = oracle.run(&tokens, n_decode, None, layers, Mode::Observe)?;
        reference.engine = format!("oracle ({})", reference.engine);
        self.label(&mut reference, prompt, chat);
        Ok(reference)
    }

    /// Seed `fault` (or none) into our engine: in place for faults in the
    /// pass, by loading the weights again for faults at load (and again to
    /// clear one).
    pub fn set_fault(&mut self, fault: FaultSpec) -> Result<()> {
        let was_at_load = self.engine.fault.fault.at_load();
        if fault.fault.at_load() || was_at_load {
            let model = ModelFile::open(&self.model_path)?;
            self.engine.fault = fault;
            self.ours = OurEngine::load(&model.gguf, &model.cfg, self.engine)?;
            self.free_running = None;
        } else {
            self.engine.fault = fault;
        }
        self.ours.set_fault(fault);
        if let Some(second) = &mut self.free_running {
            second.set_fault(fault);
        }
        Ok(())
    }

    /// What this pair's gates must have been made for: its model, backend,
    /// KV type and numerics, with the user's `--threshold`/`--thresholds`.
    pub fn gate_request<'a>(&'a self, threshold: Option<f64>, file: Option<&'a Path>, float_reference: bool) -> GateRequest<'a> {
        GateRequest {
            threshold,
            file,
            model_sha256: &self.model_sha256,
            backend: self.engine.backend.name(),
            kv_type: self.kv.name(),
            numerics: self.ours.numerics().name(),
            float_reference,
        }
    }

    /// The model file again (a second mapping of the same file), for reading
    /// weights beside the engine's own copy.
    pub fn open_model(&self) -> Result<ModelFile> {
        ModelFile::open(&self.model_path)
    }

    /// The fault our engine carries now.
    pub fn fault(&self) -> FaultSpec {
        self.engine.fault
    }

    /// The text of one token (llama.cpp's vocabulary).
    pub fn token_piece(&mut self, token: i32) -> Result<String> {
        Ok(self.llama()?.token_piece(token))
    }

    /// How llama.cpp captures for this pair: its KV type and threads, the
    /// layers asked.
    pub(crate) fn ref_options(&self, layers: Option<Vec<usize>>, layer_out_only: Vec<usize>) -> RefOptions {
        let mut opts = RefOptions { kv_type: self.kv, layers, layer_out_only, ..RefOptions::default() };
        if let Some(t) = self.threads {
            opts.threads = t;
        }
        opts
    }

    /// The model's dimensions.
    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// What a comparison run pass by pass uses at once: llama.cpp, our
    /// engine (teacher-forced) and a second copy of it (free-running: each
    /// needs its own KV cache), loaded now if not yet.
    pub(crate) fn chunk_engines(&mut self) -> Result<(&LlamaRef, &mut OurEngine, &mut OurEngine)> {
        self.llama()?;
        if self.free_running.is_none() {
            let model = ModelFile::open(&self.model_path)?;
            let second = OurEngine::load(&model.gguf, &model.cfg, self.engine).context("loading a second copy of our engine (free-running)")?;
            self.free_running = Some(second);
        }
        let llama = self.llama.as_ref().expect("loaded above");
        let second = self.free_running.as_mut().expect("loaded above");
        second.set_numerics(self.ours.numerics());
        Ok((llama, &mut self.ours, second))
    }

    /// llama.cpp, loaded now if no reference has needed it yet.
    fn llama(&mut self) -> Result<&LlamaRef> {
        if self.llama.is_none() {
            self.llama = Some(LlamaRef::load(&self.model_path)?);
        }
        Ok(self.llama.as_ref().expect("loaded above"))
    }

    /// llama.cpp on one prompt, captured for the layers asked: from the
    /// reference cache when it holds this exact capture, else computed (and
    /// stored).
    pub fn reference(&mut self, prompt: &str, chat: bool, n_decode: usize, layers: Option<Vec<usize>>) -> Result<Capture> {
        match self.reference_unless(prompt, chat, n_decode, layers, Vec::new(), &|_| false)? {
            Reference::Whole(c) => Ok(c),
            Reference::Chunked(tokens) => bail!("a reference of {} tokens was asked whole and refused", tokens.len()),
        }
    }

    /// [`Pair::reference`] with the layers `layer_out_only` (among `layers`)
    /// captured at `layer_out` alone, unless the cache does not hold it and
    /// `chunked(n_prompt)` says the comparison runs chunk by chunk: then
    /// only the prompt's tokens.
    fn reference_unless(
        &mut self,
        prompt: &str,
        chat: bool,
        n_decode: usize,
        layers: Option<Vec<usize>>,
        layer_out_only: Vec<usize>,
        chunked: &dyn Fn(usize) -> bool,
    ) -> Result<Reference> {
        let layers = layers.map(|mut ls| {
            ls.sort_unstable();
            ls.dedup();
            ls
        });
        if self.oracle.is_some() {
            return self.oracle_reference(prompt, chat, n_decode, layers).map(Reference::Whole);
        }
        let opts = self.ref_options(layers, layer_out_only);
        let key = RefKey {
            layer_out_only: opts.layer_out_only.clone(),
            model_sha256: self.model_sha256.clone(),
            prompt: prompt.to_string(),
            chat,
            n_decode,
            layers: opts.layers.clone(),
            kv_type: opts.kv_type.name().to_string(),
            flash_attn: opts.flash_attn,
            threads: opts.threads,
            llama_cpp_build: llama_ref::LLAMA_CPP_BUILD.to_string(),
        };
        if let Some(cached) = self.cache.as_ref().and_then(|c| c.load(&key)) {
            check_context(cached.tokens.len(), n_decode, self.n_ctx_train)?;
            return Ok(Reference::Whole(cached));
        }
        let n_ctx_train = self.n_ctx_train;
        let llama = self.llama()?;
        let tokens = llama.tokenize(prompt, chat)?;
        check_context(tokens.len(), n_decode, n_ctx_train)?;
        if chunked(tokens.len()) {
            return Ok(Reference::Chunked(tokens));
        }
        // The capture (the cache streams it to disk: no second copy), plus
        // llama.cpp's own largest buffers for a prefill in one pass.
        let (d, n) = (&self.dims, tokens.len());
        let needed = reference_bytes(d, n, n_decode, opts.layers.as_deref(), &opts.layer_out_only) + llama_working_bytes(d, n, n);
        check_memory("llama.cpp's capture", needed, tokens.len(), n_decode)?;
        let llama = self.llama()?;
        let mut reference = crate::progress::llama_capture(llama, &tokens, n_decode, &opts)?;
        self.label(&mut reference, prompt, chat);
        if let Some(cache) = &self.cache {
            // A cache that cannot be written costs time, not the verdict.
            if let Err(e) = cache.store(&key, &reference) {
                crate::progress::note(&format!("reference cache: {e:#}"));
            }
        }
        Ok(Reference::Whole(reference))
    }

    /// Our engine on the reference's tokens (decode steps fed the
    /// reference's greedy tokens, so both see the same inputs); each op fed
    /// the reference's input when `teacher_forced`.
    pub fn ours(&mut self, reference: &Capture, layers: Option<Vec<usize>>, teacher_forced: bool) -> Result<Capture> {
        let n_decode = reference.config.n_decode;
        let forced = &reference.generated[..n_decode];
        // Free-running over some layers: nothing after the last of them is run.
        let mode = match (teacher_forced, &layers) {
            (true, _) => Mode::Isolate(reference),
            (false, Some(_)) => Mode::ObserveSelected,
            (false, None) => Mode::Observe,
        };
        let mut ours = self.ours.run(&reference.tokens, n_decode, Some(forced), layers, mode)?;
        self.label(&mut ours, &reference.prompt, reference.chat);
        Ok(ours)
    }

    pub(crate) fn label(&self, c: &mut Capture, prompt: &str, chat: bool) {
        c.prompt = prompt.to_string();
        c.chat = chat;
        c.model_sha256 = self.model_sha256.clone();
    }

    /// One reference capture, our engine run both ways on it:
    /// (teacher-forced, free-running, reference). With a layer subset the
    /// reference also captures the layer before each selected one and the
    /// last layer, so that every teacher-forced stage (a selected layer's
    /// attn_norm, final_norm, logits) is fed the reference's input, not our
    /// free-running one.
    pub fn capture_both(&mut self, prompt: &str, chat: bool, n_decode: usize, layers: Option<Vec<usize>>) -> Result<(Capture, Capture, Capture)> {
        match self.capture_both_unless_chunked(prompt, chat, n_decode, layers, false)? {
            Captured::Whole(tf, fr, reference) => Ok((tf, fr, reference)),
            Captured::Chunked(tokens) => bail!("a comparison of {} tokens was asked whole and refused", tokens.len()),
        }
    }

    /// [`Pair::capture_both`], or, when `may_chunk` and the captures would be
    /// too large to hold whole (`chunked::runs_in_chunks`), only the
    /// prompt's tokens, for `chunked::judge`.
    pub fn capture_both_unless_chunked(&mut self, prompt: &str, chat: bool, n_decode: usize, layers: Option<Vec<usize>>, may_chunk: bool) -> Result<Captured> {
        let (ref_layers, out_only) = reference_layers(layers.as_deref(), self.n_layer);
        let dims = self.dims;
        let sel = layers.clone();
        let chunked = move |n_prompt: usize| may_chunk && crate::chunked::runs_in_chunks(&dims, n_prompt, n_decode, sel.as_deref());
        let reference = match self.reference_unless(prompt, chat, n_decode, ref_layers, out_only, &chunked)? {
            Reference::Whole(c) => c,
            Reference::Chunked(tokens) => return Ok(Captured::Chunked(tokens)),
        };
        if self.release_llama_after_reference {
            // Loaded again if anything later needs it (the diagnosis may).
            self.llama = None;
        }
        // Ours, both ways: every global stage teacher-forced, free-running
        // only the embedding when the pass ends after the layers asked.
        let (n_prompt, sel) = (reference.tokens.len(), layers.as_deref());
        let needed = capture_bytes(&self.dims, n_prompt, n_decode, sel, &|_| true)
            + capture_bytes(&self.dims, n_prompt, n_decode, sel, &|s| sel.is_none() || s == Stage::Embed);
        check_memory("our engine's captures", needed, n_prompt, n_decode)?;
        let teacher_forced = self.ours(&reference, layers.clone(), true)?;
        let free_running = self.ours(&reference, layers, false)?;
        Ok(Captured::Whole(teacher_forced, free_running, reference))
    }

    /// Both engines on one prompt: (ours, llama.cpp).
    pub fn capture(&mut self, prompt: &str, chat: bool, n_decode: usize, layers: Option<Vec<usize>>, teacher_forced: bool) -> Result<(Capture, Capture)> {
        let reference = self.reference(prompt, chat, n_decode, layers.clone())?;
        let ours = self.ours(&reference, layers, teacher_forced)?;
        Ok((ours, reference))
    }
}

/// The layers a teacher-forced comparison of `selected` needs captured:
/// each selected layer, the one before it (its input), and the last (the
/// input of final_norm).
pub fn feeding_layers(selected: &[usize], n_layer: usize) -> Vec<usize> {
    let mut out: Vec<usize> = selected.iter().flat_map(|&l| [l.saturating_sub(1), l]).collect();
    out.push(n_layer.saturating_sub(1));
    out.sort_unstable();
    out.dedup();
    out
}

/// What llama.cpp captures for a teacher-forced comparison of `selected`
/// (all layers when `None`): the layers to capture ([`feeding_layers`]), and
/// those of them that only feed a selected one, captured at `layer_out` alone.
pub fn reference_layers(selected: Option<&[usize]>, n_layer: usize) -> (Option<Vec<usize>>, Vec<usize>) {
    match selected {
        None => (None, Vec::new()),
        Some(sel) => {
            let feeding = feeding_layers(sel, n_layer);
            let out_only = feeding.iter().copied().filter(|l| !sel.contains(l)).collect();
            (Some(feeding), out_only)
        }
    }
}

/// Compare with `layers` selected (global stages kept, except those after
/// the layers when our pass ended there: `ended_after_layer`).
pub fn compare(ours: &Capture, reference: &Capture, thresholds: &Thresholds, layers: Option<&[usize]>) -> DiffReport {
    let ended = ours.config.ended_after_layer.is_some();
    let filter = |id: &StageId| match (layers, id.layer) {
        (Some(sel), Some(l)) => sel.contains(&l),
        (_, None) => !ended || id.stage == Stage::Embed,
        (None, Some(_)) => true,
    };
    diff_captures(ours, reference, thresholds, Some(&filter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teacher_forcing_captures_the_layers_that_feed_the_selection() {
        assert_eq!(feeding_layers(&[0], 24), vec![0, 23]);
        assert_eq!(feeding_layers(&[5], 24), vec![4, 5, 23]);
        assert_eq!(feeding_layers(&[3, 4, 23], 24), vec![2, 3, 4, 22, 23]);
        assert_eq!(reference_layers(Some(&[0]), 24), (Some(vec![0, 23]), vec![23]));
        assert_eq!(reference_layers(Some(&[3, 4, 23]), 24), (Some(vec![2, 3, 4, 22, 23]), vec![2, 22]));
        assert_eq!(reference_layers(None, 24), (None, vec![]));
    }

    #[test]
    fn context_check() {
        assert!(check_context(7, 4, 32768).is_ok());
        assert!(check_context(0, 4, 32768).is_err());
        assert_eq!(
            check_context(10, 32760, 32768).unwrap_err().to_string(),
            "prompt of 10 tokens + 32760 decode steps exceeds the model's context of 32768"
        );
    }

    #[test]
    fn sha256_of_a_known_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
