//! llama.cpp on the real model: the capture is complete, in the canonical
//! layouts, and obeys the identities the graph implies. Every identity here
//! fails for a wrong node mapping or a wrong layout conversion.

mod common;

use common::{expected_shape, get, worst, PROMPT};
use capture::Capture;
use capture::stage::{Stage, StageId};
use llama_ref::{KvType, LlamaError, LlamaRef, RefOptions};
use std::sync::OnceLock;

const N_DECODE: usize = 2;

fn opts_f32() -> RefOptions {
    RefOptions { kv_type: KvType::F32, ..RefOptions::default() }
}

/// One f32-KV capture of PROMPT + 2 decode steps, shared by the identity tests.
fn capture() -> Option<&'static Capture> {
    static CAPTURE: OnceLock<Option<Capture>> = OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let path = testkit::cached_model()?;
            let llama = LlamaRef::load(&path).expect("load");
            let tokens = llama.tokenize(PROMPT, false).expect("tokenize");
            Some(llama.run(&tokens, N_DECODE, &opts_f32()).expect("run"))
        })
        .as_ref()
}

macro_rules! capture_or_skip {
    () => {
        match capture() {
            Some(c) => c,
            None => {
                // Records the skip (or fails under PARITY_REQUIRE_MODEL=1).
                testkit::real_model();
                return;
            }
        }
    };
}

#[test]
fn every_stage_of_every_step_is_present_in_its_canonical_shape() {
    let c = capture_or_skip!();
    let n_layer = c.config.n_layer;
    assert_eq!(n_layer, 24);
    assert_eq!((c.config.n_embd, c.config.n_head, c.config.n_head_kv, c.config.head_dim), (896, 14, 2, 64));
    assert_eq!((c.config.n_ff, c.config.n_vocab), (4864, 151936));
    assert_eq!(c.engine, "llama.cpp");
    assert_eq!(c.config.kv_type, "f32");
    assert_eq!(c.generated.len(), N_DECODE + 1);
    assert_eq!(c.tensors.len(), (17 * 24 + 3) * (N_DECODE + 1));
    assert!(c.unavailable.is_empty());
    for step in 0..=N_DECODE {
        for id in StageId::all_in_step(step, n_layer) {
            let t = c.tensors.get(&id).unwrap_or_else(|| panic!("missing {id}"));
            assert_eq!(t.tensor.shape, expected_shape(c, step, id.stage), "{id}");
            assert!(t.tensor.data.iter().all(|v| v.is_finite()), "{id} has non-finite values");
            assert!(t.provenance.starts_with("ggml "), "{id}: {}", t.provenance);
        }
    }
    // provenance names the node: Qcur's bias ADD, not its MUL_MAT/RESHAPE/ROPE
    let p = &c.tensors[&StageId::layer(0, 5, Stage::QProj)].provenance;
    assert!(p.starts_with("ggml Qcur-5 ADD"), "{p}");
    let p = &c.tensors[&StageId::layer(0, 5, Stage::QRope)].provenance;
    assert!(p.starts_with("ggml Qcur-5 ROPE"), "{p}");
    let p = &c.tensors[&StageId::layer(1, 7, Stage::AttnOut)].provenance;
    assert!(p.contains("blk.7.attn_output.weight"), "{p}");
}

#[test]
fn residual_adds_are_bit_exact() {
    // ggml's ADD is one f32 addition per element: the same sum bit for bit.
    let c = capture_or_skip!();
    for step in 0..=N_DECODE {
        for l in 0..c.config.n_layer {
            let input = if l == 0 { get(c, step, None, Stage::Embed) } else { get(c, step, Some(l - 1), Stage::LayerOut) };
            let attn_out = get(c, step, Some(l), Stage::AttnOut);
            let res = get(c, step, Some(l), Stage::AttnResidual);
            let sum: Vec<f32> = input.data.iter().zip(&attn_out.data).map(|(a, b)| a + b).collect();
            assert!(sum.iter().zip(&res.data).all(|(a, b)| a.to_bits() == b.to_bits()), "attn_residual step {step} layer {l}");
            let down = get(c, step, Some(l), Stage::FfnDown);
            let out = get(c, step, Some(l), Stage::LayerOut);
            let sum: Vec<f32> = res.data.iter().zip(&down.data).map(|(a, b)| a + b).collect();
            assert!(sum.iter().zip(&out.data).all(|(a, b)| a.to_bits() == b.to_bits()), "layer_out step {step} layer {l}");
        }
    }
}

