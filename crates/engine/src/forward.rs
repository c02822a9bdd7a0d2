//! The Qwen2 forward pass, written once over [`Backend`], with a checkpoint
//! at every stage of the catalogue.

use crate::arch::ArchSpec;
use crate::backend::{Backend, Weight};
use crate::checkpoint::{Checkpoints, LayerPlan, NoCheckpoints};
use crate::fault::{Activation, Fault, FaultSpec, WeightRead};
use crate::numerics::Rounding;
use capture::{argmax, Stage, StageId};
use anyhow::{bail, ensure, Context, Result};
use gguf::Qwen2Config;

pub struct Model<B: Backend> {
    pub backend: B,
    pub cfg: Qwen2Config,
    /// What varies between architectures of the family: read here, nowhere else.
    pub arch: ArchSpec,
    pub fault: FaultSpec,
    /// How activations are rounded between ops (`exact` until set).
    pub rounding: Rounding,
    /// Positions already in the KV cache.
    n_past: usize,
}

/// How a forward pass ended.
enum PassEnd<Buf> {
    /// Before the logits (`LayerPlan::Stop`).
    Stopped,
    /// The last token's logits, on the host.
    Host(Vec<f32>),
    /// The last token's logits `[1, n_vocab]`, left on the device.
    Device(Buf),
}

/// Host copies started during a pass and visited after it: (checkpoint,
/// the copy when already done).
type Pending = Vec<(StageId, Option<capture::Tensor>)>;

/// Pass `buf` through checkpoint `id`: untouched (and not copied) unless
/// someone asked for it; replaced when the checkpoint returns a tensor. A
/// checkpoint that never replaces only starts the copy (`pending`): the pass
/// goes on without waiting for it.
fn checkpoint<B: Backend>(backend: &B, cps: &mut dyn Checkpoints, pending: &mut Pending, id: StageId, buf: B::Buf) -> Result<B::Buf> {
    if !cps.wants(&id) {
        return Ok(buf);
    }
    if !cps.may_replace(&id) {
        pending.push((id, backend.start_to_host(&buf)?));
        return Ok(buf);
    }
    let host = backend.to_host(&buf)?;
    match cps.visit(&id, host)? {
        None => Ok(buf),
        Some(replacement) => {
            let shape = backend.shape(&buf);
            ensure!(
                replacement.len() == shape.iter().product::<usize>(),
                "checkpoint {id}: replacement of shape {:?} for a tensor of shape {shape:?}",
                replacement.shape
            );
            let shape = shape.to_vec();
            let replaced = backend.from_host(&replacement)?;
            backend.reshape(replaced, &shape)
        }
    }
}

/// Whether a checkpoint may replace stage `id`: the pass then runs the op
/// whose output it replaces. A stage only observed is handed back by the
/// fused op that computes it on the way (`keep`), with the same bits.
fn replaceable(cps: &dyn Checkpoints, id: &StageId) -> bool {
    cps.wants(id) && cps.may_replace(id)
}

impl<B: Backend> Model<B> {
    pub fn new(backend: B, cfg: Qwen2Config, fault: FaultSpec) -> Self {
        let backend_kv = backend.kv_type();
        Model { backend, arch: ArchSpec::qwen2(&cfg), cfg, fault, rounding: Rounding::exact(backend_kv), n_past: 0 }
    }

    pub fn with_rounding(mut self, rounding: Rounding) -> Self {
        self.rounding = rounding;
        self
    }

    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// Start a new sequence.
    pub fn reset(&mut self) -> Result<()> {
        self.n_past = 0;
        self.backend.reset_cache()
    }

