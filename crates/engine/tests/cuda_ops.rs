//! Op-level tests of every CUDA kernel against the CPU oracle, on seeded
//! random inputs and several shapes (n_tokens 1, 7, 33; head_dim 64 and 16;
//! 14/2 and 4/2 query/KV heads; sizes that are not multiples of any block
//! size), plus a whole forward pass (prefill + decode) of a tiny random
//! model on both backends for every fault variant.
//!
//! Where no GPU (or no CUDA driver) exists, every test prints
//! "SKIPPED: no CUDA device" and passes: CI has no GPU.
//!
//! Tolerances: the CPU oracle accumulates every reduction in f64 and rounds
//! once; the GPU accumulates dot products (cuBLAS sgemm, Q·K, P·V) in f32 and
//! norms/softmax sums in f64. The differences are therefore f32-rounding
//! sized: element-wise ops and reductions done in f64 on both sides agree to
//! a few ulp (bound 4e-7 relative, see `close`), f32 dot products of length k
//! to about sqrt(k)·2^-24 of the sum of |terms| (bound 1e-5 relative to the
//! largest reference value, 1e-5 absolute). Embedding, add and KV-cache
//! stores are exact.

use engine::arch::ArchSpec;
use engine::backend::{Backend, BackendOptions, Weight};
use capture::KvType;
use capture::Tensor;
use engine::checkpoint::{NoCheckpoints, Recorder, SeparateOps, StageFilter};
use engine::cpu::CpuBackend;
use engine::cuda::{cuda_available, CudaBackend};
use engine::fault::{Activation, Fault, FaultSpec, HeadMap, RopePairing, WeightRead};
use engine::forward::Model;
use engine::numerics::{Numerics, Rounding};
use gguf::{GgmlType, Qwen2Config};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// The GPU for one test, or None (the test skips) without a device. The
/// tests take it one at a time: they share the device's primary context, and
/// with four test threads on the H200 the recorded-decode test's first
/// recorded step failed beside the others and passed alone (the cause was not
/// found; a stream capture is the one thing that test does and no other).
fn gpu() -> Option<MutexGuard<'static, ()>> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    match cuda_available() {
        // A test that panicked while holding it leaves nothing to undo.
        Ok(()) => Some(ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())),
        Err(e) => {
            testkit::skip(&format!("no CUDA device ({e})"));
            None
        }
    }
}

/// Two shapes of model: Qwen2.5-0.5B's attention geometry (14/2 heads of 64)
/// with odd FFN and vocabulary sizes, and a small 4/2 x 16 one.
fn configs() -> Vec<Qwen2Config> {
    vec![
        Qwen2Config {
            n_layer: 2,
            n_embd: 896,
            n_head: 14,
            n_head_kv: 2,
            head_dim: 64,
            n_ff: 333,
            n_vocab: 1001,
            rope_freq_base: 1_000_000.0,
            rms_eps: 1e-6,
            n_ctx_train: 4096,
            tied_output: false,
        },
        Qwen2Config {
            n_layer: 2,
            n_embd: 72,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 16,
            n_ff: 97,
            n_vocab: 131,
            rope_freq_base: 10_000.0,
            rms_eps: 1e-5,
            n_ctx_train: 256,
            tied_output: true,
        },
    ]
}

const N_TOKENS: [usize; 3] = [1, 7, 33];
const MAX_CTX: usize = 64;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect()
}

fn rand_tensor(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::new(shape.to_vec(), rand_vec(rng, n, scale))
}

/// Random weights in GGUF layout: matrices `[out, in]` scaled by 1/sqrt(in)
/// so activations stay O(1); norm weights around 1.
fn weights(cfg: &Qwen2Config, seed: u64) -> HashMap<Weight, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut m = HashMap::new();
    for w in Weight::all(&ArchSpec::qwen2(cfg), cfg.n_layer) {
        let shape = w.shape(cfg);
        let t = match w {
            Weight::AttnNorm(_) | Weight::FfnNorm(_) | Weight::OutputNorm => {
                Tensor::new(shape.clone(), (0..shape[0]).map(|_| 1.0 + rng.gen_range(-0.5f32..0.5)).collect())
            }
            _ if shape.len() == 2 => {
                let s = 1.0 / (shape[1] as f32).sqrt();
                rand_tensor(&mut rng, &shape, s * 1.7)
            }
            _ => rand_tensor(&mut rng, &shape, 0.5),
        };
        m.insert(w, t);
    }
    if cfg.tied_output {
        m.insert(Weight::Output, m[&Weight::TokenEmbd].clone());
    }
    m
}

fn backends(cfg: &Qwen2Config, kv: KvType, seed: u64) -> (CpuBackend, CudaBackend) {
    let opts = BackendOptions { kv_type: kv, max_ctx: MAX_CTX, dequant_bug: None };
    let w = weights(cfg, seed);
    let cpu = CpuBackend::from_weights(cfg.clone(), w.clone(), opts).expect("cpu backend");
    let mut wg = w;
    if cfg.tied_output {
        // Exercise the tied path: the CUDA backend resolves Output to token_embd.
        wg.remove(&Weight::Output);
    }
    let gpu = CudaBackend::from_weights(cfg.clone(), wg, opts).expect("cuda backend");
    (cpu, gpu)
}

/// Max |a - b| must stay within `rel` x max|a| + `abs`; shapes must agree.
#[track_caller]
fn close(what: &str, cpu: &Tensor, gpu: &Tensor, rel: f32, abs: f32) -> f32 {
    assert_eq!(cpu.shape, gpu.shape, "{what}: shapes differ");
    let scale = cpu.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut worst = (0f32, 0usize);
    for (i, (a, b)) in cpu.data.iter().zip(&gpu.data).enumerate() {
        assert!(b.is_finite() || !a.is_finite(), "{what}: gpu[{i}] = {b}, cpu = {a}");
        let d = (a - b).abs();
        if d > worst.0 {
            worst = (d, i);
        }
    }
    let bound = rel * scale + abs;
    assert!(
        worst.0 <= bound,
        "{what}: max |cpu - gpu| = {:e} at {} (cpu {}, gpu {}) > bound {bound:e} (max |cpu| {scale})",
        worst.0,
        worst.1,
        cpu.data[worst.1],
        gpu.data[worst.1]
    );
    worst.0
}

fn on_gpu(g: &CudaBackend, t: &Tensor) -> <CudaBackend as Backend>::Buf {
    g.from_host(t).expect("upload")
}

fn host(g: &CudaBackend, b: &<CudaBackend as Backend>::Buf) -> Tensor {
    g.to_host(b).expect("download")
}