#[test]
fn ffn_act_is_silu_gate_times_up() {
    // ggml's SIMD silu uses its own expf: allow 1e-5 relative (measured worst is reported on failure).
    let c = capture_or_skip!();
    for step in 0..=N_DECODE {
        for l in 0..c.config.n_layer {
            let g = get(c, step, Some(l), Stage::FfnGate);
            let u = get(c, step, Some(l), Stage::FfnUp);
            let a = get(c, step, Some(l), Stage::FfnAct);
            let ours: Vec<f32> = g
                .data
                .iter()
                .zip(&u.data)
                .map(|(&g, &u)| ((g as f64 / (1.0 + (-g as f64).exp())) * u as f64) as f32)
                .collect();
            let (w, i) = worst(&a.data, &ours, 1e-6, 1e-5);
            assert!(w <= 1.0, "step {step} layer {l}: element {i}: {} vs {}", a.data[i], ours[i]);
        }
    }
}

#[test]
fn rope_is_a_rotation_and_the_identity_at_position_0() {
    let c = capture_or_skip!();
    let hd = c.config.head_dim;
    for step in 0..=N_DECODE {
        for l in 0..c.config.n_layer {
            for (proj, rope) in [(Stage::QProj, Stage::QRope), (Stage::KProj, Stage::KRope)] {
                let p = get(c, step, Some(l), proj);
                let r = get(c, step, Some(l), rope);
                for (i, (a, b)) in p.data.chunks(hd).zip(r.data.chunks(hd)).enumerate() {
                    let na = a.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                    let nb = b.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                    // f32 sin/cos products: ~1e-6 relative per element
                    assert!((na - nb).abs() <= 1e-5 * na + 1e-6, "{rope} step {step} layer {l} row {i}: |{na}| vs |{nb}|");
                }
                if step == 0 {
                    // token 0 sits at position 0, where RoPE rotates by 0 (cos 1, sin 0)
                    let row = p.shape[1] * hd;
                    assert_eq!(&p.data[..row], &r.data[..row], "{rope} layer {l}: position 0 is not the identity");
                }
            }
        }
    }
}

/// Keys (after RoPE) or values of layer `l` at every position up to step `step`, [pos][kv_head][dim].
fn cache_rows(c: &Capture, l: usize, stage: Stage, step: usize) -> Vec<f32> {
    (0..=step).flat_map(|s| get(c, s, Some(l), stage).data.clone()).collect()
}

