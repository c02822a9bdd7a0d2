//! `LlamaRef`: a llama.cpp model, tokenization, and a captured greedy run.

use crate::hook::{self, Hook};
use crate::{backend, KvType, LlamaError, RefOptions};
use capture::{argmax, Capture, CaptureConfig, CapturedTensor, Dims, Stage, StageId};
use std::collections::BTreeMap;
use llama_cpp_sys_2 as sys;
use std::ffi::{c_void, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

/// Cache positions added beyond prompt + decode steps.
const CTX_MARGIN: usize = 8;

/// A llama.cpp model loaded in-process (CPU backend).
pub struct LlamaRef {
    model: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
    dims: Dims,
    n_ctx_train: usize,
    path: PathBuf,
}

// SAFETY: the model is immutable after loading and owned by this value alone
// (freed once, in Drop); llama.cpp allows using a model from any thread, one
// context per run. `LlamaRef` is not `Sync`: tokenization goes through the
// vocab's internal caches, so it stays on one thread at a time.
unsafe impl Send for LlamaRef {}

impl Drop for LlamaRef {
    fn drop(&mut self) {
        // SAFETY: `model` came from llama_model_load_from_file and is freed only here.
        unsafe { sys::llama_model_free(self.model.as_ptr()) };
    }
}

fn c_path(path: &Path) -> Result<CString, LlamaError> {
    let s = path.to_str().ok_or_else(|| LlamaError::Input(format!("path is not UTF-8: {}", path.display())))?;
    CString::new(s).map_err(|_| LlamaError::Input(format!("path contains a NUL byte: {}", path.display())))
}

/// RAII for a llama context.
struct Context(NonNull<sys::llama_context>);

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: created by llama_init_from_model, freed only here.
        unsafe { sys::llama_free(self.0.as_ptr()) };
    }
}

/// RAII for a `llama_batch` from `llama_batch_init`.
struct Batch(sys::llama_batch);

impl Batch {
    /// One sequence, positions `pos0..`, logits requested for every token.
    fn new(tokens: &[i32], pos0: usize) -> Batch {
        let n = tokens.len();
        // SAFETY: allocates arrays for n tokens (no embeddings), one seq id each.
        let raw = unsafe { sys::llama_batch_init(n as i32, 0, 1) };
        let mut batch = Batch(raw);
        for (i, &tok) in tokens.iter().enumerate() {
            // SAFETY: llama_batch_init allocated n entries in each array and one
            // seq id slot per token; i < n.
            unsafe {
                *batch.0.token.add(i) = tok;
                *batch.0.pos.add(i) = (pos0 + i) as i32;
                *batch.0.n_seq_id.add(i) = 1;
                *(*batch.0.seq_id.add(i)) = 0;
                *batch.0.logits.add(i) = 1;
            }
        }
        batch.0.n_tokens = n as i32;
        batch
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: the arrays came from llama_batch_init and are freed only here.
        unsafe { sys::llama_batch_free(self.0) };
    }
}

/// Owns the Hook for the lifetime of a run: the context keeps a raw pointer
/// to it, so it is only ever reached through that same pointer.
struct HookBox(*mut Hook);

impl HookBox {
    fn new(hook: Hook) -> HookBox {
        HookBox(Box::into_raw(Box::new(hook)))
    }
    fn get(&mut self) -> &mut Hook {
        // SAFETY: the pointer is from Box::into_raw and stays valid until Drop;
        // `&mut self` ensures no other borrow from this side, and the callback
        // only runs inside llama_decode, never while this borrow lives.
        unsafe { &mut *self.0 }
    }
}

