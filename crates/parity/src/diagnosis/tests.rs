//! Each pattern test on a synthetic pair of captures that carries exactly
//! its bug: the test must hold and name the bug; on the other bugs' pairs
//! it must not be the top hypothesis.

use super::*;
use crate::diff::diff_captures;
use crate::thresholds::{Comparison, Thresholds};
use capture::{CaptureConfig, CapturedTensor, Stage, Tensor};

const N_HEAD: usize = 4;
const N_HEAD_KV: usize = 2;
const HEAD_DIM: usize = 8;
const N_EMBD: usize = 32;
const N_TOK: usize = 5;
const ROPE_BASE: f64 = 1e6;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn capture(fed: &str) -> Capture {
    Capture {
        engine: "test".into(),
        config: CaptureConfig {
            kv_type: "f32".into(),
            n_layer: 2,
            n_embd: N_EMBD,
            n_head: N_HEAD,
            n_head_kv: N_HEAD_KV,
            head_dim: HEAD_DIM,
            n_ff: 16,
            n_vocab: 10,
            fed: fed.into(),
            numerics: "ggml".into(),
            ..CaptureConfig::default()
        },
        ..Capture::default()
    }
}

fn put(c: &mut Capture, id: StageId, t: &Tensor) {
    c.tensors.insert(id, CapturedTensor { tensor: t.clone(), provenance: String::new() });
}

/// A pair of captures: `shared` identical on both sides, then the stage
/// under test with each side's tensor; diagnosed with the patterns alone.
fn diagnose_pair(shared: &[(StageId, Tensor)], at: StageId, ours: Tensor, reference: Tensor) -> Diagnosis {
    let (mut o, mut r) = (capture("teacher-forced"), capture("llama.cpp"));
    for (id, t) in shared {
        put(&mut o, *id, t);
        put(&mut r, *id, t);
    }
    put(&mut o, at, &ours);
    put(&mut r, at, &reference);
    let report = diff_captures(&o, &r, &Thresholds::defaults("ggml", Comparison::TeacherForced, false), None);
    assert_eq!(report.first_divergence.map(|i| report.rows[i].id), Some(at), "the pair must diverge at {at}");
    diagnose(Tools::default(), &r, &o, &report).expect("diagnoses").expect("a divergence")
}

fn hidden(seed: u64) -> Tensor {
    Tensor::new(vec![N_TOK, N_EMBD], values(N_TOK * N_EMBD, seed))
}

fn top(d: &Diagnosis) -> Vec<&'static str> {
    d.named()
}

fn l0(stage: Stage) -> StageId {
    StageId::layer(0, 0, stage)
}

#[test]
fn a_scale_is_fitted_and_named() {
    let r = hidden(1);
    let o = Tensor::new(r.shape.clone(), r.data.iter().map(|x| x * 2.0).collect());
    let d = diagnose_pair(&[], l0(Stage::AttnOut), o, r);
    let scale = d.hypotheses.iter().find(|h| h.claim.contains("x reference")).expect("a scale hypothesis");
    assert!(scale.holds && scale.claim.contains("2.000000 x reference (2)"), "{scale:?}");
}

#[test]
fn an_offset_per_channel_points_at_a_bias() {
    let r = Tensor::new(vec![N_TOK, N_HEAD, HEAD_DIM], values(N_TOK * N_EMBD, 2));
    let bias = values(N_EMBD, 3);
    let o = Tensor::new(r.shape.clone(), r.data.iter().enumerate().map(|(i, x)| x - bias[i % N_EMBD]).collect());
    let d = diagnose_pair(&[], l0(Stage::QProj), o, r);
    assert_eq!(top(&d), vec!["no-qkv-bias"], "{}", d.headline());
    assert!(d.best().is_some_and(|h| h.claim.contains("offset per channel")));
}

#[test]
fn a_factor_per_row_at_a_norm_is_its_eps() {
    let r = hidden(4);
    let o = Tensor::new(r.shape.clone(), r.data.iter().enumerate().map(|(i, x)| x * (1.0 - 0.01 * (i / N_EMBD) as f32)).collect());
    let d = diagnose_pair(&[], l0(Stage::AttnNorm), o, r);
    assert_eq!(top(&d), vec!["rms-eps"], "{}", d.headline());
}