#[test]
fn attention_scores_probs_and_context_agree_with_q_k_v() {
    // With an f32 KV cache, scores = q_rope · k_rope (GQA: q head h uses kv
    // head h / 7), probs = softmax(scores / 8) over the causal positions,
    // ctx = probs · v. Tolerances cover f32 dot products of 64 terms.
    let c = capture_or_skip!();
    let (nh, nkv, hd) = (c.config.n_head, c.config.n_head_kv, c.config.head_dim);
    let group = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    for step in 0..=N_DECODE {
        let n_past = if step == 0 { 0 } else { c.tokens.len() + step - 1 };
        for l in 0..c.config.n_layer {
            let q = get(c, step, Some(l), Stage::QRope);
            let keys = cache_rows(c, l, Stage::KRope, step);
            let vals = cache_rows(c, l, Stage::VProj, step);
            let scores = get(c, step, Some(l), Stage::AttnScores);
            let probs = get(c, step, Some(l), Stage::AttnProbs);
            let ctx = get(c, step, Some(l), Stage::AttnCtx);
            let (n_t, n_kv) = (scores.shape[1], scores.shape[2]);
            assert_eq!(keys.len(), n_kv * nkv * hd);
            for h in 0..nh {
                let kvh = h / group;
                for t in 0..n_t {
                    let qv = &q.data[(t * nh + h) * hd..][..hd];
                    let srow = &scores.data[(h * n_t + t) * n_kv..][..n_kv];
                    let prow = &probs.data[(h * n_t + t) * n_kv..][..n_kv];
                    let pos = n_past + t;
                    let mut expect = vec![0f64; n_kv];
                    for (kpos, e) in expect.iter_mut().enumerate().take(pos + 1) {
                        let kv = &keys[(kpos * nkv + kvh) * hd..][..hd];
                        *e = qv.iter().zip(kv).map(|(&a, &b)| a as f64 * b as f64).sum();
                    }
                    for kpos in 0..n_kv {
                        let tol = 1e-4 * (1.0 + expect[kpos].abs());
                        assert!(
                            (srow[kpos] as f64 - expect[kpos]).abs() <= tol,
                            "scores step {step} layer {l} head {h} token {t} key {kpos}: {} vs {}",
                            srow[kpos],
                            expect[kpos]
                        );
                    }
                    // probs: zero beyond the causal limit, softmax within, rows sum to 1
                    assert!(prow[pos + 1..].iter().all(|&p| p == 0.0), "probs beyond the causal limit");
                    // softmax of the captured scores (isolates the softmax op from
                    // the dot-product rounding above): ggml's SIMD expf, f32 row
                    let m = srow[..=pos].iter().map(|&v| v as f64).fold(f64::MIN, f64::max);
                    let z: f64 = srow[..=pos].iter().map(|&s| ((s as f64 - m) * scale).exp()).sum();
                    let sum: f64 = prow.iter().map(|&p| p as f64).sum();
                    assert!((sum - 1.0).abs() <= 1e-5, "probs row sums to {sum}");
                    for kpos in 0..=pos {
                        let e = ((srow[kpos] as f64 - m) * scale).exp() / z;
                        assert!((prow[kpos] as f64 - e).abs() <= 2e-6, "probs step {step} layer {l} head {h} token {t} key {kpos}: {} vs {e}", prow[kpos]);
                    }
                    // ctx = probs · V
                    let crow = &ctx.data[(t * nh + h) * hd..][..hd];
                    for d in 0..hd {
                        let e: f64 = (0..=pos).map(|k| prow[k] as f64 * vals[(k * nkv + kvh) * hd + d] as f64).sum();
                        assert!((crow[d] as f64 - e).abs() <= 1e-4 * (1.0 + e.abs()), "ctx step {step} layer {l} head {h} token {t} dim {d}: {} vs {e}", crow[d]);
                    }
                }
            }
        }
    }
}

#[test]
fn greedy_decode_follows_the_captured_logits() {
    let c = capture_or_skip!();
    for step in 0..=N_DECODE {
        let logits = get(c, step, None, Stage::Logits);
        let n_vocab = c.config.n_vocab;
        let last = &logits.data[logits.data.len() - n_vocab..];
        assert_eq!(common::argmax(last) as i32, c.generated[step], "step {step}");
    }
}

#[test]
fn capture_does_not_change_the_computation() {
    let path = real_model_or_skip!();
    let llama = LlamaRef::load(&path).unwrap();
    let tokens = llama.tokenize(PROMPT, false).unwrap();
    let with = llama.run(&tokens, 3, &RefOptions::default()).unwrap();
    let without = llama.run(&tokens, 3, &RefOptions { capture: false, ..RefOptions::default() }).unwrap();
    assert!(without.tensors.is_empty());
    assert_eq!(with.generated, without.generated);
    assert_eq!(with.config.kv_type, "f16");
}