impl Drop for HookBox {
    fn drop(&mut self) {
        // SAFETY: from Box::into_raw, reclaimed exactly once. `RefRun` drops its
        // Context first, so the context (the callback's only other user) is gone.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

impl LlamaRef {
    /// Load a GGUF with llama.cpp (CPU backend, llama.cpp's default model params).
    pub fn load(path: &Path) -> Result<LlamaRef, LlamaError> {
        if !path.is_file() {
            return Err(LlamaError::NotFound(path.to_path_buf()));
        }
        backend::ensure()?;
        let cpath = c_path(path)?;
        // SAFETY: plain constructor of a params struct.
        let mut params = unsafe { sys::llama_model_default_params() };
        // No "extra buffer" repacking of Q4_0/Q4_K/IQ4_NL weights: its
        // activation quantizer rounds q8_K twice for rows in groups of four
        // and once for the rest, so the same row rounds differently by its
        // position in the batch. Without it every matmul quantizes
        // activations with the one `from_float` that `--numerics ggml`
        // reproduces bit for bit. Only ties round differently: the repacked
        // and plain paths agree to q8 rounding.
        params.use_extra_bufts = false;
        // SAFETY: `cpath` is a valid NUL-terminated string for the call's duration.
        let raw = unsafe { sys::llama_model_load_from_file(cpath.as_ptr(), params) };
        let model = NonNull::new(raw).ok_or_else(|| LlamaError::Load {
            path: path.to_path_buf(),
            msg: "llama.cpp could not load this model (run with PARITY_LLAMA_LOG=1 for its log)".into(),
        })?;
        // SAFETY: live model; the vocab pointer lives as long as the model.
        let vocab = unsafe { sys::llama_model_get_vocab(model.as_ptr()) } as *mut sys::llama_vocab;
        let load_err = |msg: String| LlamaError::Load { path: path.to_path_buf(), msg };
        let Some(vocab) = NonNull::new(vocab) else {
            // SAFETY: freeing the model we just loaded, not yet owned by a LlamaRef.
            unsafe { sys::llama_model_free(model.as_ptr()) };
            return Err(load_err("the model has no vocabulary".into()));
        };
        let mut this = LlamaRef {
            model,
            vocab,
            dims: Dims { n_layer: 0, n_embd: 0, n_head: 0, n_head_kv: 0, head_dim: 0, n_ff: 0, n_vocab: 0 },
            n_ctx_train: 0,
            path: path.to_path_buf(),
        };
        let m = model.as_ptr();
        // SAFETY: getters on a live model / vocab.
        let (n_layer, n_embd, n_head, n_head_kv, n_vocab, n_ctx_train) = unsafe {
            (
                sys::llama_model_n_layer(m),
                sys::llama_model_n_embd(m),
                sys::llama_model_n_head(m),
                sys::llama_model_n_head_kv(m),
                sys::llama_vocab_n_tokens(vocab.as_ptr()),
                sys::llama_model_n_ctx_train(m),
            )
        };
        let pos = |v: i32, what: &str| -> Result<usize, LlamaError> {
            usize::try_from(v).ok().filter(|&v| v > 0).ok_or_else(|| load_err(format!("{what} is {v}")))
        };
        let arch = this.meta("general.architecture").ok_or_else(|| load_err("no general.architecture".into()))?;
        let n_ff = this
            .meta(&format!("{arch}.feed_forward_length"))
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| load_err(format!("no {arch}.feed_forward_length")))?;
        let n_head = pos(n_head, "n_head")?;
        let n_embd = pos(n_embd, "n_embd")?;
        let head_dim = match this.meta(&format!("{arch}.attention.key_length")).and_then(|v| v.parse().ok()) {
            Some(d) => d,
            None => n_embd / n_head,
        };
        this.dims = Dims {
            n_layer: pos(n_layer, "n_layer")?,
            n_embd,
            n_head,
            n_head_kv: pos(n_head_kv, "n_head_kv")?,
            head_dim,
            n_ff,
            n_vocab: pos(n_vocab, "n_vocab")?,
        };
        this.n_ctx_train = pos(n_ctx_train, "n_ctx_train")?;
        Ok(this)
    }

    /// A metadata value as a string.
    fn meta(&self, key: &str) -> Option<String> {
        let ckey = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: live model; `buf` has buf.len() writable bytes; key is NUL-terminated.
            let n = unsafe {
                sys::llama_model_meta_val_str(self.model.as_ptr(), ckey.as_ptr(), buf.as_mut_ptr() as *mut _, buf.len())
            };
            let n = usize::try_from(n).ok()?;
            if n < buf.len() {
                return String::from_utf8(buf[..n].to_vec()).ok();
            }
            buf.resize(n + 1, 0);
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn n_layer(&self) -> usize {
        self.dims.n_layer
    }

    pub fn n_ctx_train(&self) -> usize {
        self.n_ctx_train
    }

    pub fn n_vocab(&self) -> usize {
        self.dims.n_vocab
    }

    /// Apply the model's own chat template to one user message, with the assistant prefix.
    fn apply_chat_template(&self, prompt: &str) -> Result<String, LlamaError> {
        // SAFETY: live model; a null name asks for the default template.
        let tmpl = unsafe { sys::llama_model_chat_template(self.model.as_ptr(), std::ptr::null()) };
        if tmpl.is_null() {
            return Err(LlamaError::ChatTemplate("the model has no chat template".into()));
        }
        let role = CString::new("user").map_err(|_| LlamaError::ChatTemplate("role".into()))?;
        let content = CString::new(prompt).map_err(|_| LlamaError::Input("prompt contains a NUL byte".into()))?;
        let msg = sys::llama_chat_message { role: role.as_ptr(), content: content.as_ptr() };
        let mut buf = vec![0u8; 2 * prompt.len() + 256];
        loop {
            let len = i32::try_from(buf.len()).map_err(|_| LlamaError::ChatTemplate("prompt too large".into()))?;
            // SAFETY: `tmpl` is the model's NUL-terminated template; one message whose
            // strings outlive the call; `buf` has `len` writable bytes.
            let n = unsafe { sys::llama_chat_apply_template(tmpl, &msg, 1, true, buf.as_mut_ptr() as *mut _, len) };
            if n < 0 {
                return Err(LlamaError::ChatTemplate("llama.cpp does not support this model's chat template".into()));
            }
            let n = n as usize;
            if n <= buf.len() {
                buf.truncate(n);
                return String::from_utf8(buf).map_err(|_| LlamaError::ChatTemplate("template output is not UTF-8".into()));
            }
            buf.resize(n, 0);
        }
    }

    /// Tokenize `prompt` (special tokens parsed); with `chat`, inside the
    /// model's chat template as one user turn followed by the assistant prefix.
    pub fn tokenize(&self, prompt: &str, chat: bool) -> Result<Vec<i32>, LlamaError> {
        let text = if chat { self.apply_chat_template(prompt)? } else { prompt.to_string() };
        let len = i32::try_from(text.len()).map_err(|_| LlamaError::Tokenize("prompt too large".into()))?;
        let mut tokens = vec![0i32; text.len() + 8];
        loop {
            let cap = i32::try_from(tokens.len()).map_err(|_| LlamaError::Tokenize("prompt too large".into()))?;
            // SAFETY: live vocab; `text` has `len` bytes; `tokens` has `cap` slots.
            let n = unsafe {
                sys::llama_tokenize(self.vocab.as_ptr(), text.as_ptr() as *const _, len, tokens.as_mut_ptr(), cap, true, true)
            };
            if n == i32::MIN {
                return Err(LlamaError::Tokenize("token count overflows".into()));
            }
            if n >= 0 {
                tokens.truncate(n as usize);
                return Ok(tokens);
            }
            tokens.resize((-n) as usize, 0);
        }
    }

    /// The text of one token (special tokens rendered); lossy UTF-8, empty for an invalid id.
    pub fn token_piece(&self, token: i32) -> String {
        if token < 0 || token as usize >= self.dims.n_vocab {
            return String::new();
        }
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: live vocab, valid token id; `buf` has buf.len() writable bytes.
            let n = unsafe {
                sys::llama_token_to_piece(self.vocab.as_ptr(), token, buf.as_mut_ptr() as *mut _, buf.len() as i32, 0, true)
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return String::from_utf8_lossy(&buf).into_owned();
            }
            buf.resize((-n) as usize, 0);
        }
    }

    /// Prefill `tokens` (logits for every token), then `n_decode` greedy
    /// steps, capturing every stage of the catalogue for the layers asked.
    /// The caller fills `prompt`, `chat` and `model_sha256`.
    pub fn run(&self, tokens: &[i32], n_decode: usize, opts: &RefOptions) -> Result<Capture, LlamaError> {
        self.run_observed(tokens, n_decode, opts, &mut |_, _| {})
    }

    /// [`LlamaRef::run`], calling `on_step(done, total)` after each forward
    /// pass (the prefill, then each decode step), so that the caller can
    /// show progress.
    pub fn run_observed(
        &self,
        tokens: &[i32],
        n_decode: usize,
        opts: &RefOptions,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Capture, LlamaError> {
        if tokens.is_empty() {
            return Err(LlamaError::Input("empty prompt: no tokens to prefill".into()));
        }
        let total = tokens.len() + n_decode;
        if total > self.n_ctx_train {
            return Err(LlamaError::ContextTooLong { n_prompt: tokens.len(), n_decode, n_ctx_train: self.n_ctx_train });
        }
        if opts.stop_after_layer.is_some() && n_decode > 0 {
            return Err(LlamaError::Input("decode steps need the logits, which stop_after_layer skips".into()));
        }
        // The whole prompt in one ubatch: the prefill is exactly one forward pass.
        let mut run = self.start(total, total + CTX_MARGIN, opts)?;
        let mut generated = Vec::with_capacity(n_decode + 1);
        for step in 0..=n_decode {
            let input: Vec<i32> = if step == 0 { tokens.to_vec() } else { vec![generated[step - 1]] };
            // No token only when the pass ends after a layer: never with decode steps (checked above).
            generated.extend(run.pass(&input, step)?);
            on_step(step + 1, n_decode + 1);
        }
        let tensors = run.take_tensors();
        let unavailable = std::mem::take(&mut run.unavailable);
        let config = run.config(n_decode);
        Ok(Capture {
            engine: "llama.cpp".into(),
            model_sha256: String::new(),
            prompt: String::new(),
            chat: false,
            tokens: tokens.to_vec(),
            generated,
            config,
            tensors,
            unavailable,
        })
    }

    /// Start one sequence of up to `n_positions` cache positions, run in
    /// forward passes of at most `n_batch` tokens each (a long prompt's
    /// prefill in chunks, then decode steps): see [`RefRun`].
    pub fn start(&self, n_positions: usize, n_batch: usize, opts: &RefOptions) -> Result<RefRun<'_>, LlamaError> {
        let d = self.dims;
        if n_positions > self.n_ctx_train {
            return Err(LlamaError::Input(format!(
                "{n_positions} positions exceed the model's context of {}",
                self.n_ctx_train
            )));
        }
        let layers: Vec<usize> = match &opts.layers {
            None => (0..d.n_layer).collect(),
            Some(ls) => {
                let mut ls = ls.clone();
                ls.sort_unstable();
                ls.dedup();
                if let Some(&l) = ls.iter().find(|&&l| l >= d.n_layer) {
                    return Err(LlamaError::Input(format!(
                        "layer {l} out of range: the model has {} layers (0..{})",
                        d.n_layer,
                        d.n_layer - 1
                    )));
                }
                ls
            }
        };
        let threads = i32::try_from(opts.threads.max(1)).unwrap_or(i32::MAX);
        let n_ctx = (n_positions + CTX_MARGIN).min(self.n_ctx_train.max(n_positions));
        let n_ctx_u32 = u32::try_from(n_ctx).map_err(|_| LlamaError::Input("context too large".into()))?;
        let n_batch = n_batch.clamp(1, n_ctx);
        let n_batch_u32 = u32::try_from(n_batch).map_err(|_| LlamaError::Input("batch too large".into()))?;

        let hook = HookBox::new(Hook::new(d, &layers, &opts.layer_out_only, opts.stop_after_layer));
        // SAFETY: plain constructor of a params struct.
        let mut cparams = unsafe { sys::llama_context_default_params() };
        cparams.n_ctx = n_ctx_u32;
        // One llama_decode is one forward pass: the ubatch holds the whole batch.
        cparams.n_batch = n_batch_u32;
        cparams.n_ubatch = n_batch_u32;
        cparams.n_seq_max = 1;
        cparams.n_threads = threads;
        cparams.n_threads_batch = threads;
        cparams.flash_attn_type =
            if opts.flash_attn { sys::LLAMA_FLASH_ATTN_TYPE_ENABLED } else { sys::LLAMA_FLASH_ATTN_TYPE_DISABLED };
        let kv = match opts.kv_type {
            KvType::F16 => sys::GGML_TYPE_F16,
            KvType::F32 => sys::GGML_TYPE_F32,
        };
        cparams.type_k = kv;
        cparams.type_v = kv;
        cparams.no_perf = true;
        if opts.capture {
            cparams.cb_eval = Some(hook::eval_callback);
            cparams.cb_eval_user_data = hook.0 as *mut c_void;
        }
        // SAFETY: live model; params fully initialised from the defaults; the
        // callback's user data outlives the context (RefRun drops the
        // context before the hook).
        let raw = unsafe { sys::llama_init_from_model(self.model.as_ptr(), cparams) };
        let ctx = Context(NonNull::new(raw).ok_or_else(|| {
            LlamaError::Context(format!("n_ctx {n_ctx}, kv {}, flash_attn {}", opts.kv_type.name(), opts.flash_attn))
        })?);
        Ok(RefRun {
            ctx,
            hook,
            llama: self,
            layers,
            opts: opts.clone(),
            n_past: 0,
            n_batch,
            n_positions,
            threads: threads as usize,
            unavailable: Vec::new(),
        })
    }

    /// Every stage asked for in this step must have been captured (a stage
    /// the table failed to find is an error, never a silent gap); attention
    /// internals under flash attention are recorded as unavailable.
    fn check_step(
        &self,
        hook: &mut Hook,
        step: usize,
        layers: &[usize],
        opts: &RefOptions,
        unavailable: &mut Vec<StageId>,
    ) -> Result<(), LlamaError> {
        let (layer_out_only, stop_after_layer, flash_attn) = (&opts.layer_out_only, opts.stop_after_layer, opts.flash_attn);
        let expected = StageId::in_step(step, layers.iter().copied());
        let asked = |id: &StageId| match id.layer {
            Some(l) => (id.stage == Stage::LayerOut || !layer_out_only.contains(&l)) && stop_after_layer.is_none_or(|last| l <= last),
            None => id.stage == Stage::Embed || stop_after_layer.is_none(),
        };
        for id in expected.into_iter().filter(asked) {
            let internal = id.stage.info().attention_internal;
            let present = hook.tensors.contains_key(&id);
            match (flash_attn && internal, present) {
                (true, false) => unavailable.push(id),
                (true, true) => {
                    return Err(LlamaError::Capture(format!("{id}: captured although flash attention was asked for")))
                }
                (false, true) => {}
                (false, false) => {
                    return Err(LlamaError::Capture(format!(
                        "{id}: no llama.cpp graph node matched this stage (run with PARITY_LLAMA_NODES=1 to list the nodes)"
                    )))
                }
            }
        }
        Ok(())
    }
}

/// One sequence in a llama.cpp context: forward passes over the next
/// positions, each captured (for the layers asked) as a step of a capture.
/// The caller takes each pass's tensors when it wants them
/// ([`RefRun::take_tensors`]): a long prompt's prefill can be captured chunk
/// by chunk, each chunk compared and dropped before the next is computed.
pub struct RefRun<'m> {
    // Field order is drop order: the context (the callback's only other
    // user of the hook) goes first.
    ctx: Context,
    hook: HookBox,
    llama: &'m LlamaRef,
    layers: Vec<usize>,
    opts: RefOptions,
    /// Cache positions filled so far.
    n_past: usize,
    /// Most tokens one pass may hold.
    n_batch: usize,
    n_positions: usize,
    threads: usize,
    /// Checkpoints unobservable in this configuration (attention internals
    /// under flash attention), over the passes so far.
    pub unavailable: Vec<StageId>,
}