#[test]
fn embed_matches_exactly() {
    let Some(_gpu) = gpu() else {
        return;
    };
    for (ci, cfg) in configs().iter().enumerate() {
        let (cpu, g) = backends(cfg, KvType::F16, 1 + ci as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for n in N_TOKENS {
            let mut tokens: Vec<i32> = (0..n).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
            tokens[0] = cfg.n_vocab as i32 - 1;
            for read in [WeightRead::Rows, WeightRead::Transposed] {
                let a = cpu.embed(&tokens, read).unwrap();
                let b = host(&g, &g.embed(&tokens, read).unwrap());
                close(&format!("embed {read:?} cfg{ci} n{n}"), &a, &b, 0.0, 0.0);
            }
        }
        assert!(g.embed(&[cfg.n_vocab as i32], WeightRead::Rows).is_err(), "out-of-range token id accepted");
        assert!(g.embed(&[-1], WeightRead::Rows).is_err(), "negative token id accepted");
    }
}

#[test]
fn rms_norm_matches() {
    let Some(_gpu) = gpu() else {
        return;
    };
    for (ci, cfg) in configs().iter().enumerate() {
        let (cpu, g) = backends(cfg, KvType::F16, 2 + ci as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        for n in N_TOKENS {
            let x = rand_tensor(&mut rng, &[n, cfg.n_embd], 3.0);
            for w in [Weight::AttnNorm(0), Weight::FfnNorm(1), Weight::OutputNorm] {
                let a = cpu.rms_norm(&x, w, cfg.rms_eps).unwrap();
                let b = host(&g, &g.rms_norm(&on_gpu(&g, &x), w, cfg.rms_eps).unwrap());
                close(&format!("rms_norm {w:?} cfg{ci} n{n}"), &a, &b, 4e-7, 0.0);
            }
        }
    }
}

#[test]
fn linear_matches_with_and_without_bias() {
    let Some(_gpu) = gpu() else {
        return;
    };
    for (ci, cfg) in configs().iter().enumerate() {
        let (cpu, g) = backends(cfg, KvType::F16, 3 + ci as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        for n in N_TOKENS {
            let x = rand_tensor(&mut rng, &[n, cfg.n_embd], 1.0);
            let xf = rand_tensor(&mut rng, &[n, cfg.n_ff], 1.0);
            let xq = rand_tensor(&mut rng, &[n, cfg.n_head * cfg.head_dim], 1.0);
            let cases: Vec<(&Tensor, Weight, Option<Weight>)> = vec![
                (&x, Weight::AttnQ(0), Some(Weight::AttnQBias(0))),
                (&x, Weight::AttnK(1), Some(Weight::AttnKBias(1))),
                (&x, Weight::AttnV(0), Some(Weight::AttnVBias(0))),
                (&x, Weight::AttnQ(1), None),
                (&xq, Weight::AttnOutput(0), None),
                (&x, Weight::FfnGate(0), None),
                (&x, Weight::FfnUp(1), None),
                (&xf, Weight::FfnDown(0), None),
                (&x, Weight::Output, None),
            ];
            for (input, w, b) in cases {
                // The transposed read (the GEMM flag / leading-dimension fault) too.
                for read in [WeightRead::Rows, WeightRead::Transposed] {
                    let a = cpu.linear(input, w, b, read).unwrap();
                    let r = host(&g, &g.linear(&on_gpu(&g, input), w, b, read).unwrap());
                    close(&format!("linear {w:?} bias {b:?} {read:?} cfg{ci} n{n}"), &a, &r, 1e-5, 1e-5);
                }
            }
        }
    }
}

#[test]
fn rope_matches_both_pairings() {
    let Some(_gpu) = gpu() else {
        return;
    };
    for (ci, cfg) in configs().iter().enumerate() {
        let (cpu, g) = backends(cfg, KvType::F16, 4 + ci as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        for n in N_TOKENS {
            for heads in [cfg.n_head, cfg.n_head_kv] {
                let x = rand_tensor(&mut rng, &[n, heads, cfg.head_dim], 2.0);
                for pos0 in [0usize, 5, 1000] {
                    for pairing in [RopePairing::Neox, RopePairing::Adjacent] {
                        let a = cpu.rope(&x, pos0, cfg.rope_freq_base, pairing).unwrap();
                        let b = host(&g, &g.rope(&on_gpu(&g, &x), pos0, cfg.rope_freq_base, pairing).unwrap());
                        close(&format!("rope {pairing:?} cfg{ci} n{n} heads{heads} pos0 {pos0}"), &a, &b, 4e-7, 1e-7);
                    }
                }
            }
        }
    }
}

#[test]
fn add_and_swiglu_match() {
    let Some(_gpu) = gpu() else {
        return;
    };
    for (ci, cfg) in configs().iter().enumerate() {
        let (cpu, g) = backends(cfg, KvType::F16, 5 + ci as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(15);
        for n in N_TOKENS {
            let a = rand_tensor(&mut rng, &[n, cfg.n_embd], 4.0);
            let b = rand_tensor(&mut rng, &[n, cfg.n_embd], 4.0);
            let s_cpu = cpu.add(&a, &b).unwrap();
            let s_gpu = host(&g, &g.add(&on_gpu(&g, &a), &on_gpu(&g, &b)).unwrap());
            close(&format!("add cfg{ci} n{n}"), &s_cpu, &s_gpu, 0.0, 0.0);

            let gate = rand_tensor(&mut rng, &[n, cfg.n_ff], 8.0);
            let up = rand_tensor(&mut rng, &[n, cfg.n_ff], 3.0);
            for act in [Activation::Silu, Activation::Gelu] {
                let w_cpu = cpu.swiglu(&gate, &up, act).unwrap();
                let w_gpu = host(&g, &g.swiglu(&on_gpu(&g, &gate), &on_gpu(&g, &up), act).unwrap());
                close(&format!("swiglu {act:?} cfg{ci} n{n}"), &w_cpu, &w_gpu, 4e-7, 1e-7);
            }
        }
    }
}

#[test]
fn softmax_causal_matches() {
    let Some(_gpu) = gpu() else {
        return;
    };
    for (ci, cfg) in configs().iter().enumerate() {
        let (cpu, g) = backends(cfg, KvType::F16, 6 + ci as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(16);
        for n in N_TOKENS {
            for pos0 in [0usize, 3, 30] {
                let n_kv = pos0 + n;
                let mut s = rand_tensor(&mut rng, &[cfg.n_head, n, n_kv], 20.0);
                // Zero beyond the causal limit, as attn_scores leaves it.
                for h in 0..cfg.n_head {
                    for t in 0..n {
                        for j in pos0 + t + 1..n_kv {
                            s.data[(h * n + t) * n_kv + j] = 0.0;
                        }
                    }
                }
                let scale = 1.0 / (cfg.head_dim as f32).sqrt();
                let a = cpu.softmax_causal(&s, scale, pos0).unwrap();
                let b = host(&g, &g.softmax_causal(&on_gpu(&g, &s), scale, pos0).unwrap());
                close(&format!("softmax cfg{ci} n{n} pos0 {pos0}"), &a, &b, 0.0, 1e-6);
            }
        }
    }
}

/// kv_store, attn_scores, softmax and attn_ctx together, prefill then a
/// decode step, for both cache types and both head maps: the GPU's cache
/// must hold what the CPU's holds (f16 rounding included). The fused
/// attention, with one or 4 query rows a block, gives the three GPU ops'
/// bits, and so do the scores and probabilities it keeps.
#[test]
fn attention_matches_prefill_and_decode() {
    let Some(_gpu) = gpu() else {
        return;
    };
    for (ci, cfg) in configs().iter().enumerate() {
        for kv in [KvType::F16, KvType::F32] {
            for n in N_TOKENS {
                let (mut cpu, mut g) = backends(cfg, kv, 7 + ci as u64);
                let mut rng = ChaCha8Rng::seed_from_u64(17 + n as u64);
                let (hd, nh, nkv) = (cfg.head_dim, cfg.n_head, cfg.n_head_kv);
                let scale = 1.0 / (hd as f32).sqrt();
                // (pos0, n_tokens): the prefill, then two single-token decode steps.
                let mut pos0 = 0;
                for (step, nt) in [n, 1, 1].into_iter().enumerate() {
                    let q = rand_tensor(&mut rng, &[nt, nh, hd], 2.0);
                    let k = rand_tensor(&mut rng, &[nt, nkv, hd], 2.0);
                    let v = rand_tensor(&mut rng, &[nt, nkv, hd], 2.0);
                    for layer in 0..cfg.n_layer {
                        cpu.kv_store(layer, &k, &v, pos0).unwrap();
                        g.kv_store(layer, &on_gpu(&g, &k), &on_gpu(&g, &v), pos0).unwrap();
                    }
                    let n_kv = pos0 + nt;
                    for map in [HeadMap::Grouped, HeadMap::Modulo, HeadMap::Ratio] {
                        let layer = step % cfg.n_layer;
                        let what = format!("cfg{ci} {kv:?} n{n} step{step} {map:?}");
                        let sc = cpu.attn_scores(layer, &q, pos0, n_kv, map).unwrap();
                        let sg = host(&g, &g.attn_scores(layer, &on_gpu(&g, &q), pos0, n_kv, map).unwrap());
                        close(&format!("attn_scores {what}"), &sc, &sg, 1e-5, 1e-5);
                        let pc = cpu.softmax_causal(&sc, scale, pos0).unwrap();
                        let pg = host(&g, &g.softmax_causal(&on_gpu(&g, &sc), scale, pos0).unwrap());
                        close(&format!("attn_probs {what}"), &pc, &pg, 0.0, 1e-6);
                        // Same probabilities into both, to test P·V alone.
                        let cc = cpu.attn_ctx(layer, &pc, n_kv, map).unwrap();
                        let cg = host(&g, &g.attn_ctx(layer, &on_gpu(&g, &pc), n_kv, map).unwrap());
                        close(&format!("attn_ctx {what}"), &cc, &cg, 1e-5, 1e-5);
                        // The fused kernel: the three GPU ops' bits (with and
                        // without the f16 rounding of the probabilities), and
                        // their scores and probabilities when it keeps them.
                        let qg = on_gpu(&g, &q);
                        for round in [false, true] {
                            let s3 = g.attn_scores(layer, &qg, pos0, n_kv, map).unwrap();
                            let p3 = g.softmax_causal(&s3, scale, pos0).unwrap();
                            let rounded = round.then(|| g.round_rows(&p3, GgmlType::F16).unwrap());
                            let three = host(&g, &g.attn_ctx(layer, rounded.as_ref().unwrap_or(&p3), n_kv, map).unwrap());
                            // One query row a block, or 4 (a prefill's rows of a head;
                            // any launch size here).
                            for (keep, rows) in [(false, 1), (true, 1), (false, 4), (true, 4)] {
                                g.set_attention_rows(rows, 0).unwrap();
                                let (fused, kept) = g.attention(layer, &qg, scale, pos0, n_kv, map, round, keep).unwrap();
                                let fused = host(&g, &fused);
                                let what = format!("fused attention {what} round_probs {round} keep {keep} rows {rows}");
                                assert_eq!(three.shape, fused.shape, "{what}: shape");
                                assert_bits(&what, &three.data, &fused.data);
                                assert_eq!(kept.is_some(), keep, "{what}: kept scores and probabilities only when asked");
                                if let Some((ks, kp)) = kept {
                                    let (ks, kp) = (host(&g, &ks), host(&g, &kp));
                                    assert_eq!((ks.shape.as_slice(), kp.shape.as_slice()), ([nh, nt, n_kv].as_slice(), [nh, nt, n_kv].as_slice()), "{what}: kept shapes");
                                    assert_bits(&format!("{what}: kept scores"), &host(&g, &s3).data, &ks.data);
                                    assert_bits(&format!("{what}: kept probabilities (before rounding)"), &host(&g, &p3).data, &kp.data);
                                }
                            }
                        }
                    }
                    pos0 = n_kv;
                }
            }
        }
    }
}

/// Rows of more keys than one tile of the fused attention's shared memory
/// (224 f32 or 256 f16 keys of 64 dimensions): a prefill of 600 tokens and
/// a decode step after it, the fused kernel (one or 4 query rows a block)
/// against the three ops (bits) and the CPU oracle (values).
#[test]
fn fused_attention_over_several_key_tiles() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = configs()[0].clone();
    let (nh, nkv, hd) = (cfg.n_head, cfg.n_head_kv, cfg.head_dim);
    let scale = 1.0 / (hd as f32).sqrt();
    for kv in [KvType::F16, KvType::F32] {
        let opts = BackendOptions { kv_type: kv, max_ctx: 700, dequant_bug: None };
        let w = weights(&cfg, 61);
        let mut cpu = CpuBackend::from_weights(cfg.clone(), w.clone(), opts).unwrap();
        let mut g = CudaBackend::from_weights(cfg.clone(), w, opts).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(62);
        let mut pos0 = 0;
        for nt in [600, 1] {
            let q = rand_tensor(&mut rng, &[nt, nh, hd], 2.0);
            let k = rand_tensor(&mut rng, &[nt, nkv, hd], 2.0);
            let v = rand_tensor(&mut rng, &[nt, nkv, hd], 2.0);
            cpu.kv_store(0, &k, &v, pos0).unwrap();
            g.kv_store(0, &on_gpu(&g, &k), &on_gpu(&g, &v), pos0).unwrap();
            let n_kv = pos0 + nt;
            let what = format!("{kv:?} pos0 {pos0} n_tokens {nt}");
            let qg = on_gpu(&g, &q);
            let s3 = g.attn_scores(0, &qg, pos0, n_kv, HeadMap::Grouped).unwrap();
            let p3 = g.softmax_causal(&s3, scale, pos0).unwrap();
            let three = host(&g, &g.attn_ctx(0, &p3, n_kv, HeadMap::Grouped).unwrap());
            let (want, _) = engine::backend::attention_in_three_ops(&cpu, 0, &q, scale, pos0, n_kv, HeadMap::Grouped, false, false).unwrap();
            for rows in [1, 4] {
                g.set_attention_rows(rows, 0).unwrap();
                let what = format!("{what} rows {rows}");
                let (fused, kept) = g.attention(0, &qg, scale, pos0, n_kv, HeadMap::Grouped, false, true).unwrap();
                let fused = host(&g, &fused);
                assert_bits(&format!("fused attention {what}"), &three.data, &fused.data);
                let (ks, kp) = kept.expect("kept scores and probabilities");
                assert_bits(&format!("fused attention {what}: kept scores"), &host(&g, &s3).data, &host(&g, &ks).data);
                assert_bits(&format!("fused attention {what}: kept probabilities"), &host(&g, &p3).data, &host(&g, &kp).data);
                close(&format!("fused attention vs cpu {what}"), &want, &fused, 1e-5, 1e-5);
            }
            pos0 = n_kv;
        }
    }
}

#[test]
fn reset_cache_and_capacity() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = &configs()[1];
    let (mut cpu, mut g) = backends(cfg, KvType::F32, 9);
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    let k = rand_tensor(&mut rng, &[3, cfg.n_head_kv, cfg.head_dim], 1.0);
    let q = rand_tensor(&mut rng, &[3, cfg.n_head, cfg.head_dim], 1.0);
    g.kv_store(0, &on_gpu(&g, &k), &on_gpu(&g, &k), 0).unwrap();
    g.reset_cache().unwrap();
    cpu.reset_cache().unwrap();
    // After a reset the GPU cache reads as zeros (the CPU's grows zero-filled).
    let z = rand_tensor(&mut rng, &[1, cfg.n_head_kv, cfg.head_dim], 1.0);
    cpu.kv_store(0, &z, &z, 2).unwrap();
    g.kv_store(0, &on_gpu(&g, &z), &on_gpu(&g, &z), 2).unwrap();
    let a = cpu.attn_scores(0, &q, 0, 3, HeadMap::Grouped).unwrap();
    let b = host(&g, &g.attn_scores(0, &on_gpu(&g, &q), 0, 3, HeadMap::Grouped).unwrap());
    close("scores after reset", &a, &b, 1e-5, 1e-6);
    // Writing past the capacity is an error, not a wild write.
    let big = rand_tensor(&mut rng, &[2, cfg.n_head_kv, cfg.head_dim], 1.0);
    assert!(g.kv_store(0, &on_gpu(&g, &big), &on_gpu(&g, &big), MAX_CTX - 1).is_err());
    assert!(g.attn_scores(0, &on_gpu(&g, &q), 0, MAX_CTX + 1, HeadMap::Grouped).is_err());
}

/// Prefill `prompt` and decode `forced.len()` steps on both backends with
/// `fault`, every stage recorded; each stage must agree within the bound of
/// the KV type: f32 cache, f32-vs-f64 drift only; f16 cache, a difference of
/// 1e-7 in K or V can flip an f16 rounding (one f16 ulp is 2^-11 relative),
/// so the bound is f16-rounding sized there. Returns the largest difference.
#[allow(clippy::too_many_arguments)]
fn passes_agree(cpu: CpuBackend, g: CudaBackend, cfg: &Qwen2Config, fault: Fault, prompt: &[i32], forced: &[i32], kv: KvType, label: &str) -> f32 {
    let mut mc = Model::new(cpu, cfg.clone(), FaultSpec::from(fault));
    let mut mg = Model::new(g, cfg.clone(), FaultSpec::from(fault));
    let mut rc = Recorder::new(StageFilter::default(), "cpu");
    let mut rg = Recorder::new(StageFilter::default(), "cuda");
    mc.generate(prompt, forced.len(), Some(forced), &mut rc).unwrap();
    mg.generate(prompt, forced.len(), Some(forced), &mut rg).unwrap();
    assert_eq!(rc.tensors.len(), rg.tensors.len(), "different stage sets");
    let tol = match kv {
        KvType::F32 => 1e-4,
        KvType::F16 => 2e-3,
    };
    let mut worst = 0f32;
    for (id, a) in &rc.tensors {
        let b = &rg.tensors.get(id).unwrap_or_else(|| panic!("cuda missed {id}")).tensor;
        worst = worst.max(close(&format!("{id} {label} {kv:?} fault {fault}"), &a.tensor, b, tol, tol));
    }
    worst
}

/// The one forward pass on both backends: prefill of 7 tokens then 3 decode
/// steps with every stage recorded, for every fault variant (each must be
/// implemented the same on both). The tolerance covers f32-vs-f64 drift
/// (and, with the f16 cache, f16 rounding flips) but stays orders below a
/// fault's effect.
#[test]
fn forward_pass_matches_cpu_for_every_fault() {
    let Some(_gpu) = gpu() else {
        return;
    };
    for (ci, cfg) in configs().iter().enumerate() {
        for kv in [KvType::F16, KvType::F32] {
            for fault in Fault::all() {
                let (cpu, g) = backends(cfg, kv, 100 + ci as u64);
                let mut rng = ChaCha8Rng::seed_from_u64(21);
                let prompt: Vec<i32> = (0..7).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
                let forced: Vec<i32> = (0..3).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
                let worst = passes_agree(cpu, g, cfg, fault, &prompt, &forced, kv, &format!("cfg{ci}"));
                println!("cfg{ci} kv {kv:?} fault {fault}: max |cpu - cuda| = {worst:e}");
            }
        }
    }
}

/// A pass that observes only the global stages (attention fused, scores
/// and probabilities never made) gives the bits of a pass that observes
/// every stage: the final norm and the logits of every step, in exact and
/// ggml numerics (f16 probabilities), with f16 and f32 caches; every fault
/// on the small shape (the masks and positions the faults change must
/// reach the fused kernel as they reach the three).
#[test]
fn observing_fewer_stages_changes_no_bits() {
    let Some(_gpu) = gpu() else {
        return;
    };
    for (ci, cfg) in configs().iter().enumerate() {
        let faults: Vec<Fault> = if ci == 1 { Fault::all().collect() } else { vec![Fault::None] };
        for (kv, numerics, fault) in faults.iter().flat_map(|&f| {
            [KvType::F16, KvType::F32].into_iter().flat_map(move |kv| [Numerics::Exact, Numerics::Ggml].map(|n| (kv, n, f)))
        }) {
            {
                let types: HashMap<Weight, GgmlType> = weights(cfg, 0).into_keys().map(|w| (w, GgmlType::F32)).collect();
                let rounding = Rounding::new(numerics, kv, &types).unwrap();
                let mut rng = ChaCha8Rng::seed_from_u64(23);
                let prompt: Vec<i32> = (0..9).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
                let forced: Vec<i32> = (0..3).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
                let run = |filter: StageFilter| {
                    let (_, g) = backends(cfg, kv, 300 + ci as u64);
                    let mut m = Model::new(g, cfg.clone(), FaultSpec::from(fault)).with_rounding(rounding.clone());
                    let mut r = Recorder::new(filter, "cuda");
                    m.generate(&prompt, forced.len(), Some(&forced), &mut r).unwrap();
                    r
                };
                let all = run(StageFilter::default());
                let globals = run(StageFilter { layers: Some(Vec::new()) });
                assert!(globals.tensors.keys().all(|id| id.layer.is_none()), "the filter kept a layer stage");
                assert_eq!(globals.tensors.len(), 3 * (forced.len() + 1), "embed, final norm and logits of each step");
                for (id, t) in &globals.tensors {
                    let a = &all.tensors.get(id).unwrap_or_else(|| panic!("{id} missing from the full capture")).tensor;
                    assert_bits(&format!("cfg{ci} {kv:?} {numerics:?} fault {fault} {id}"), &a.data, &t.tensor.data);
                }
            }
        }
    }
}

/// Every stage captured through the checkpoint arena (noted on the device,
/// brought over in one copy) is the tensor of a capture with the arena off
/// (one copy per checkpoint), bit for bit: with the default arena, and with
/// one of 1 MiB that fills during the prefill, so that the pass mixes the
/// two kinds; over a prefill and decode steps, twice in a row (the arena
/// starts again at each pass).
#[test]
fn checkpoints_through_the_arena_are_the_copies_one_by_one() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = &configs()[0];
    let mut rng = ChaCha8Rng::seed_from_u64(71);
    let prompt: Vec<i32> = (0..20).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
    let forced: Vec<i32> = (0..3).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
    let capture = |arena_mib: usize| {
        let (_, mut g) = backends(cfg, KvType::F16, 72);
        g.set_checkpoint_arena_mib(arena_mib).unwrap();
        let mut m = Model::new(g, cfg.clone(), FaultSpec::from(Fault::None));
        let mut runs = Vec::new();
        for _ in 0..2 {
            let mut r = Recorder::new(StageFilter::default(), "cuda");
            m.generate(&prompt, forced.len(), Some(&forced), &mut r).unwrap();
            runs.push(r);
        }
        runs
    };
    let one_by_one = capture(0);
    for mib in [64, 1] {
        for (run, (want, got)) in one_by_one.iter().zip(capture(mib)).enumerate() {
            assert_eq!(want.tensors.len(), got.tensors.len(), "arena {mib} MiB run {run}: different stage sets");
            for (id, t) in &want.tensors {
                let g = &got.tensors.get(id).unwrap_or_else(|| panic!("{id} missing with the arena")).tensor;
                assert_eq!(t.tensor.shape, g.shape, "{id}: shapes differ");
                assert_bits(&format!("arena {mib} MiB run {run} {id}"), &t.tensor.data, &g.data);
            }
        }
    }
}

#[test]
fn no_device_error_is_clear() {
    // Runs everywhere: on a machine without CUDA the constructor must fail
    // with the one-line message, never panic.
    if let Err(e) = cuda_available() {
        assert!(e.starts_with("no CUDA device: use --backend cpu"), "{e}");
        let cfg = configs()[1].clone();
        let w = weights(&cfg, 1);
        let err = CudaBackend::from_weights(cfg, w, BackendOptions { kv_type: KvType::F16, max_ctx: 8, dequant_bug: None }).err().expect("must fail");
        assert!(err.to_string().starts_with("no CUDA device: use --backend cpu"), "{err}");
    }
}

// ---- Weights kept as ggml blocks on the GPU (kernels/quant.cu) ----

/// Every type `kernels/quant.cu` reads.
const BLOCK_TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// A model whose every matrix dimension is a multiple of 256, so that each
/// block type (K-quants included) can store each matrix.
fn block_config() -> Qwen2Config {
    Qwen2Config {
        n_layer: 2,
        n_embd: 256,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 64,
        n_ff: 512,
        n_vocab: 300,
        rope_freq_base: 1_000_000.0,
        rms_eps: 1e-6,
        n_ctx_train: 4096,
        tied_output: false,
    }
}

/// Random `ty` blocks for `n` values: random bits everywhere except the f16
/// scale and min fields (finite, |s| <= `scale`) and plain float types
/// (values in [-1, 1]), so that no NaN or Inf arises.
fn random_blocks_scaled(rng: &mut ChaCha8Rng, ty: GgmlType, n: usize, scale: f32) -> Vec<u8> {
    let (bs, ts) = (ty.block_size().unwrap(), ty.type_size().unwrap());
    let mut bytes: Vec<u8> = (0..n / bs * ts).map(|_| rng.gen()).collect();
    let halves: &[usize] = match ty {
        GgmlType::F32 => {
            for c in bytes.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.gen_range(-1.0f32..1.0).to_le_bytes());
            }
            &[]
        }
        GgmlType::BF16 => {
            for c in bytes.chunks_exact_mut(2) {
                c.copy_from_slice(&half::bf16::from_f32(rng.gen_range(-1.0f32..1.0)).to_le_bytes());
            }
            &[]
        }
        GgmlType::F16 => &[0],
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        other => panic!("no random blocks for {}", other.name()),
    };
    for block in bytes.chunks_exact_mut(ts) {
        for &off in halves {
            let s = if ty == GgmlType::F16 { rng.gen_range(-1.0f32..1.0) } else { rng.gen_range(-scale..scale) };
            block[off..off + 2].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
        }
    }
    bytes
}

fn random_blocks(rng: &mut ChaCha8Rng, ty: GgmlType, n: usize) -> Vec<u8> {
    random_blocks_scaled(rng, ty, n, 0.05)
}

/// The CPU oracle and a CUDA backend on the same values: the matrices in
/// `quantized` as random blocks of `ty` (the GPU keeps the blocks, the CPU
/// gets their dequantized values), every other weight from `weights(cfg, seed)`.
fn oracle_and_gpu_on_blocks(cfg: &Qwen2Config, ty: GgmlType, quantized: &[Weight], seed: u64, rng: &mut ChaCha8Rng, opts: BackendOptions) -> (CpuBackend, CudaBackend) {
    let mut f32_weights = weights(cfg, seed);
    let mut blocks = Vec::new();
    for &w in quantized {
        let shape = w.shape(cfg);
        let n = shape.iter().product();
        let bytes = random_blocks(rng, ty, n);
        f32_weights.insert(w, Tensor::new(shape, gguf::dequant::dequantize(ty, &bytes, n).unwrap()));
        blocks.push((w, bytes));
    }
    let cpu = CpuBackend::from_weights(cfg.clone(), f32_weights.clone(), opts).unwrap();
    let mut g = CudaBackend::from_weights(cfg.clone(), f32_weights, opts).unwrap();
    for (w, bytes) in &blocks {
        g.upload_blocks(*w, ty, bytes, 0).unwrap();
    }
    (cpu, g)
}

#[track_caller]
/// Bit for bit, except that any NaN equals any NaN: an invalid operation
/// (0 x inf where a block's f16 scale overflows) gives x86's default NaN
/// (sign set) on the host and CUDA's canonical NaN (sign clear) on the GPU,
/// and no comparison of the tool ever lets a NaN pass, whatever its payload.
fn assert_bits(what: &str, want: &[f32], got: &[f32]) {
    assert_eq!(want.len(), got.len(), "{what}: lengths differ");
    let differ = |a: &f32, b: &f32| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan());
    if let Some(i) = want.iter().zip(got).position(|(a, b)| differ(a, b)) {
        let bad = want.iter().zip(got).filter(|(a, b)| differ(a, b)).count();
        panic!("{what}: {bad} of {} values differ, first at {i}: host {} gpu {}", want.len(), want[i], got[i]);
    }
}