#[test]
fn a_factor_per_channel_at_a_norm_is_a_weight_mix_up() {
    let r = hidden(5);
    let w: Vec<f32> = values(N_EMBD, 6).iter().map(|x| 1.0 + 0.5 * x).collect();
    let o = Tensor::new(r.shape.clone(), r.data.iter().enumerate().map(|(i, x)| x * w[i % N_EMBD]).collect());
    let d = diagnose_pair(&[], l0(Stage::AttnNorm), o, r);
    assert_eq!(top(&d), vec!["norm-weight-swapped"], "{}", d.headline());
}

/// RoPE on `[tokens, heads, head_dim]`, positions from `pos0`.
fn rope(x: &[f32], n_heads: usize, pos0: usize, base: f64, neox: bool) -> Vec<f32> {
    let mut out = x.to_vec();
    let half = HEAD_DIM / 2;
    for (v, chunk) in out.chunks_mut(HEAD_DIM).enumerate() {
        let pos = (pos0 + v / n_heads) as f64;
        let src: Vec<f32> = chunk.to_vec();
        for i in 0..half {
            let theta = pos * base.powf(-2.0 * i as f64 / HEAD_DIM as f64);
            let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
            let (x0, x1) = (src[a] as f64, src[b] as f64);
            chunk[a] = (x0 * theta.cos() - x1 * theta.sin()) as f32;
            chunk[b] = (x0 * theta.sin() + x1 * theta.cos()) as f32;
        }
    }
    out
}

#[test]
fn rope_bugs_are_told_apart_by_token_0_and_the_first_frequency() {
    let q = values(N_TOK * N_EMBD, 7);
    let reference = Tensor::new(vec![N_TOK, N_HEAD, HEAD_DIM], rope(&q, N_HEAD, 0, ROPE_BASE, true));
    let cases = [
        (rope(&q, N_HEAD, 0, ROPE_BASE, false), "rope-adjacent"),
        (rope(&q, N_HEAD, 0, 1e4, true), "rope-base"),
        (rope(&q, N_HEAD, 1, ROPE_BASE, true), "rope-pos-offset"),
    ];
    for (ours, bug) in cases {
        let d = diagnose_pair(&[], l0(Stage::QRope), Tensor::new(reference.shape.clone(), ours), reference.clone());
        assert_eq!(top(&d), vec![bug], "{}", d.headline());
    }
}

/// Raw scores `[heads, tokens, tokens]` (zeros past the causal limit) with
/// q head h reading KV head `map(h)`.
fn scores(q: &[f32], k: &[f32], map: impl Fn(usize) -> usize) -> Tensor {
    let mut out = vec![0f32; N_HEAD * N_TOK * N_TOK];
    for h in 0..N_HEAD {
        for t in 0..N_TOK {
            for key in 0..=t {
                let qv = &q[(t * N_HEAD + h) * HEAD_DIM..][..HEAD_DIM];
                let kv = &k[(key * N_HEAD_KV + map(h)) * HEAD_DIM..][..HEAD_DIM];
                out[(h * N_TOK + t) * N_TOK + key] = qv.iter().zip(kv).map(|(a, b)| a * b).sum();
            }
        }
    }
    Tensor::new(vec![N_HEAD, N_TOK, N_TOK], out)
}

#[test]
fn a_gqa_head_map_is_read_off_the_scores() {
    let q = Tensor::new(vec![N_TOK, N_HEAD, HEAD_DIM], values(N_TOK * N_EMBD, 8));
    let k = Tensor::new(vec![N_TOK, N_HEAD_KV, HEAD_DIM], values(N_TOK * N_HEAD_KV * HEAD_DIM, 9));
    let group = N_HEAD / N_HEAD_KV;
    let reference = scores(&q.data, &k.data, |h| h / group);
    let ours = scores(&q.data, &k.data, |h| h % N_HEAD_KV);
    let shared = [(l0(Stage::QRope), q), (l0(Stage::KRope), k)];
    let d = diagnose_pair(&shared, l0(Stage::AttnScores), ours, reference);
    assert_eq!(top(&d), vec!["gqa-modulo"], "{}", d.headline());
    assert!(d.best().is_some_and(|h| h.claim.contains("q head 1 reads KV head 1, expected 0")), "{}", d.headline());
}