    /// One forward pass over `tokens` at positions `n_past..`, as step `step`
    /// (0 = prefill). Returns the last token's logits, or `None` when the
    /// checkpoints ended the pass before them (`LayerPlan::Stop`). Copies
    /// started for checkpoints that never replace are finished and visited
    /// after the pass.
    pub fn forward(&mut self, tokens: &[i32], step: usize, cps: &mut dyn Checkpoints) -> Result<Option<Vec<f32>>> {
        if step > 0 && tokens.len() == 1 && cps.observes_nothing() && self.rounding.stays_on_device() {
            if let Some(logits) = self.recorded_step(tokens[0], step)? {
                return Ok(Some(logits));
            }
        }
        let mut pending = Pending::new();
        let result = self.forward_pass(tokens, step, cps, &mut pending, false);
        // Finished even when the pass failed, so none is left in flight.
        let mut in_flight = self.backend.finish_to_host()?.into_iter();
        let logits = match result? {
            PassEnd::Stopped => None,
            PassEnd::Host(logits) => Some(logits),
            PassEnd::Device(_) => bail!("a pass kept its logits on the device without being asked to"),
        };
        for (id, done) in pending {
            let tensor = match done {
                Some(t) => t,
                None => in_flight.next().with_context(|| format!("checkpoint {id}: its host copy was never finished"))?,
            };
            ensure!(cps.visit(&id, tensor)?.is_none(), "checkpoint {id} replaced a tensor after saying it never does");
        }
        ensure!(in_flight.next().is_none(), "more host copies finished than started");
        Ok(logits)
    }