#[test]
fn block_weights_dequantize_bit_exact() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = block_config();
    let (_, mut g) = backends(&cfg, KvType::F16, 31);
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    let w = Weight::FfnUp(0);
    let n = cfg.n_ff * cfg.n_embd;
    for ty in BLOCK_TYPES {
        let bytes = random_blocks(&mut rng, ty, n);
        g.upload_blocks(w, ty, &bytes, 0).unwrap();
        assert_eq!(g.weight_type(w).unwrap(), ty);
        let want = gguf::dequant::dequantize(ty, &bytes, n).unwrap();
        assert_bits(&format!("dequant {}", ty.name()), &want, &g.weight_to_host(w).unwrap().data);
        if ty == GgmlType::Q5_0 {
            // The q5-0-high-bit fault, read by the kernel itself.
            let mut bug = vec![0f32; n];
            gguf::dequant::q5_0_forgotten_shift(&bytes, &mut bug);
            assert!(bug != want, "the fault changes nothing on these blocks");
            g.upload_blocks(w, ty, &bytes, 1).unwrap();
            assert_bits("dequant Q5_0 with q5-0-high-bit", &bug, &g.weight_to_host(w).unwrap().data);
        }
    }
    // Bad uploads are refused with a message, not read out of bounds.
    let q = random_blocks(&mut rng, GgmlType::Q8_0, n);
    assert!(g.upload_blocks(w, GgmlType::Q8_0, &q[..q.len() - 34], 0).is_err(), "a short matrix accepted");
    assert!(g.upload_blocks(Weight::AttnQBias(0), GgmlType::Q8_0, &q[..34 * 8], 0).is_err(), "blocks for a vector accepted");
    // Rows of 72 values are not whole Q8_0 blocks.
    let small = configs()[1].clone();
    let (_, mut gs) = backends(&small, KvType::F16, 37);
    assert!(gs.upload_blocks(Weight::AttnQ(0), GgmlType::Q8_0, &q[..34 * 2 * 64], 0).is_err(), "rows of partial blocks accepted");
}