/// Softmax rows of `scale x scores`, keys up to `t + reach` visible.
fn probs(s: &Tensor, scale: f32, reach: usize) -> Tensor {
    let mut out = vec![0f32; s.data.len()];
    for (i, row) in s.data.chunks(N_TOK).enumerate() {
        let visible = ((i % N_TOK) + 1 + reach).min(N_TOK);
        let max = row[..visible].iter().map(|x| x * scale).fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row[..visible].iter().map(|x| (x * scale - max).exp()).sum();
        for k in 0..visible {
            out[i * N_TOK + k] = (row[k] * scale - max).exp() / sum;
        }
    }
    Tensor::new(s.shape.clone(), out)
}

#[test]
fn the_causal_mask_and_the_softmax_scale() {
    // Full scores (every key), as an engine without a mask would use them.
    let raw = Tensor::new(vec![N_HEAD, N_TOK, N_TOK], values(N_HEAD * N_TOK * N_TOK, 10).iter().map(|x| 4.0 * x).collect());
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let reference = probs(&raw, scale, 0);
    for (ours, bug) in [(probs(&raw, scale, 1), "mask-off-by-one"), (probs(&raw, scale, N_TOK), "mask-missing"), (probs(&raw, 1.0, 0), "no-attn-scale")] {
        let d = diagnose_pair(&[], l0(Stage::AttnProbs), ours, reference.clone());
        assert_eq!(top(&d), vec![bug], "{}", d.headline());
    }
}

#[test]
fn only_the_newest_key_wrong_in_a_decode_step_is_the_kv_cache() {
    let prefill = scores(&values(N_TOK * N_EMBD, 11), &values(N_TOK * N_HEAD_KV * HEAD_DIM, 12), |h| h / 2);
    let reference = Tensor::new(vec![N_HEAD, 1, N_TOK + 1], values(N_HEAD * (N_TOK + 1), 13));
    let mut ours = reference.clone();
    for h in 0..N_HEAD {
        ours.data[h * (N_TOK + 1) + N_TOK] = 0.0;
    }
    let d = diagnose_pair(&[(l0(Stage::AttnScores), prefill)], StageId::layer(1, 0, Stage::AttnScores), ours, reference);
    assert_eq!(top(&d), vec!["kv-offset", "kv-len-short"], "{}", d.headline());
}

#[test]
fn another_stage_s_values_name_the_residual_bugs() {
    let (attn_out, layer_in) = (hidden(14), hidden(15));
    let attn_residual = Tensor::new(attn_out.shape.clone(), attn_out.data.iter().zip(&layer_in.data).map(|(a, b)| a + b).collect());
    let ffn_down = hidden(16);
    let layer_out = Tensor::new(ffn_down.shape.clone(), ffn_down.data.iter().zip(&attn_residual.data).map(|(a, b)| a + b).collect());
    let wrong_input = Tensor::new(ffn_down.shape.clone(), ffn_down.data.iter().zip(&layer_in.data).map(|(a, b)| a + b).collect());
    let base = [(StageId::global(0, Stage::Embed), layer_in.clone()), (l0(Stage::AttnOut), attn_out.clone())];
    let d = diagnose_pair(&base, l0(Stage::AttnResidual), attn_out.clone(), attn_residual.clone());
    assert_eq!(top(&d), vec!["residual-dropped"], "{}", d.headline());
    let mut with_residual = base.to_vec();
    with_residual.push((l0(Stage::AttnResidual), attn_residual));
    with_residual.push((l0(Stage::FfnDown), ffn_down));
    let d = diagnose_pair(&with_residual, l0(Stage::LayerOut), wrong_input, layer_out.clone());
    assert_eq!(top(&d), vec!["residual-wrong-input"], "{}", d.headline());
    // final_norm equal to the last layer's output: the norm skipped.
    let last = StageId::layer(0, 1, Stage::LayerOut);
    let normed = hidden(17);
    let d = diagnose_pair(&[(last, layer_out.clone())], StageId::global(0, Stage::FinalNorm), layer_out, normed);
    assert_eq!(top(&d), vec!["final-norm-skipped"], "{}", d.headline());
}