#[test]
fn flash_attention_makes_attention_internals_unavailable() {
    let path = real_model_or_skip!();
    let llama = LlamaRef::load(&path).unwrap();
    let tokens = llama.tokenize(PROMPT, false).unwrap();
    let c = llama.run(&tokens, 1, &RefOptions { flash_attn: true, ..RefOptions::default() }).unwrap();
    assert!(c.config.flash_attn);
    assert_eq!(c.unavailable.len(), 2 * 24 * 2);
    for id in &c.unavailable {
        assert!(id.stage.info().attention_internal);
        assert!(!c.tensors.contains_key(id));
    }
    assert_eq!(c.tensors.len(), (15 * 24 + 3) * 2);
    for step in 0..2 {
        for id in StageId::all_in_step(step, 24) {
            if !id.stage.info().attention_internal {
                assert_eq!(c.get(&id).unwrap().shape, expected_shape(&c, step, id.stage), "{id}");
            }
        }
    }
    let p = &c.tensors[&StageId::layer(0, 3, Stage::AttnCtx)].provenance;
    assert!(p.contains("FLASH_ATTN_EXT"), "{p}");
}

#[test]
fn a_layer_subset_captures_only_those_layers() {
    let path = real_model_or_skip!();
    let llama = LlamaRef::load(&path).unwrap();
    let tokens = llama.tokenize(PROMPT, false).unwrap();
    let c = llama.run(&tokens, 1, &RefOptions { layers: Some(vec![0]), ..RefOptions::default() }).unwrap();
    assert_eq!(c.config.layers, vec![0]);
    assert_eq!(c.tensors.len(), (17 + 3) * 2);
    assert!(c.tensors.keys().all(|id| id.layer.is_none_or(|l| l == 0)));
    let c = llama.run(&tokens, 0, &RefOptions { layers: Some(vec![23, 5]), ..RefOptions::default() }).unwrap();
    assert_eq!(c.config.layers, vec![5, 23]);
    assert_eq!(c.tensors.len(), 17 * 2 + 3);
}

#[test]
fn bad_inputs_are_errors() {
    let path = real_model_or_skip!();
    let llama = LlamaRef::load(&path).unwrap();
    let opts = RefOptions::default();
    let e = llama.run(&[1, 2], 0, &RefOptions { layers: Some(vec![30]), ..RefOptions::default() }).unwrap_err();
    assert_eq!(e.to_string(), "invalid input: layer 30 out of range: the model has 24 layers (0..23)");
    assert!(matches!(llama.run(&[], 1, &opts), Err(LlamaError::Input(_))));
    assert!(matches!(llama.run(&[151936], 1, &opts), Err(LlamaError::Input(_))));
    assert!(matches!(llama.run(&[-1], 1, &opts), Err(LlamaError::Input(_))));
    let n_ctx = llama.n_ctx_train();
    assert_eq!(n_ctx, 32768);
    let long = vec![100; n_ctx - 2];
    let e = llama.run(&long, 3, &opts).unwrap_err();
    assert_eq!(e.to_string(), format!("prompt of {} tokens + 3 decode steps exceeds the model's context of 32768", n_ctx - 2));
    assert!(matches!(LlamaRef::load(std::path::Path::new("/nonexistent.gguf")), Err(LlamaError::NotFound(_))));
}