/// The weights cross two page-locked buffers of 1 MiB in turn (cuda/upload.rs):
/// a matrix of many chunks, and one that ends mid-chunk, arrive whole, and
/// an upload replacing a matrix whose copy may still be in flight takes its place.
#[test]
fn weights_larger_than_an_upload_chunk_arrive_whole() {
    let Some(_gpu) = gpu() else {
        return;
    };
    // Qwen2-0.5B's FFN: 4864 x 896 values, 17 MiB as F32, 4.6 MiB as Q8_0.
    let cfg = Qwen2Config { n_layer: 1, n_embd: 896, n_head: 14, n_head_kv: 2, head_dim: 64, n_ff: 4864, ..block_config() };
    let (_, mut g) = backends(&cfg, KvType::F16, 41);
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let n = cfg.n_ff * cfg.n_embd;
    for (w, ty) in [(Weight::FfnUp(0), GgmlType::F32), (Weight::FfnGate(0), GgmlType::Q8_0), (Weight::FfnUp(0), GgmlType::Q5_0)] {
        let bytes = random_blocks(&mut rng, ty, n);
        g.upload_blocks(w, ty, &bytes, 0).unwrap();
        let want = gguf::dequant::dequantize(ty, &bytes, n).unwrap();
        assert_bits(&format!("{w:?} as {} ({} bytes)", ty.name(), bytes.len()), &want, &g.weight_to_host(w).unwrap().data);
    }
    g.finish_uploads().unwrap();
}