impl RefRun<'_> {
    /// Cache positions filled so far.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// Most tokens one pass may hold.
    pub fn n_batch(&self) -> usize {
        self.n_batch
    }

    /// The layers captured.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// One forward pass over `input` at the next cache positions, its stages
    /// captured as step `step` (0 for every chunk of the prefill); logits are
    /// computed for every token. Returns the greedy token of the last row
    /// (`None` when the pass ends after a layer: `stop_after_layer`).
    pub fn pass(&mut self, input: &[i32], step: usize) -> Result<Option<i32>, LlamaError> {
        let d = self.llama.dims;
        if input.is_empty() || input.len() > self.n_batch {
            return Err(LlamaError::Input(format!("a pass of {} tokens (1..={} per pass)", input.len(), self.n_batch)));
        }
        if self.n_past + input.len() > self.n_positions {
            return Err(LlamaError::Input(format!(
                "positions {}..{} beyond the {} this run was started for",
                self.n_past,
                self.n_past + input.len(),
                self.n_positions
            )));
        }
        if let Some(&bad) = input.iter().find(|&&t| t < 0 || t as usize >= d.n_vocab) {
            return Err(LlamaError::Input(format!("token {bad} is outside the vocabulary of {}", d.n_vocab)));
        }
        {
            let h = self.hook.get();
            h.step = step;
            h.n_past = self.n_past;
            h.n_tokens = input.len();
        }
        let batch = Batch::new(input, self.n_past);
        // SAFETY: live context; the batch arrays are valid for n_tokens entries.
        let rc = unsafe { sys::llama_decode(self.ctx.0.as_ptr(), batch.0) };
        drop(batch);
        if let Some(e) = self.hook.get().error.take() {
            return Err(LlamaError::Capture(e));
        }
        if rc != 0 {
            return Err(LlamaError::Decode { step, code: rc });
        }
        self.n_past += input.len();
        if self.opts.capture {
            self.llama.check_step(self.hook.get(), step, &self.layers, &self.opts, &mut self.unavailable)?;
        }
        if self.opts.stop_after_layer.is_some() {
            // The logits were not computed: llama.cpp's buffer holds nothing of this pass.
            return Ok(None);
        }
        // SAFETY: live context after a successful decode that requested
        // logits for every token; index n-1 is the last of them.
        let last = unsafe { sys::llama_get_logits_ith(self.ctx.0.as_ptr(), input.len() as i32 - 1) };
        if last.is_null() {
            return Err(LlamaError::Capture(format!("step {step}: llama.cpp returned no logits")));
        }
        // SAFETY: llama.cpp's logits row holds n_vocab floats, valid until the next decode.
        let row = unsafe { std::slice::from_raw_parts(last, d.n_vocab) };
        Ok(Some(argmax(row) as i32))
    }

    /// The tensors captured since the last call, handed over.
    pub fn take_tensors(&mut self) -> BTreeMap<StageId, CapturedTensor> {
        std::mem::take(&mut self.hook.get().tensors).into_iter().map(|(id, (_, t))| (id, t)).collect()
    }

    /// How this run captures, for a capture of `n_decode` decode steps.
    pub fn config(&self, n_decode: usize) -> CaptureConfig {
        let d = self.llama.dims;
        CaptureConfig {
            kv_type: self.opts.kv_type.name().into(),
            flash_attn: self.opts.flash_attn,
            layers: self.layers.clone(),
            n_decode,
            threads: self.threads,
            ..CaptureConfig::with_dims(d)
        }
    }
}