#[test]
fn a_transpose_and_a_head_permutation_are_seen_as_layouts() {
    let r = Tensor::new(vec![N_TOK, N_HEAD, HEAD_DIM], values(N_TOK * N_EMBD, 18));
    // [head, token, dim] stored where [token, head, dim] belongs.
    let mut transposed = Vec::new();
    for h in 0..N_HEAD {
        for t in 0..N_TOK {
            transposed.extend_from_slice(&r.data[(t * N_HEAD + h) * HEAD_DIM..][..HEAD_DIM]);
        }
    }
    let d = diagnose_pair(&[], l0(Stage::AttnCtx), Tensor::new(r.shape.clone(), transposed), r.clone());
    let h = d.hypotheses.iter().find(|h| h.claim.contains("laid out as [head, token, dim]")).expect("a transpose found");
    assert!(h.holds);
    // Heads 1 and 2 swapped.
    let mut swapped = r.data.clone();
    for t in 0..N_TOK {
        for e in 0..HEAD_DIM {
            swapped.swap((t * N_HEAD + 1) * HEAD_DIM + e, (t * N_HEAD + 2) * HEAD_DIM + e);
        }
    }
    let d = diagnose_pair(&[], l0(Stage::AttnCtx), Tensor::new(r.shape.clone(), swapped), r);
    assert!(d.hypotheses.iter().any(|h| h.holds && h.claim.contains("our head 1 = reference head 2")), "{:?}", d.hypotheses);
}

#[test]
fn a_channel_permutation_is_mapped() {
    let r = hidden(21);
    // The two halves of every row swapped (a rotate-half written as a copy).
    let mut o = r.clone();
    for row in o.data.chunks_mut(N_EMBD) {
        row.rotate_left(N_EMBD / 2);
    }
    let d = diagnose_pair(&[], l0(Stage::AttnOut), o, r);
    assert!(d.hypotheses.iter().any(|h| h.holds && h.claim.contains("32 of 32 moved): our channel 0 = reference channel 16")), "{:?}", d.hypotheses);
}

#[test]
fn nan_is_reported_where_it_first_appears_and_evidence_names_the_head() {
    let r = Tensor::new(vec![N_TOK, N_HEAD, HEAD_DIM], values(N_TOK * N_EMBD, 19));
    let mut o = r.clone();
    // Head 2 of every token wrong.
    for t in 0..N_TOK {
        for e in 0..HEAD_DIM {
            o.data[(t * N_HEAD + 2) * HEAD_DIM + e] += 0.3 * ((e + t) as f32).sin();
        }
    }
    let d = diagnose_pair(&[], l0(Stage::AttnCtx), o.clone(), r.clone());
    assert!(d.evidence.contains("error by head: head 2 100%"), "{}", d.evidence);
    o.data[2 * N_EMBD + 9] = f32::NAN;
    let d = diagnose_pair(&[], l0(Stage::AttnCtx), o, r);
    assert!(d.hypotheses[0].claim.contains("the first at token 2, head 1, dim 1"), "{}", d.headline());
}

#[test]
fn replays_rank_before_patterns_and_specific_before_generic() {
    let h = |claim: &str, holds, kind, explains: &[&'static str], figure| Hypothesis { claim: claim.into(), test: String::new(), figure, holds, kind, explains: explains.to_vec() };
    let mut d = Diagnosis {
        at: l0(Stage::QRope),
        hypotheses: vec![
            h("generic", true, Kind::Pattern, &[], 0.0),
            h("rotation", true, Kind::Pattern, &["rope-adjacent", "rope-base"], 1e-7),
            h("replay that fails", false, Kind::Replay, &["rope-base"], 0.5),
            h("replay", true, Kind::Replay, &["rope-adjacent"], 2e-7),
        ],
        evidence: String::new(),
        attribution: None,
    };
    d.sort();
    let order: Vec<&str> = d.hypotheses.iter().map(|h| h.claim.as_str()).collect();
    assert_eq!(order, ["replay", "rotation", "generic", "replay that fails"]);
    assert_eq!(d.named(), vec!["rope-adjacent"]);
    assert!(d.headline().contains("patterns: rotation; generic"), "{}", d.headline());
}

#[test]
fn every_name_the_patterns_give_is_a_catalogue_fault() {
    for name in NAMED_BY_PATTERNS {
        assert!(engine::fault::Fault::parse(name).is_some(), "{name} is not in the fault catalogue");
    }
}