/// Linear (GEMV for up to GEMV_MAX_TOKENS rows, dequantize + sgemm beyond,
/// and the transposed read) and the embedding lookup on block weights
/// against the CPU oracle on the same values.
#[test]
fn block_weights_linear_and_embed_match_cpu() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = block_config();
    let opts = BackendOptions { kv_type: KvType::F16, max_ctx: MAX_CTX, dequant_bug: None };
    let mut rng = ChaCha8Rng::seed_from_u64(33);
    let quantized = [Weight::TokenEmbd, Weight::AttnQ(0), Weight::AttnOutput(1), Weight::FfnUp(0), Weight::FfnDown(1), Weight::Output];
    for ty in BLOCK_TYPES {
        let (cpu, g) = oracle_and_gpu_on_blocks(&cfg, ty, &quantized, 34, &mut rng, opts);
        for n in [1, 3, engine::cuda::GEMV_MAX_TOKENS, engine::cuda::GEMV_MAX_TOKENS + 1, 33] {
            let x = rand_tensor(&mut rng, &[n, cfg.n_embd], 1.0);
            let xq = rand_tensor(&mut rng, &[n, cfg.n_head * cfg.head_dim], 1.0);
            let xf = rand_tensor(&mut rng, &[n, cfg.n_ff], 1.0);
            let cases: [(&Tensor, Weight, Option<Weight>); 5] = [
                (&x, Weight::AttnQ(0), Some(Weight::AttnQBias(0))),
                (&xq, Weight::AttnOutput(1), None),
                (&x, Weight::FfnUp(0), None),
                (&xf, Weight::FfnDown(1), None),
                (&x, Weight::Output, None),
            ];
            for (input, w, b) in cases {
                for read in [WeightRead::Rows, WeightRead::Transposed] {
                    let a = cpu.linear(input, w, b, read).unwrap();
                    let r = host(&g, &g.linear(&on_gpu(&g, input), w, b, read).unwrap());
                    close(&format!("linear {} {w:?} {read:?} n{n}", ty.name()), &a, &r, 1e-5, 1e-5);
                }
            }
            let tokens: Vec<i32> = (0..n).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
            for read in [WeightRead::Rows, WeightRead::Transposed] {
                let a = cpu.embed(&tokens, read).unwrap();
                let b = host(&g, &g.embed(&tokens, read).unwrap());
                close(&format!("embed {} {read:?} n{n}", ty.name()), &a, &b, 0.0, 0.0);
            }
        }
    }
}

/// The tensor-core prefill (`PrefillMatmul::F16`) on block weights against
/// the CPU oracle: within f16's rounding (each output row within 2e-3 of
/// its largest value; f16 keeps 11 bits, measured errors are ~1e-4), both
/// reads, with and without a bias; a row of activations far beyond f16's
/// range (1e6) or far below it (1e-6) as accurate as any other (the
/// per-row scaling); a NaN stays in its own row.
#[test]
fn f16_prefill_matmul_matches_cpu_within_f16_rounding() {
    let Some(_gpu) = gpu() else {
        return;
    };
    use engine::cuda::PrefillMatmul;
    let cfg = block_config();
    let opts = BackendOptions { kv_type: KvType::F16, max_ctx: MAX_CTX, dequant_bug: None };
    let mut rng = ChaCha8Rng::seed_from_u64(51);
    let row_close = |what: &str, a: &Tensor, b: &Tensor| {
        let n_out = *a.shape.last().unwrap();
        for (r, (ra, rb)) in a.data.chunks(n_out).zip(b.data.chunks(n_out)).enumerate() {
            close(&format!("{what} row {r}"), &Tensor::new(vec![n_out], ra.to_vec()), &Tensor::new(vec![n_out], rb.to_vec()), 2e-3, 0.0);
        }
    };
    for ty in BLOCK_TYPES {
        let (cpu, mut g) = oracle_and_gpu_on_blocks(&cfg, ty, &[Weight::AttnQ(0), Weight::FfnDown(1)], 52, &mut rng, opts);
        g.set_prefill_matmul(PrefillMatmul::F16).unwrap();
        let n = engine::cuda::GEMV_MAX_TOKENS + 5;
        for (w, b, n_in) in [(Weight::AttnQ(0), Some(Weight::AttnQBias(0)), cfg.n_embd), (Weight::FfnDown(1), None, cfg.n_ff)] {
            let mut x = rand_tensor(&mut rng, &[n, n_in], 1.0);
            x.data[..n_in].iter_mut().for_each(|v| *v *= 1e6);
            x.data[n_in..2 * n_in].iter_mut().for_each(|v| *v *= 1e-6);
            for read in [WeightRead::Rows, WeightRead::Transposed] {
                let a = cpu.linear(&x, w, b, read).unwrap();
                let r = host(&g, &g.linear(&on_gpu(&g, &x), w, b, read).unwrap());
                row_close(&format!("f16 linear {} {w:?} {read:?}", ty.name()), &a, &r);
            }
            let mut xn = x.clone();
            xn.data[2 * n_in + 3] = f32::NAN;
            let r = host(&g, &g.linear(&on_gpu(&g, &xn), w, b, WeightRead::Rows).unwrap());
            let n_out = *r.shape.last().unwrap();
            for (row, vals) in r.data.chunks(n_out).enumerate() {
                if row == 2 {
                    assert!(vals.iter().all(|v| v.is_nan()), "f16 linear {}: the NaN row has a number", ty.name());
                } else {
                    assert!(vals.iter().all(|v| v.is_finite()), "f16 linear {}: row {row} is not finite", ty.name());
                }
            }
        }
    }
}

/// The fused gate/up/SwiGLU GEMV gives the bits of two GEMVs and the
/// element-wise SwiGLU, for every block type, both activations, and the
/// swapped order; above GEMV_MAX_TOKENS rows it is the three ops. The two
/// products it keeps for a checkpoint are the two GEMVs' bits.
#[test]
fn gated_gemv_gives_the_bits_of_two_gemvs_and_swiglu() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = block_config();
    let opts = BackendOptions { kv_type: KvType::F16, max_ctx: MAX_CTX, dequant_bug: None };
    let mut rng = ChaCha8Rng::seed_from_u64(39);
    let (gate, up) = (Weight::FfnGate(0), Weight::FfnUp(0));
    for ty in BLOCK_TYPES {
        let mut g = CudaBackend::from_weights(cfg.clone(), weights(&cfg, 40), opts).unwrap();
        let n = cfg.n_ff * cfg.n_embd;
        g.upload_blocks(gate, ty, &random_blocks(&mut rng, ty, n), 0).unwrap();
        g.upload_blocks(up, ty, &random_blocks(&mut rng, ty, n), 0).unwrap();
        for n_tokens in [1, 3, engine::cuda::GEMV_MAX_TOKENS, engine::cuda::GEMV_MAX_TOKENS + 1] {
            let x = on_gpu(&g, &rand_tensor(&mut rng, &[n_tokens, cfg.n_embd], 1.0));
            for act in [Activation::Silu, Activation::Gelu] {
                for (a, b) in [(gate, up), (up, gate)] {
                    let ya = g.linear(&x, a, None, WeightRead::Rows).unwrap();
                    let yb = g.linear(&x, b, None, WeightRead::Rows).unwrap();
                    let three = host(&g, &g.swiglu(&ya, &yb, act).unwrap());
                    // x copied into shared memory or not, blocks capped or not.
                    for (x_staged, max_blocks, keep) in [(true, None, false), (false, None, false), (true, Some(2), false), (true, None, true), (false, Some(2), true)] {
                        g.set_gemv_x_and_grid(x_staged, max_blocks);
                        let (fused, products) = g.gated_linear(&x, a, b, act, keep).unwrap();
                        let fused = host(&g, &fused);
                        assert_eq!(three.shape, fused.shape);
                        let what = format!("gated gemv {} n{n_tokens} {act:?} {a:?} x staged {x_staged} blocks {max_blocks:?} keep {keep}", ty.name());
                        assert_bits(&what, &three.data, &fused.data);
                        assert_eq!(products.is_some(), keep, "{what}: products kept only when asked");
                        if let Some((pa, pb)) = products {
                            assert_bits(&format!("{what}: kept x Wa^T"), &host(&g, &ya).data, &host(&g, &pa).data);
                            assert_bits(&format!("{what}: kept x Wb^T"), &host(&g, &yb).data, &host(&g, &pb).data);
                        }
                    }
                    g.set_gemv_x_and_grid(true, None);
                }
            }
        }
    }
}