#[test]
fn tokenizer_and_chat_template() {
    let path = real_model_or_skip!();
    let llama = LlamaRef::load(&path).unwrap();
    assert_eq!(llama.n_layer(), 24);
    let raw = llama.tokenize(PROMPT, false).unwrap();
    let text: String = raw.iter().map(|&t| llama.token_piece(t)).collect();
    assert_eq!(text, PROMPT);
    let chat = llama.tokenize(PROMPT, true).unwrap();
    let text: String = chat.iter().map(|&t| llama.token_piece(t)).collect();
    assert!(text.contains("<|im_start|>user\nWrite a haiku about GPU computing<|im_end|>"), "{text}");
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    // special tokens are parsed into single ids, not spelled out
    let im_start = llama.tokenize("<|im_start|>", false).unwrap();
    assert_eq!(im_start.len(), 1);
    assert!(chat.contains(&im_start[0]));
    assert_eq!(llama.token_piece(-5), "");
}

#[test]
fn feeding_layers_at_layer_out_alone_and_a_pass_that_ends_after_a_layer() {
    let path = real_model_or_skip!();
    let llama = LlamaRef::load(&path).unwrap();
    let tokens = llama.tokenize(PROMPT, false).unwrap();
    let full = llama.run(&tokens, 0, &RefOptions { layers: Some(vec![0, 1, 23]), ..RefOptions::default() }).unwrap();
    // Layer 0 only feeds layer 1: its layer_out alone, the same values.
    let opts = RefOptions { layers: Some(vec![0, 1, 23]), layer_out_only: vec![0], ..RefOptions::default() };
    let c = llama.run(&tokens, 0, &opts).unwrap();
    assert_eq!(c.tensors.len(), 1 + 17 * 2 + 3);
    let out0 = StageId::layer(0, 0, Stage::LayerOut);
    assert_eq!(c.get(&out0).unwrap().data, full.get(&out0).unwrap().data);
    assert!(c.get(&StageId::layer(0, 0, Stage::AttnNorm)).is_none());
    // Ending after layer 1: nothing past it is captured, and what is, is unchanged.
    let opts = RefOptions { layers: Some(vec![0, 1]), stop_after_layer: Some(1), ..RefOptions::default() };
    let c = llama.run(&tokens, 0, &opts).unwrap();
    assert_eq!(c.tensors.len(), 1 + 17 * 2, "{:?}", c.tensors.keys().collect::<Vec<_>>());
    for (id, t) in &c.tensors {
        assert_eq!(t.tensor.data, full.get(id).unwrap().data, "{id}");
    }
    assert!(c.generated.is_empty(), "no logits, no greedy token");
    // Decode steps need the logits.
    assert!(llama.run(&tokens, 1, &opts).is_err());
}

#[test]
fn a_prefill_in_chunks_captures_what_one_pass_does() {
    let path = real_model_or_skip!();
    let llama = LlamaRef::load(&path).unwrap();
    let tokens = llama.tokenize(PROMPT, false).unwrap();
    assert!(tokens.len() >= 4);
    let opts = RefOptions { layers: Some(vec![0, 23]), ..RefOptions::default() };
    let whole = llama.run(&tokens, 0, &opts).unwrap();
    let split = tokens.len() / 2;
    let mut run = llama.start(tokens.len(), split.max(tokens.len() - split), &opts).unwrap();
    let mut last = None;
    for (row0, chunk) in [(0, &tokens[..split]), (split, &tokens[split..])] {
        last = run.pass(chunk, 0).unwrap();
        let part = run.take_tensors();
        assert_eq!(part.len(), 17 * 2 + 3);
        // Token-major stages: the chunk's rows of the one pass, bit for bit.
        for stage in [Stage::AttnNorm, Stage::QRope, Stage::AttnCtx, Stage::LayerOut] {
            for l in [0, 23] {
                let id = StageId::layer(0, l, stage);
                let (a, b) = (&part[&id].tensor, whole.get(&id).unwrap());
                let w = b.data.len() / tokens.len();
                assert_eq!(a.data, b.data[row0 * w..(row0 + chunk.len()) * w], "{id}, rows from {row0}");
            }
        }
    }
    assert_eq!(last, Some(whole.generated[0]));
    assert!(run.pass(&tokens[..1], 1).is_err(), "positions past those the run was started for");
}