    /// What a recorded decode step depends on besides the backend: the
    /// fault and the numerics (`Backend::begin_recording`).
    fn recording_key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (format!("{:?}", self.fault), self.rounding.numerics.name(), format!("{:?}", self.rounding.kv_type)).hash(&mut h);
        h.finish()
    }

    /// An unobserved decode step through a recording of its pass (a CUDA
    /// graph): replayed when one is recorded under this model's key, else
    /// recorded first; `None` when the backend does not record, or the
    /// recording failed (the step then runs op by op, and
    /// `Backend::recording_status` says why).
    fn recorded_step(&mut self, token: i32, step: usize) -> Result<Option<Vec<f32>>> {
        let (key, pos0) = (self.recording_key(), self.n_past);
        if let Some(logits) = self.backend.replay_step(key, token, pos0)? {
            self.n_past = pos0 + 1;
            return Ok(Some(logits));
        }
        if !self.backend.begin_recording(key, pos0)? {
            return Ok(None);
        }
        let mut pending = Pending::new();
        let recorded = self.forward_pass(&[token], step, &mut NoCheckpoints, &mut pending, true);
        // Recording ran nothing: the step is still to come.
        self.n_past = pos0;
        match recorded {
            Ok(PassEnd::Device(logits)) => {
                if let Err(e) = self.backend.end_recording(logits) {
                    self.backend.abort_recording(&format!("{e:#}"));
                    return Ok(None);
                }
            }
            Ok(_) => {
                self.backend.abort_recording("the recorded pass did not end with its logits on the device");
                return Ok(None);
            }
            Err(e) => {
                self.backend.abort_recording(&format!("{e:#}"));
                return Ok(None);
            }
        }
        let logits = self.backend.replay_step(key, token, pos0)?.context("a decode step just recorded did not replay")?;
        self.n_past = pos0 + 1;
        Ok(Some(logits))
    }

    /// `logits_on_device`: an unobserved pass ends with its last logits row
    /// on the device (for a recording) instead of on the host.
    fn forward_pass(&mut self, tokens: &[i32], step: usize, cps: &mut dyn Checkpoints, pending: &mut Pending, logits_on_device: bool) -> Result<PassEnd<B::Buf>> {
        if tokens.is_empty() {
            bail!("forward pass over no tokens");
        }
        let cfg = self.cfg.clone();
        let (n, pos0) = (tokens.len(), self.n_past);
        let n_kv = pos0 + n;
        let (hd, eps) = (cfg.head_dim, cfg.rms_eps);
        let spec = self.fault;
        let global = spec.global();
        use WeightRead::{Rows, Transposed};
        let read_if = |bug: bool| if bug { Transposed } else { Rows };

        let mut x = self.backend.embed(tokens, read_if(global == Fault::EmbedTransposed))?;
        x = checkpoint(&self.backend, cps, pending, StageId::global(step, Stage::Embed), x)?;

        // Whether `x` is stale: a skipped layer's output is not computed and
        // must be replaced (by a later given output) before anything reads it.
        let mut stale = false;
        for l in 0..cfg.n_layer {
            match cps.layer_plan(step, l) {
                LayerPlan::Run => ensure!(!stale, "layer {l} of step {step} would run on a skipped layer's output"),
                LayerPlan::Skip => {
                    stale = true;
                    continue;
                }
                LayerPlan::Given(out) => {
                    ensure!(out.len() == n * cfg.n_embd, "layer {l}: given output of shape {:?} for {n} tokens", out.shape);
                    x = self.backend.reshape(self.backend.from_host(&out)?, &[n, cfg.n_embd])?;
                    stale = false;
                    continue;
                }
                LayerPlan::Stop => {
                    self.n_past = n_kv;
                    return Ok(PassEnd::Stopped);
                }
            }
            // The fault, if it acts in this layer: each variant below is the
            // bug written into the op's arguments the way it happens.
            let f = spec.at_layer(l);
            let eps_l = if f == Fault::RmsEps { 1e-5 } else { eps };
            let scale = if f == Fault::NoAttnScale { 1.0 } else { 1.0 / (hd as f32).sqrt() };
            let rope_base = if f == Fault::RopeBase { 10_000.0 } else { cfg.rope_freq_base };
            let rope_pos = match f {
                Fault::RopePosOffset => pos0 + 1,
                Fault::RopeDecodePos if step > 0 => pos0 - 1,
                _ => pos0,
            };
            // Decode steps' K/V one slot late.
            let kv_pos = if f == Fault::KvOffset && step > 0 { pos0 + 1 } else { pos0 };
            // Which keys each query reads (scores) and sees (softmax): 0..=mask_pos0 + t.
            let mask_pos0 = match f {
                Fault::MaskMissing => n_kv,
                Fault::MaskOffByOne => pos0 + 1,
                Fault::KvLenShort if step > 0 => pos0 - 1,
                _ => pos0,
            };
            let with_bias = |b: Weight| (self.arch.qkv_bias && f != Fault::NoQkvBias).then_some(b);
            let pairing = f.rope_pairing(self.arch.rope);
            let id = |stage| StageId::layer(step, l, stage);
            let be = &self.backend;
            let norm_w = if f == Fault::NormWeightSwapped { Weight::FfnNorm(l) } else { Weight::AttnNorm(l) };
            // `m(x, W)`: x as the matmul with W sees it (rounded in ggml numerics).
            let rnd = &self.rounding;
            let projections = [
                (Weight::AttnQ(l), with_bias(Weight::AttnQBias(l)), read_if(f == Fault::QProjTransposed)),
                (Weight::AttnK(l), with_bias(Weight::AttnKBias(l)), Rows),
                (Weight::AttnV(l), with_bias(Weight::AttnVBias(l)), Rows),
            ];
            let [q, k, v] = if !replaceable(cps, &id(Stage::AttnNorm)) && rnd.leaves_matmul_inputs() {
                // The matmuls take the norm's output as it is: one op (CUDA
                // fuses the norm into the GEMVs).
                let (qkv, h) = be.norm_linear3(&x, norm_w, eps_l, projections, cps.wants(&id(Stage::AttnNorm)))?;
                if let Some(h) = h {
                    checkpoint(be, cps, pending, id(Stage::AttnNorm), h)?;
                }
                qkv
            } else {
                let h = be.rms_norm(&x, norm_w, eps_l)?;
                let h = checkpoint(be, cps, pending, id(Stage::AttnNorm), h)?;
                if rnd.same_matmul_input(Weight::AttnQ(l), Weight::AttnK(l)) && rnd.same_matmul_input(Weight::AttnQ(l), Weight::AttnV(l)) {
                    // One input as all three matmuls see it: one op (each output
                    // is the projection's own, so every checkpoint below still sees it).
                    let input = rnd.for_matmul(be, &h, Weight::AttnQ(l))?;
                    be.linear3(input.as_ref().unwrap_or(&h), projections)?
                } else {
                    let [(wq, bq, rq), (wk, bk, rk), (wv, bv, rv)] = projections;
                    [rnd.linear(be, &h, wq, bq, rq)?, rnd.linear(be, &h, wk, bk, rk)?, rnd.linear(be, &h, wv, bv, rv)?]
                }
            };
            let q = checkpoint(be, cps, pending, id(Stage::QProj), be.reshape(q, &[n, cfg.n_head, hd])?)?;
            let k = checkpoint(be, cps, pending, id(Stage::KProj), be.reshape(k, &[n, cfg.n_head_kv, hd])?)?;
            let v = checkpoint(be, cps, pending, id(Stage::VProj), be.reshape(v, &[n, cfg.n_head_kv, hd])?)?;

            let q = if f != Fault::KRoundedTwice && !replaceable(cps, &id(Stage::KRope)) {
                // Rotated K goes to the cache as it is (no checkpoint may
                // replace it, no fault rounds it first): one op, whose
                // rotated K an observing checkpoint still sees.
                let (q, k) = self.backend.rope_qk_kv_store(l, &q, &k, &v, rope_pos, rope_base, pairing, kv_pos)?;
                let q = checkpoint(&self.backend, cps, pending, id(Stage::QRope), q)?;
                checkpoint(&self.backend, cps, pending, id(Stage::KRope), k)?;
                q
            } else {
                let q = be.rope(&q, rope_pos, rope_base, pairing)?;
                let q = checkpoint(be, cps, pending, id(Stage::QRope), q)?;
                let k = be.rope(&k, rope_pos, rope_base, pairing)?;
                let k = checkpoint(be, cps, pending, id(Stage::KRope), k)?;
                let k_twice = if f == Fault::KRoundedTwice { self.rounding.to_kv_type(be, &k)? } else { None };
                self.backend.kv_store(l, k_twice.as_ref().unwrap_or(&k), &v, kv_pos)?;
                q
            };

            let be = &self.backend;
            let rnd = &self.rounding;
            let q_kv = rnd.for_kv_matmul(be, &q)?;
            let q_kv = q_kv.as_ref().unwrap_or(&q);
            // Scores and probabilities are [n_head, n_tokens, n_kv]: kept
            // only when a checkpoint asks for them; separate ops only when it
            // may replace them.
            let ctx = if replaceable(cps, &id(Stage::AttnScores)) || replaceable(cps, &id(Stage::AttnProbs)) {
                let scores = be.attn_scores(l, q_kv, mask_pos0, n_kv, f.head_map())?;
                let scores = checkpoint(be, cps, pending, id(Stage::AttnScores), scores)?;
                let probs = be.softmax_causal(&scores, scale, mask_pos0)?;
                let probs = checkpoint(be, cps, pending, id(Stage::AttnProbs), probs)?;
                let probs_kv = rnd.for_kv_matmul(be, &probs)?;
                be.attn_ctx(l, probs_kv.as_ref().unwrap_or(&probs), n_kv, f.head_map())?
            } else {
                let keep = cps.wants(&id(Stage::AttnScores)) || cps.wants(&id(Stage::AttnProbs));
                let (ctx, kept) = be.attention(l, q_kv, scale, mask_pos0, n_kv, f.head_map(), rnd.kv_matmul_rounds(), keep)?;
                if let Some((scores, probs)) = kept {
                    checkpoint(be, cps, pending, id(Stage::AttnScores), scores)?;
                    checkpoint(be, cps, pending, id(Stage::AttnProbs), probs)?;
                }
                ctx
            };
            let ctx = checkpoint(be, cps, pending, id(Stage::AttnCtx), ctx)?;
            let ctx = be.reshape(ctx, &[n, cfg.n_head * hd])?;
            let o_read = read_if(f == Fault::OProjTransposed);
            let resid = if f != Fault::ResidualDropped && !replaceable(cps, &id(Stage::AttnOut)) {
                // One op with the residual add.
                let (resid, attn) = rnd.linear_residual(be, &ctx, Weight::AttnOutput(l), o_read, &x, cps.wants(&id(Stage::AttnOut)))?;
                if let Some(attn) = attn {
                    checkpoint(be, cps, pending, id(Stage::AttnOut), attn)?;
                }
                resid
            } else {
                let attn = rnd.linear(be, &ctx, Weight::AttnOutput(l), None, o_read)?;
                let attn = checkpoint(be, cps, pending, id(Stage::AttnOut), attn)?;
                if f == Fault::ResidualDropped { attn } else { be.add(&x, &attn)? }
            };
            let resid = checkpoint(be, cps, pending, id(Stage::AttnResidual), resid)?;

            let act_fn = if f == Fault::WrongActivation { Activation::Gelu } else { Activation::Silu };
            let (gate_w, up_w) = (Weight::FfnGate(l), Weight::FfnUp(l));
            let ffn_replaceable = [Stage::FfnGate, Stage::FfnUp, Stage::FfnAct].iter().any(|&st| replaceable(cps, &id(st)));
            let keep_products = cps.wants(&id(Stage::FfnGate)) || cps.wants(&id(Stage::FfnUp));
            let swapped = f == Fault::SwigluSwapped;
            let (a, b) = if swapped { (up_w, gate_w) } else { (gate_w, up_w) };
            // The gated op's products (x Wa^T, x Wb^T) as the gate and up stages.
            let gate_up = |(ya, yb)| if swapped { (yb, ya) } else { (ya, yb) };
            let (act, products) = if !ffn_replaceable && !replaceable(cps, &id(Stage::FfnNorm)) && rnd.leaves_matmul_inputs() {
                // One op from the residual (CUDA fuses the norm into the gated GEMV).
                let (act, products, h) = be.norm_gated_linear(&resid, Weight::FfnNorm(l), eps_l, a, b, act_fn, keep_products, cps.wants(&id(Stage::FfnNorm)))?;
                if let Some(h) = h {
                    checkpoint(be, cps, pending, id(Stage::FfnNorm), h)?;
                }
                (act, products.map(gate_up))
            } else {
                let h = be.rms_norm(&resid, Weight::FfnNorm(l), eps_l)?;
                let h = checkpoint(be, cps, pending, id(Stage::FfnNorm), h)?;
                if !ffn_replaceable && rnd.same_matmul_input(gate_w, up_w) {
                    // One op for gate, up and the activation.
                    let input = rnd.for_matmul(be, &h, gate_w)?;
                    let (act, products) = be.gated_linear(input.as_ref().unwrap_or(&h), a, b, act_fn, keep_products)?;
                    (act, products.map(gate_up))
                } else {
                    let gate = rnd.linear(be, &h, gate_w, None, Rows)?;
                    let gate = checkpoint(be, cps, pending, id(Stage::FfnGate), gate)?;
                    let up = rnd.linear(be, &h, up_w, None, Rows)?;
                    let up = checkpoint(be, cps, pending, id(Stage::FfnUp), up)?;
                    let act = if swapped { be.swiglu(&up, &gate, act_fn)? } else { be.swiglu(&gate, &up, act_fn)? };
                    (act, None)
                }
            };
            // Gate and up as the one op kept them (the separate ops checkpointed theirs).
            if let Some((gate, up)) = products {
                checkpoint(be, cps, pending, id(Stage::FfnGate), gate)?;
                checkpoint(be, cps, pending, id(Stage::FfnUp), up)?;
            }
            let act = checkpoint(be, cps, pending, id(Stage::FfnAct), act)?;
            let down_read = read_if(f == Fault::FfnDownTransposed);
            let skip_from = if f == Fault::ResidualWrongInput { &x } else { &resid };
            let out = if !replaceable(cps, &id(Stage::FfnDown)) {
                let (out, down) = rnd.linear_residual(be, &act, Weight::FfnDown(l), down_read, skip_from, cps.wants(&id(Stage::FfnDown)))?;
                if let Some(down) = down {
                    checkpoint(be, cps, pending, id(Stage::FfnDown), down)?;
                }
                out
            } else {
                let down = rnd.linear(be, &act, Weight::FfnDown(l), None, down_read)?;
                let down = checkpoint(be, cps, pending, id(Stage::FfnDown), down)?;
                be.add(skip_from, &down)?
            };
            x = checkpoint(be, cps, pending, id(Stage::LayerOut), out)?;
        }

        ensure!(!stale, "the final norm of step {step} would read a skipped layer's output");
        let be = &self.backend;
        let h = if global == Fault::FinalNormSkipped { x } else { be.rms_norm(&x, Weight::OutputNorm, eps)? };
        let h = checkpoint(be, cps, pending, StageId::global(step, Stage::FinalNorm), h)?;
        // Greedy decoding reads the last row only: unless the logits are
        // asked for, the LM head runs on that row alone (as llama.cpp's
        // does for a batch that asks for the last token's logits). When
        // they are, the checkpoint takes the buffer itself (the last row of
        // a replacement, if one is made).
        let id = StageId::global(step, Stage::Logits);
        let lm_head_read = read_if(global == Fault::LmHeadTransposed);
        if !cps.wants(&id) {
            let last = if n == 1 { h } else { be.rows(&h, n - 1, 1)? };
            let logits = self.rounding.linear(be, &last, Weight::Output, None, lm_head_read)?;
            self.n_past = n_kv;
            if logits_on_device {
                return Ok(PassEnd::Device(logits));
            }
            return Ok(PassEnd::Host(be.into_host(logits)?.data));
        }
        let logits = self.rounding.linear(be, &h, Weight::Output, None, lm_head_read)?;
        self.n_past = n_kv;
        let host = be.into_host(logits)?;
        let last_row = |t: &capture::Tensor| -> Result<Vec<f32>> {
            ensure!(t.len() == n * cfg.n_vocab, "logits of shape {:?} for {n} tokens", t.shape);
            Ok(t.data[(n - 1) * cfg.n_vocab..].to_vec())
        };
        let last = last_row(&host)?;
        match cps.visit(&id, host)? {
            Some(replacement) => Ok(PassEnd::Host(last_row(&replacement)?)),
            None => Ok(PassEnd::Host(last)),
        }
    }

    /// Prefill `prompt`, then decode `n_decode` steps greedily. Decode step k
    /// is fed `forced[k - 1]` when given (so two engines see the same tokens
    /// even where a near-tie would make their argmax differ), else our own
    /// argmax. Returns our argmax of every step (`n_decode + 1` tokens), or
    /// none when the checkpoints end each pass before the logits (then
    /// `forced` must be given).
    pub fn generate(
        &mut self,
        prompt: &[i32],
        n_decode: usize,
        forced: Option<&[i32]>,
        cps: &mut dyn Checkpoints,
    ) -> Result<Vec<i32>> {
        if let Some(f) = forced {
            ensure!(f.len() >= n_decode, "{} forced tokens for {n_decode} decode steps", f.len());
        }
        self.reset()?;
        let mut picked = Vec::with_capacity(n_decode + 1);
        for step in 0..=n_decode {
            let logits = if step == 0 {
                self.forward(prompt, 0, cps)?
            } else {
                let input = match forced {
                    Some(f) => f[step - 1],
                    None => *picked.last().context("greedy decoding needs the logits the pass ended before")?,
                };
                self.forward(&[input], step, cps)?
            };
            if let Some(logits) = logits {
                picked.push(argmax(&logits) as i32);
            }
        }
        Ok(picked)
    }
}