/// The GEMVs on the real model's shapes against the CPU oracle, for 1, 2
/// and the most tokens: rows of 896 values (28 groups of 32: a warp's
/// last lanes idle) and of 4864 (152 groups over eight warps), 1280 for the
/// K-quants (whose blocks hold 256), 128 rows (K) to 4864; and each with
/// the rows staged through shared memory (`set_gemv_staging`), x copied
/// into shared memory or not and the blocks capped (`set_gemv_x_and_grid`),
/// which must all give the same bits.
#[test]
fn block_gemv_on_the_real_model_shapes() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let opts = BackendOptions { kv_type: KvType::F16, max_ctx: MAX_CTX, dequant_bug: None };
    let mut rng = ChaCha8Rng::seed_from_u64(61);
    let quantized = [Weight::AttnQ(0), Weight::AttnK(0), Weight::FfnUp(0), Weight::FfnDown(0), Weight::Output];
    for ty in BLOCK_TYPES {
        let n_embd = if ty.block_size().unwrap() == 256 { 1280 } else { 896 };
        let cfg = Qwen2Config {
            n_layer: 1,
            n_embd,
            n_head: n_embd / 64,
            n_head_kv: 2,
            head_dim: 64,
            n_ff: 4864,
            n_vocab: 2000,
            rope_freq_base: 1_000_000.0,
            rms_eps: 1e-6,
            n_ctx_train: 4096,
            tied_output: false,
        };
        let (cpu, mut g) = oracle_and_gpu_on_blocks(&cfg, ty, &quantized, 62, &mut rng, opts);
        for n in [1, 2, engine::cuda::GEMV_MAX_TOKENS] {
            for w in quantized {
                let x = rand_tensor(&mut rng, &[n, w.shape(&cfg)[1]], 1.0);
                let want = cpu.linear(&x, w, None, WeightRead::Rows).unwrap();
                let what = format!("gemv {} {w:?} n{n}", ty.name());
                g.set_gemv_staging(false);
                g.set_gemv_x_and_grid(false, None);
                let direct = host(&g, &g.linear(&on_gpu(&g, &x), w, None, WeightRead::Rows).unwrap());
                close(&what, &want, &direct, 1e-5, 1e-5);
                // Rows staged or not, x copied into shared memory or not,
                // one block per 8 rows or a few blocks taking turns: the same bits.
                for (rows_staged, x_staged, max_blocks) in [(true, false, None), (false, true, None), (false, true, Some(3)), (true, true, Some(1)), (false, false, Some(5))] {
                    g.set_gemv_staging(rows_staged);
                    g.set_gemv_x_and_grid(x_staged, max_blocks);
                    let other = host(&g, &g.linear(&on_gpu(&g, &x), w, None, WeightRead::Rows).unwrap());
                    assert_bits(&format!("{what} rows staged {rows_staged} x staged {x_staged} blocks {max_blocks:?}"), &direct.data, &other.data);
                }
            }
        }
    }
}

/// The projection with its residual add in the GEMV gives the bits of
/// `linear` then `add`, for every block type, with the bias-free and the
/// transposed read (which takes the other path and adds after it); the
/// projection it keeps for a checkpoint is `linear`'s.
#[test]
fn linear_with_residual_gives_the_bits_of_linear_and_add() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = block_config();
    let opts = BackendOptions { kv_type: KvType::F16, max_ctx: MAX_CTX, dequant_bug: None };
    let mut rng = ChaCha8Rng::seed_from_u64(45);
    let w = Weight::FfnDown(0);
    for ty in BLOCK_TYPES {
        let mut g = CudaBackend::from_weights(cfg.clone(), weights(&cfg, 46), opts).unwrap();
        g.upload_blocks(w, ty, &random_blocks(&mut rng, ty, cfg.n_ff * cfg.n_embd), 0).unwrap();
        for n_tokens in [1, 3, engine::cuda::GEMV_MAX_TOKENS, engine::cuda::GEMV_MAX_TOKENS + 1] {
            let x = on_gpu(&g, &rand_tensor(&mut rng, &[n_tokens, cfg.n_ff], 1.0));
            let res = on_gpu(&g, &rand_tensor(&mut rng, &[n_tokens, cfg.n_embd], 3.0));
            for read in [WeightRead::Rows, WeightRead::Transposed] {
                let product = g.linear(&x, w, None, read).unwrap();
                let two = host(&g, &g.add(&res, &product).unwrap());
                for keep in [false, true] {
                    let what = format!("linear + residual {} n{n_tokens} {read:?} keep {keep}", ty.name());
                    let (one, kept) = g.linear_residual(&x, w, read, &res, keep).unwrap();
                    let one = host(&g, &one);
                    assert_eq!(two.shape, one.shape);
                    assert_bits(&what, &two.data, &one.data);
                    assert_eq!(kept.is_some(), keep, "{what}: the projection kept only when asked");
                    if let Some(kept) = kept {
                        assert_bits(&format!("{what}: kept projection"), &host(&g, &product).data, &host(&g, &kept).data);
                    }
                }
            }
        }
    }
}

/// RoPE of q and k plus the KV store in one kernel give the bits of the
/// three launches: the rotated q and k, and the cache (read back through
/// attention's scores and context), for both cache types, both pairings,
/// a prefill then decode steps, and positions that differ between RoPE and
/// the store (as the faults make them).
#[test]
fn rope_and_kv_store_in_one_kernel_give_the_bits_of_three() {
    let Some(_gpu) = gpu() else {
        return;
    };
    for (ci, cfg) in configs().iter().enumerate() {
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_head, cfg.n_head_kv);
        for kv in [KvType::F16, KvType::F32] {
            for pairing in [RopePairing::Neox, RopePairing::Adjacent] {
                let opts = BackendOptions { kv_type: kv, max_ctx: MAX_CTX, dequant_bug: None };
                let mut three = CudaBackend::from_weights(cfg.clone(), weights(cfg, 51), opts).unwrap();
                let mut one = CudaBackend::from_weights(cfg.clone(), weights(cfg, 51), opts).unwrap();
                let mut rng = ChaCha8Rng::seed_from_u64(52 + ci as u64);
                let mut pos0 = 0;
                for (step, nt) in [7, 1, 1].into_iter().enumerate() {
                    let (rope_pos, kv_pos) = if step == 2 { (pos0 + 1, pos0) } else { (pos0, pos0) };
                    let q = rand_tensor(&mut rng, &[nt, nh, hd], 2.0);
                    let k = rand_tensor(&mut rng, &[nt, nkv, hd], 2.0);
                    let v = rand_tensor(&mut rng, &[nt, nkv, hd], 2.0);
                    let what = format!("cfg{ci} {kv:?} {pairing:?} step{step}");
                    for layer in 0..cfg.n_layer {
                        let q3 = three.rope(&on_gpu(&three, &q), rope_pos, 1e4, pairing).unwrap();
                        let k3 = three.rope(&on_gpu(&three, &k), rope_pos, 1e4, pairing).unwrap();
                        three.kv_store(layer, &k3, &on_gpu(&three, &v), kv_pos).unwrap();
                        let (qg, kg, vg) = (on_gpu(&one, &q), on_gpu(&one, &k), on_gpu(&one, &v));
                        let (q1, k1) = one.rope_qk_kv_store(layer, &qg, &kg, &vg, rope_pos, 1e4, pairing, kv_pos).unwrap();
                        assert_bits(&format!("q_rope {what}"), &host(&three, &q3).data, &host(&one, &q1).data);
                        assert_bits(&format!("k_rope {what}"), &host(&three, &k3).data, &host(&one, &k1).data);
                    }
                    let n_kv = pos0 + nt;
                    let probe = rand_tensor(&mut rng, &[nt, nh, hd], 1.0);
                    for layer in 0..cfg.n_layer {
                        let s3 = host(&three, &three.attn_scores(layer, &on_gpu(&three, &probe), pos0, n_kv, HeadMap::Grouped).unwrap());
                        let s1 = host(&one, &one.attn_scores(layer, &on_gpu(&one, &probe), pos0, n_kv, HeadMap::Grouped).unwrap());
                        assert_bits(&format!("cached K {what} layer {layer}"), &s3.data, &s1.data);
                        let c3 = host(&three, &three.attn_ctx(layer, &on_gpu(&three, &s3), n_kv, HeadMap::Grouped).unwrap());
                        let c1 = host(&one, &one.attn_ctx(layer, &on_gpu(&one, &s1), n_kv, HeadMap::Grouped).unwrap());
                        assert_bits(&format!("cached V {what} layer {layer}"), &c3.data, &c1.data);
                    }
                    pos0 += nt;
                }
            }
        }
    }
}

/// Q, K and V in one launch (`linear3`, gemv3 on blocks of one type) give
/// the bits of three `linear`s: every block type, the real model's mix
/// (V in another type: two launches), a transposed Q (the fault: Q leaves
/// the group), with and without biases, GEMV and prefill token counts.
#[test]
fn three_projections_in_one_launch_give_the_bits_of_three() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = block_config();
    let opts = BackendOptions { kv_type: KvType::F16, max_ctx: MAX_CTX, dequant_bug: None };
    let mut rng = ChaCha8Rng::seed_from_u64(61);
    let (q, k, v) = (Weight::AttnQ(0), Weight::AttnK(0), Weight::AttnV(0));
    let mut mixes: Vec<[GgmlType; 3]> = BLOCK_TYPES.iter().map(|&t| [t; 3]).collect();
    mixes.push([GgmlType::Q5_0, GgmlType::Q5_0, GgmlType::Q8_0]);
    mixes.push([GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q5_0]);
    for types in mixes {
        let mut g = CudaBackend::from_weights(cfg.clone(), weights(&cfg, 62), opts).unwrap();
        for (w, ty) in [q, k, v].into_iter().zip(types) {
            let n: usize = w.shape(&cfg).iter().product();
            g.upload_blocks(w, ty, &random_blocks(&mut rng, ty, n), 0).unwrap();
        }
        for n_tokens in [1, 3, engine::cuda::GEMV_MAX_TOKENS, engine::cuda::GEMV_MAX_TOKENS + 1] {
            let x = on_gpu(&g, &rand_tensor(&mut rng, &[n_tokens, cfg.n_embd], 1.0));
            for (bias, q_read) in [(true, WeightRead::Rows), (false, WeightRead::Rows), (true, WeightRead::Transposed)] {
                let b = |w: Weight| bias.then_some(w);
                let projections = [
                    (q, b(Weight::AttnQBias(0)), q_read),
                    (k, b(Weight::AttnKBias(0)), WeightRead::Rows),
                    (v, b(Weight::AttnVBias(0)), WeightRead::Rows),
                ];
                let one = g.linear3(&x, projections).unwrap();
                for ((w, bw, read), got) in projections.into_iter().zip(&one) {
                    let want = host(&g, &g.linear(&x, w, bw, read).unwrap());
                    let got = host(&g, got);
                    assert_eq!(want.shape, got.shape);
                    let what = format!("{w:?} in {:?} n{n_tokens} bias {bias} q {q_read:?}", types.map(|t| t.name()));
                    assert_bits(&what, &want.data, &got.data);
                }
            }
        }
    }
}

/// The RMSNorm fused into the GEMVs after it (`norm_linear3`,
/// `norm_gated_linear`) gives the bits of `rms_norm` then the projections,
/// for every block type and a mix of two (the real model's V is Q8_0 where
/// Q and K are Q5_0: the norm is then computed in both launches), with and
/// without staged rows, for one token, a few, the most a GEMV takes, and
/// one more (which takes the separate norm and the matmul path). The norm's
/// output they keep for a checkpoint is `rms_norm`'s, and so are the
/// products the gated GEMV keeps.
#[test]
fn norm_fused_into_the_gemvs_gives_the_bits_of_the_norm_then_the_gemvs() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = block_config();
    let opts = BackendOptions { kv_type: KvType::F16, max_ctx: MAX_CTX, dequant_bug: None };
    let mut rng = ChaCha8Rng::seed_from_u64(63);
    let (q, k, v, gate, up) = (Weight::AttnQ(0), Weight::AttnK(0), Weight::AttnV(0), Weight::FfnGate(0), Weight::FfnUp(0));
    let mut mixes: Vec<[GgmlType; 3]> = BLOCK_TYPES.iter().map(|&t| [t; 3]).collect();
    mixes.push([GgmlType::Q5_0, GgmlType::Q5_0, GgmlType::Q8_0]);
    let eps = cfg.rms_eps;
    for types in mixes {
        let mut g = CudaBackend::from_weights(cfg.clone(), weights(&cfg, 64), opts).unwrap();
        for (w, ty) in [q, k, v, gate, up].into_iter().zip([types[0], types[1], types[2], types[0], types[0]]) {
            let n: usize = w.shape(&cfg).iter().product();
            g.upload_blocks(w, ty, &random_blocks(&mut rng, ty, n), 0).unwrap();
        }
        for n_tokens in [1, 3, engine::cuda::GEMV_MAX_TOKENS, engine::cuda::GEMV_MAX_TOKENS + 1] {
            let x = on_gpu(&g, &rand_tensor(&mut rng, &[n_tokens, cfg.n_embd], 3.0));
            let projections = [(q, Some(Weight::AttnQBias(0)), WeightRead::Rows), (k, Some(Weight::AttnKBias(0)), WeightRead::Rows), (v, Some(Weight::AttnVBias(0)), WeightRead::Rows)];
            for (staged, max_blocks) in [(false, None), (true, None), (false, Some(2))] {
                g.set_gemv_staging(staged);
                g.set_gemv_x_and_grid(true, max_blocks);
                let what = format!("{:?} n{n_tokens} staged {staged} blocks {max_blocks:?}", types.map(|t| t.name()));
                let h = g.rms_norm(&x, Weight::AttnNorm(0), eps).unwrap();
                let two = g.linear3(&h, projections).unwrap();
                for keep in [false, true] {
                    let what = format!("{what} keep {keep}");
                    let (one, kept) = g.norm_linear3(&x, Weight::AttnNorm(0), eps, projections, keep).unwrap();
                    for ((w, _, _), (want, got)) in projections.iter().zip(two.iter().zip(&one)) {
                        assert_bits(&format!("{w:?} {what}"), &host(&g, want).data, &host(&g, got).data);
                    }
                    assert_eq!(kept.is_some(), keep, "{what}: the norm kept only when asked");
                    if let Some(kept) = kept {
                        assert_bits(&format!("attn norm {what}"), &host(&g, &h).data, &host(&g, &kept).data);
                    }
                }
                let h = g.rms_norm(&x, Weight::FfnNorm(0), eps).unwrap();
                let (want, want_products) = g.gated_linear(&h, gate, up, Activation::Silu, true).unwrap();
                let (want_gate, want_up) = want_products.expect("products kept");
                let want = host(&g, &want);
                for (keep, keep_norm) in [(false, false), (true, false), (false, true), (true, true)] {
                    let what = format!("{what} keep {keep} keep_norm {keep_norm}");
                    let (got, products, kept_norm) = g.norm_gated_linear(&x, Weight::FfnNorm(0), eps, gate, up, Activation::Silu, keep, keep_norm).unwrap();
                    let got = host(&g, &got);
                    assert_eq!(want.shape, got.shape);
                    assert_bits(&format!("gate/up {what}"), &want.data, &got.data);
                    assert_eq!((products.is_some(), kept_norm.is_some()), (keep, keep_norm), "{what}: kept only what was asked");
                    if let Some((pg, pu)) = products {
                        assert_bits(&format!("gate {what}"), &host(&g, &want_gate).data, &host(&g, &pg).data);
                        assert_bits(&format!("up {what}"), &host(&g, &want_up).data, &host(&g, &pu).data);
                    }
                    if let Some(kept) = kept_norm {
                        assert_bits(&format!("ffn norm {what}"), &host(&g, &h).data, &host(&g, &kept).data);
                    }
                }
            }
        }
    }
}

/// A CUDA backend of `cfg` with `f32_weights` and then `blocks` (from
/// [`block_model`]) uploaded over them, its KV cache `kv`.
fn cuda_on_blocks(cfg: &Qwen2Config, f32_weights: &HashMap<Weight, Tensor>, blocks: &[(Weight, GgmlType, Vec<u8>)], kv: KvType) -> CudaBackend {
    let opts = BackendOptions { kv_type: kv, max_ctx: MAX_CTX, dequant_bug: None };
    let mut g = CudaBackend::from_weights(cfg.clone(), f32_weights.clone(), opts).unwrap();
    for (w, ty, bytes) in blocks {
        g.upload_blocks(*w, *ty, bytes, 0).unwrap();
    }
    g
}

/// A random model of `cfg` whose matrices are blocks in the real model's
/// mix of types: the f32 values (for the CPU oracle) and the blocks.
#[allow(clippy::type_complexity)]
fn block_model(cfg: &Qwen2Config, rng: &mut ChaCha8Rng) -> (HashMap<Weight, Tensor>, Vec<(Weight, GgmlType, Vec<u8>)>) {
    let type_of = |w: Weight| match w {
        Weight::TokenEmbd => GgmlType::Q4_K,
        Weight::Output => GgmlType::Q8_0,
        Weight::FfnDown(_) => GgmlType::Q6_K,
        Weight::AttnOutput(_) => GgmlType::Q4_K,
        _ => GgmlType::Q5_0,
    };
    let mut f32_weights = weights(cfg, 36);
    let mut blocks = Vec::new();
    for w in Weight::all(&ArchSpec::qwen2(cfg), cfg.n_layer) {
        let shape = w.shape(cfg);
        if shape.len() != 2 {
            continue;
        }
        let n = shape.iter().product();
        let ty = type_of(w);
        // Scales so that weights are about as large as `weights` makes them
        // (|w| ~ 0.1: d times a typical |scale x quant|), so activations stay
        // O(1) through the layers.
        let d = match ty {
            GgmlType::Q5_0 => 0.1 / 16.0,
            GgmlType::Q8_0 => 0.1 / 64.0,
            GgmlType::Q4_K => 0.1 / (31.0 * 7.0),
            GgmlType::Q6_K => 0.1 / (64.0 * 16.0),
            other => panic!("no scale for {}", other.name()),
        };
        let bytes = random_blocks_scaled(rng, ty, n, d);
        f32_weights.insert(w, Tensor::new(shape, gguf::dequant::dequantize(ty, &bytes, n).unwrap()));
        blocks.push((w, ty, bytes));
    }
    (f32_weights, blocks)
}

/// Decode steps replayed from a recording (a CUDA graph) give the bits of
/// the same steps run op by op: for every fault (those that move positions
/// must follow each replay's position), both caches, and two sequences (the
/// second replays the recording over a reset cache).
#[test]
fn recorded_decode_steps_give_the_bits_of_op_by_op() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = block_config();
    let mut rng = ChaCha8Rng::seed_from_u64(37);
    let (f32_weights, blocks) = block_model(&cfg, &mut rng);
    let prompt: Vec<i32> = (0..5).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
    let forced: Vec<i32> = (0..6).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
    for kv in [KvType::F32, KvType::F16] {
        for fault in Fault::all() {
            let make = |record: bool| {
                let mut g = cuda_on_blocks(&cfg, &f32_weights, &blocks, kv);
                if !record {
                    g.disable_recording("the test's op-by-op model");
                }
                Model::new(g, cfg.clone(), FaultSpec::from(fault))
            };
            let (mut recorded, mut plain) = (make(true), make(false));
            for seq in 0..2 {
                recorded.reset().unwrap();
                plain.reset().unwrap();
                for (step, tokens) in std::iter::once(prompt.as_slice()).chain(forced.chunks(1)).enumerate() {
                    let a = recorded.forward(tokens, step, &mut NoCheckpoints).unwrap().expect("logits");
                    let b = plain.forward(tokens, step, &mut NoCheckpoints).unwrap().expect("logits");
                    assert_bits(&format!("kv {kv:?} fault {fault} sequence {seq} step {step}"), &b, &a);
                }
            }
            let status = recorded.backend.recording_status();
            println!("kv {kv:?} fault {fault}: {status}");
            if fault == Fault::None {
                assert!(status.starts_with("recorded"), "the correct engine's steps were not recorded: {status}");
            }
            assert!(plain.backend.recording_status().starts_with("op by op"));
        }
    }
}

/// The stages the fused kernels keep for observing checkpoints (the norm
/// in the GEMVs, gate and up in the gated GEMV, the projection before the
/// residual, scores and probabilities in the fused attention) are the bits
/// of the separate ops, on block weights in the real model's mix of types,
/// for every fault and both caches: a prefill (the matmul path) and decode
/// steps (the GEMVs).
#[test]
fn kept_stages_are_the_bits_of_the_separate_ops_on_block_weights() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = block_config();
    let mut rng = ChaCha8Rng::seed_from_u64(81);
    let (f32_weights, blocks) = block_model(&cfg, &mut rng);
    let prompt: Vec<i32> = (0..5).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
    let forced: Vec<i32> = (0..3).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
    for kv in [KvType::F32, KvType::F16] {
        for fault in Fault::all() {
            let g = cuda_on_blocks(&cfg, &f32_weights, &blocks, kv);
            let mut m = Model::new(g, cfg.clone(), FaultSpec::from(fault));
            let mut observed = Recorder::new(StageFilter::default(), "cuda");
            m.generate(&prompt, forced.len(), Some(&forced), &mut observed).unwrap();
            let mut separate = SeparateOps(Recorder::new(StageFilter::default(), "cuda"));
            m.generate(&prompt, forced.len(), Some(&forced), &mut separate).unwrap();
            assert_eq!(observed.tensors.len(), separate.0.tensors.len(), "kv {kv:?} fault {fault}: different stage sets");
            for (id, t) in &separate.0.tensors {
                let got = &observed.tensors.get(id).unwrap_or_else(|| panic!("kv {kv:?} fault {fault}: {id} not observed")).tensor;
                assert_eq!(t.tensor.shape, got.shape, "kv {kv:?} fault {fault}: {id} shapes differ");
                assert_bits(&format!("kv {kv:?} fault {fault} {id}"), &t.tensor.data, &got.data);
            }
        }
    }
}

/// A whole pass (prefill, then decode steps through the GEMV) with every
/// matrix kept as blocks in the real model's mix of types, for every fault.
#[test]
fn forward_pass_on_block_weights_matches_cpu() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = block_config();
    let mut rng = ChaCha8Rng::seed_from_u64(35);
    let (f32_weights, blocks) = block_model(&cfg, &mut rng);
    let prompt: Vec<i32> = (0..11).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
    let forced: Vec<i32> = (0..4).map(|_| rng.gen_range(0..cfg.n_vocab as i32)).collect();
    for kv in [KvType::F32, KvType::F16] {
        for fault in Fault::all() {
            let opts = BackendOptions { kv_type: kv, max_ctx: MAX_CTX, dequant_bug: None };
            let cpu = CpuBackend::from_weights(cfg.clone(), f32_weights.clone(), opts).unwrap();
            let g = cuda_on_blocks(&cfg, &f32_weights, &blocks, kv);
            let worst = passes_agree(cpu, g, &cfg, fault, &prompt, &forced, kv, "blocks");
            println!("block weights kv {kv:?} fault {fault}: max |cpu - cuda| = {worst:e}");
        }
    }
}

/// ggml's activation rounding (numerics ggml) on the GPU against the host's
/// `round_like_ggml` (proved against ggml through FFI), bit for bit, on
/// rows with zeros, outliers, exact ties, subnormals, huge values and a
/// largest |x| that appears twice with both signs.
#[test]
fn ggml_rounding_on_gpu_is_bit_exact() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = configs()[1].clone();
    let (cpu, g) = backends(&cfg, KvType::F16, 41);
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let width = 512;
    let mut rows: Vec<Vec<f32>> = Vec::new();
    for scale in [1e-30f32, 1e-3, 1.0, 1e3, 1e30] {
        rows.push(rand_vec(&mut rng, width, scale));
    }
    rows.push(vec![0.0; width]);
    let mut outlier = rand_vec(&mut rng, width, 0.1);
    outlier[3] = 5000.0;
    outlier[300] = -7000.0;
    rows.push(outlier);
    // amax 127: id = 1, so x * id = x and .5 ties show the rounding.
    let mut ties: Vec<f32> = (0..width).map(|i| (i % 200) as f32 * 0.5 - 50.0).collect();
    for b in 0..width / 32 {
        ties[b * 32] = 127.0;
    }
    rows.push(ties);
    rows.push((0..width).map(|i| if i % 3 == 0 { 1e-40 } else { -3e-41 }).collect());
    let mut twice = rand_vec(&mut rng, width, 1.0);
    twice[10] = -2.0;
    twice[20] = 2.0;
    twice[266] = 4.0;
    twice[267] = -4.0;
    rows.push(twice);
    rows.push((0..width).map(|i| (i as f32 - 256.0) * 300.0).collect()); // past f16's range
    let x = Tensor::new(vec![rows.len(), width], rows.concat());
    for ty in [GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K] {
        let want = cpu.round_rows(&x, ty).unwrap();
        let got = host(&g, &g.round_rows(&on_gpu(&g, &x), ty).unwrap());
        assert_bits(&format!("round_rows {}", ty.name()), &want.data, &got.data);
        assert!(want.data != x.data, "{} rounding changed nothing", ty.name());
    }
    // Rows that are not whole blocks stay as they are, as on the host.
    let odd = rand_tensor(&mut rng, &[3, 72], 1.0);
    for ty in [GgmlType::Q8_0, GgmlType::Q8_K] {
        assert_bits(&format!("round_rows {} of 72-value rows", ty.name()), &odd.data, &host(&g, &g.round_rows(&on_gpu(&g, &odd), ty).unwrap()).data);
    }
}

/// The GEMV's tail: rows whose length is not a multiple of 8 (possible for
/// the plain types only), here F16 and F32 blocks of a [72, 97] matrix.
#[test]
fn block_gemv_ends_rows_of_odd_length() {
    let Some(_gpu) = gpu() else {
        return;
    };
    let cfg = configs()[1].clone();
    let opts = BackendOptions { kv_type: KvType::F16, max_ctx: MAX_CTX, dequant_bug: None };
    let mut rng = ChaCha8Rng::seed_from_u64(43);
    let w = Weight::FfnDown(0);
    let shape = w.shape(&cfg);
    assert_eq!(shape[1] % 8, 1, "the test needs a row length that is not a multiple of 8");
    for ty in [GgmlType::F16, GgmlType::F32, GgmlType::BF16] {
        let (cpu, g) = oracle_and_gpu_on_blocks(&cfg, ty, &[w], 44, &mut rng, opts);
        for n_tok in [1, 5] {
            let x = rand_tensor(&mut rng, &[n_tok, cfg.n_ff], 1.0);
            let a = cpu.linear(&x, w, None, WeightRead::Rows).unwrap();
            let r = host(&g, &g.linear(&on_gpu(&g, &x), w, None, WeightRead::Rows).unwrap());
            close(&format!("gemv {} rows of {} n{n_tok}", ty.name(), shape[1]), &a, &r, 1e-5, 1e-5);
        }
    }
}
