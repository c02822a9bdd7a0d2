//! The comparison core on hand-made tensors and synthetic captures:
//! metrics, alignment, localization, thresholds and the reports.

use capture::{Capture, CaptureConfig, CapturedTensor, Tensor};
use capture::stage::{Stage, StageId};
use parity::diff::{diff_captures, Verdict};
use parity::metrics::{compare, compare_logits};
use parity::report::{render_html, render_json, render_markdown, render_terminal};
use parity::thresholds::{calibrate, Thresholds};

const N_LAYER: usize = 2;
const T: usize = 3; // tokens
const EMBD: usize = 8;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 4;
const FF: usize = 12;
const VOCAB: usize = 10;

fn shape_of(stage: Stage) -> Vec<usize> {
    match stage {
        Stage::QProj | Stage::QRope | Stage::AttnCtx => vec![T, HEADS, HEAD_DIM],
        Stage::KProj | Stage::VProj | Stage::KRope => vec![T, KV_HEADS, HEAD_DIM],
        Stage::AttnScores | Stage::AttnProbs => vec![HEADS, T, T],
        Stage::FfnGate | Stage::FfnUp | Stage::FfnAct => vec![T, FF],
        Stage::Logits => vec![T, VOCAB],
        _ => vec![T, EMBD],
    }
}

/// Deterministic values in [-1, 1), different per stage.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn synthetic(engine: &str) -> Capture {
    let mut c = Capture {
        engine: engine.into(),
        model_sha256: "ab".repeat(32),
        prompt: "hello <world> & \"friends\"".into(),
        tokens: vec![1, 2, 3],
        config: CaptureConfig {
            kv_type: "f32".into(),
            n_layer: N_LAYER,
            n_embd: EMBD,
            n_head: HEADS,
            n_head_kv: KV_HEADS,
            head_dim: HEAD_DIM,
            n_ff: FF,
            n_vocab: VOCAB,
            ..Default::default()
        },
        ..Default::default()
    };
    for (k, id) in StageId::all_in_step(0, N_LAYER).into_iter().enumerate() {
        let shape = shape_of(id.stage);
        let n = shape.iter().product();
        c.tensors.insert(
            id,
            CapturedTensor { tensor: Tensor::new(shape, values(k as u64 + 1, n)), provenance: format!("{engine}:{id}") },
        );
    }
    c
}

fn map(c: &mut Capture, id: StageId, f: impl Fn(usize, f32) -> f32) {
    let t = &mut c.tensors.get_mut(&id).expect("stage present").tensor;
    for (i, v) in t.data.iter_mut().enumerate() {
        *v = f(i, *v);
    }
}

// ---------------------------------------------------------------- metrics

#[test]
fn metrics_known_values_and_worst_coords() {
    let reference = Tensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let ours = Tensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.5, 6.0]);
    let m = compare(Stage::AttnNorm, &ours, &reference).unwrap();
    assert_eq!(m.n, 6);
    assert_eq!(m.non_finite, 0);
    assert!((m.max_abs - 0.5).abs() < 1e-12);
    assert!((m.mean_abs - 0.5 / 6.0).abs() < 1e-12);
    let ref_sq: f64 = 91.0;
    assert!((m.rel_l2 - 0.5 / ref_sq.sqrt()).abs() < 1e-12);
    assert!((m.nmse - 0.25 / ref_sq).abs() < 1e-12);
    let ours_sq: f64 = 91.0 - 25.0 + 30.25;
    let dot: f64 = 91.0 - 25.0 + 27.5;
    assert!((m.cosine - dot / (ours_sq.sqrt() * ref_sq.sqrt())).abs() < 1e-12);
    assert_eq!(m.ref_max_abs, 6.0);
    let w = m.worst.unwrap();
    assert_eq!(w.flat_index, 4);
    assert_eq!(w.index, vec![1, 1]);
    assert_eq!(w.coords, "token 1, dim 1");
    assert_eq!((w.ours, w.reference), (5.5, 5.0));
}

#[test]
fn metrics_identical_and_cosine_extremes() {
    let a = Tensor::new(vec![1, 2], vec![1.0, 0.0]);
    let m = compare(Stage::Embed, &a, &a).unwrap();
    assert_eq!((m.max_abs, m.rel_l2, m.nmse, m.cosine), (0.0, 0.0, 0.0, 1.0));
    let b = Tensor::new(vec![1, 2], vec![0.0, 1.0]);
    assert!(compare(Stage::Embed, &a, &b).unwrap().cosine.abs() < 1e-12);
    let c = Tensor::new(vec![1, 2], vec![-1.0, 0.0]);
    let m = compare(Stage::Embed, &c, &a).unwrap();
    assert!((m.cosine + 1.0).abs() < 1e-12);
    assert!((m.rel_l2 - 2.0).abs() < 1e-12);
}

#[test]
fn metrics_accept_split_inner_dims_and_report_canonical_shape() {
    // q_proj: [tokens, n_embd] in one engine, [tokens, heads, head_dim] in the other.
    let flat = Tensor::new(vec![2, 6], (0..12).map(|i| i as f32).collect());
    let mut split = Tensor::new(vec![2, 2, 3], (0..12).map(|i| i as f32).collect());
    split.data[11] += 1.0;
    for (ours, reference) in [(&flat, &split), (&split, &flat)] {
        let m = compare(Stage::QProj, ours, reference).unwrap();
        assert_eq!(m.shape, vec![2, 2, 3]);
        let w = m.worst.unwrap();
        assert_eq!(w.index, vec![1, 1, 2]);
        assert_eq!(w.coords, "token 1, head 1, dim 2");
    }
    // Same count, different leading dim: refused.
    let other = Tensor::new(vec![3, 4], vec![0.0; 12]);
    assert!(compare(Stage::QProj, &flat, &other).is_err());
    // Different counts: refused.
    let short = Tensor::new(vec![2, 5], vec![0.0; 10]);
    assert!(compare(Stage::QProj, &flat, &short).is_err());
}

#[test]
fn metrics_attention_and_ffn_coords() {
    let r = Tensor::new(vec![2, 3, 3], vec![0.0; 18]);
    let mut o = r.clone();
    o.data[3 * 3 + 2 * 3 + 1] = 0.25; // head 1, query 2, key 1
    let m = compare(Stage::AttnProbs, &o, &r).unwrap();
    assert_eq!(m.worst.unwrap().coords, "head 1, query 2, key 1");
    assert_eq!(m.rel_l2, f64::INFINITY, "reference is zero, ours is not");
    let r = Tensor::new(vec![2, 5], vec![1.0; 10]);
    let mut o = r.clone();
    o.data[7] = 0.0;
    assert_eq!(compare(Stage::FfnAct, &o, &r).unwrap().worst.unwrap().coords, "token 1, unit 2");
    assert_eq!(compare(Stage::Logits, &o, &r).unwrap().worst.unwrap().coords, "token 1, vocab 2");
}

#[test]
fn metrics_nan_and_inf_never_pass() {
    let r = Tensor::new(vec![1, 4], vec![1.0, 2.0, 3.0, 4.0]);
    let mut o = r.clone();
    o.data[2] = f32::NAN;
    let m = compare(Stage::FfnDown, &o, &r).unwrap();
    assert_eq!(m.non_finite, 1);
    assert_eq!(m.max_abs, f64::INFINITY);
    assert_eq!(m.worst.as_ref().unwrap().flat_index, 2);
    assert!(m.worst.unwrap().ours.is_nan());
    // Inf on the reference side counts too.
    let mut r2 = r.clone();
    r2.data[0] = f32::INFINITY;
    let m = compare(Stage::FfnDown, &r, &r2).unwrap();
    assert_eq!((m.non_finite, m.max_abs), (1, f64::INFINITY));

    // And in a diff, even a huge threshold does not let it pass.
    let reference = synthetic("llama.cpp");
    let mut ours = synthetic("ours-cpu");
    map(&mut ours, StageId::layer(0, 1, Stage::FfnGate), |i, v| if i == 5 { f32::INFINITY } else { v });
    let r = diff_captures(&ours, &reference, &Thresholds::uniform(1e30), None);
    assert_eq!(r.verdict, Verdict::Diverged);
    assert_eq!(r.rows[r.first_divergence.unwrap()].id, StageId::layer(0, 1, Stage::FfnGate));
}

#[test]
fn logits_top1_and_kl() {
    let reference = Tensor::new(vec![2, 2], vec![0.0, 1.0, 2.0, 0.0]);
    let m = compare_logits(&reference, &reference).unwrap();
    assert_eq!((m.top1_agree, m.rows), (2, 2));
    assert!(m.kl_max.abs() < 1e-15);
    // Row 1's argmax flips.
    let ours = Tensor::new(vec![2, 2], vec![0.0, 1.0, 0.0, 2.0]);
    let m = compare_logits(&ours, &reference).unwrap();
    assert_eq!(m.top1_agree, 1);
    // KL(p || q) with p = softmax(2, 0), q = softmax(0, 2).
    let p1 = 1.0 / (1.0 + (-2f64).exp());
    let (p, q) = ([p1, 1.0 - p1], [1.0 - p1, p1]);
    let kl: f64 = p.iter().zip(q).map(|(a, b)| a * (a / b).ln()).sum();
    assert!((m.kl_max - kl).abs() < 1e-12, "{} vs {kl}", m.kl_max);
    assert!((m.kl_mean - kl / 2.0).abs() < 1e-12);
    let bad = Tensor::new(vec![2, 2], vec![f32::NAN, 1.0, 2.0, 0.0]);
    assert_eq!(compare_logits(&bad, &reference).unwrap().kl_max, f64::INFINITY);
    assert!(compare_logits(&Tensor::new(vec![1, 4], vec![0.0; 4]), &reference).is_err());
}

// ---------------------------------------------------------------- alignment and localization

#[test]
fn identical_captures_match() {
    let c = synthetic("x");
    let r = diff_captures(&c, &c, &Thresholds::uniform(1e-6), None);
    assert_eq!(r.verdict, Verdict::Match);
    assert_eq!(r.rows.len(), 3 + N_LAYER * 17);
    assert!(r.first_divergence.is_none() && r.missing.is_empty());
    assert_eq!(r.logits.len(), 1);
    // Rows come in execution order.
    let ids: Vec<_> = r.rows.iter().map(|x| x.id).collect();
    assert_eq!(ids, StageId::all_in_step(0, N_LAYER));
}

#[test]
fn first_divergence_is_first_in_execution_order_not_the_largest() {
    let reference = synthetic("llama.cpp");
    let mut ours = synthetic("ours-cpu");
    map(&mut ours, StageId::layer(0, 0, Stage::QRope), |i, v| if i == 7 { v + 0.01 } else { v });
    map(&mut ours, StageId::layer(0, 1, Stage::FfnDown), |_, v| v + 10.0);
    let r = diff_captures(&ours, &reference, &Thresholds::uniform(1e-3), None);
    assert_eq!(r.verdict, Verdict::Diverged);
    let first = &r.rows[r.first_divergence.unwrap()];
    assert_eq!(first.id, StageId::layer(0, 0, Stage::QRope));
    assert!(!first.pass);
    assert_eq!(r.n_failed(), 2);
    // flat 7 in [3, 2, 4] = token 0, head 1, dim 3
    assert_eq!(first.metrics.worst.as_ref().unwrap().coords, "token 0, head 1, dim 3");
    let text = render_terminal(&r, None);
    assert!(text.contains("FIRST DIVERGENCE: prefill, layer 0, q_rope: max-abs 1.0e-2 > 1.0e-3"), "{text}");
    assert!(text.contains("look at: RoPE"), "{text}");
    assert!(text.contains("largest jump:"), "{text}");
}

#[test]
fn filter_restricts_the_comparison() {
    let reference = synthetic("llama.cpp");
    let mut ours = synthetic("ours-cpu");
    map(&mut ours, StageId::layer(0, 1, Stage::FfnDown), |_, v| v + 10.0);
    let only0 = |id: &StageId| id.layer == Some(0);
    let r = diff_captures(&ours, &reference, &Thresholds::uniform(1e-3), Some(&only0));
    assert_eq!(r.verdict, Verdict::Match);
    assert_eq!(r.rows.len(), 17);
    let only1 = |id: &StageId| id.layer == Some(1);
    let r = diff_captures(&ours, &reference, &Thresholds::uniform(1e-3), Some(&only1));
    assert_eq!(r.verdict, Verdict::Diverged);
    let text = render_terminal(&r, Some(&[1]));
    assert!(text.contains("prefill, layer 1"), "{text}");
    assert!(text.contains("FAIL"), "{text}");
}

#[test]
fn missing_stage_diverges_unavailable_does_not() {
    let reference = synthetic("llama.cpp");
    let mut ours = synthetic("ours-cpu");
    let id = StageId::layer(0, 1, Stage::AttnProbs);
    ours.tensors.remove(&id);
    let r = diff_captures(&ours, &reference, &Thresholds::uniform(1.0), None);
    assert_eq!(r.verdict, Verdict::Diverged);
    assert_eq!(r.missing, vec![(id, "ours".to_string())]);
    assert!(r.first_divergence.is_none(), "no row fails, the missing stage is the divergence");
    let text = render_terminal(&r, None);
    assert!(text.contains("FIRST DIVERGENCE: prefill, layer 1, attn_probs: missing in ours"), "{text}");
    // Reported the other way round too.
    let r = diff_captures(&reference, &ours, &Thresholds::uniform(1.0), None);
    assert_eq!(r.missing, vec![(id, "reference".to_string())]);

    // Declared unobservable (flash attention): not a divergence.
    ours.unavailable.push(id);
    let r = diff_captures(&ours, &reference, &Thresholds::uniform(1.0), None);
    assert_eq!(r.verdict, Verdict::Match);
    assert_eq!(r.unavailable, vec![id]);
    assert!(r.missing.is_empty());
}

#[test]
fn shape_mismatch_diverges() {
    let reference = synthetic("llama.cpp");
    let mut ours = synthetic("ours-cpu");
    let id = StageId::layer(0, 0, Stage::FfnUp);
    ours.tensors.get_mut(&id).unwrap().tensor = Tensor::new(vec![T, FF - 1], vec![0.0; T * (FF - 1)]);
    let r = diff_captures(&ours, &reference, &Thresholds::uniform(1.0), None);
    assert_eq!(r.verdict, Verdict::Diverged);
    assert_eq!(r.shape_mismatch.len(), 1);
    assert_eq!(r.shape_mismatch[0].0, id);
}

#[test]
fn input_map() {
    let l = |layer, s| StageId::layer(0, layer, s);
    let g = |s| StageId::global(0, s);
    assert_eq!(l(0, Stage::AttnNorm).inputs(4), vec![g(Stage::Embed)]);
    assert_eq!(l(2, Stage::AttnNorm).inputs(4), vec![l(1, Stage::LayerOut)]);
    assert_eq!(l(2, Stage::KProj).inputs(4), vec![l(2, Stage::AttnNorm)]);
    assert_eq!(l(2, Stage::KRope).inputs(4), vec![l(2, Stage::KProj)]);
    assert_eq!(l(2, Stage::AttnScores).inputs(4), vec![l(2, Stage::QRope), l(2, Stage::KRope)]);
    assert_eq!(l(2, Stage::AttnCtx).inputs(4), vec![l(2, Stage::AttnProbs), l(2, Stage::VProj)]);
    assert_eq!(l(2, Stage::AttnResidual).inputs(4), vec![l(2, Stage::AttnOut), l(1, Stage::LayerOut)]);
    assert_eq!(l(0, Stage::AttnResidual).inputs(4), vec![l(0, Stage::AttnOut), g(Stage::Embed)]);
    assert_eq!(l(2, Stage::FfnAct).inputs(4), vec![l(2, Stage::FfnGate), l(2, Stage::FfnUp)]);
    assert_eq!(l(2, Stage::LayerOut).inputs(4), vec![l(2, Stage::AttnResidual), l(2, Stage::FfnDown)]);
    assert_eq!(g(Stage::FinalNorm).inputs(4), vec![l(3, Stage::LayerOut)]);
    assert_eq!(g(Stage::Logits).inputs(4), vec![g(Stage::FinalNorm)]);
    assert!(g(Stage::Embed).inputs(4).is_empty());
    // Every per-layer stage's inputs precede it in execution order.
    for id in StageId::all_in_step(3, 4) {
        for input in id.inputs(4) {
            assert!(input < id, "{input} should precede {id}");
            assert_eq!(input.step, 3);
        }
    }
}

/// Error injected at layer 0 attn_out propagates downstream (same relative
/// error everywhere after it, with larger absolute values in layer 1): the
/// largest jump is attn_out, while the largest max-abs is in layer 1.
#[test]
fn largest_jump_finds_the_injection_point() {
    let mut reference = synthetic("llama.cpp");
    for id in StageId::all_in_step(0, N_LAYER) {
        if id.layer == Some(1) {
            map(&mut reference, id, |_, v| v * 100.0);
        }
    }
    let mut ours = reference.clone();
    ours.engine = "ours-cpu".into();
    let injected = StageId::layer(0, 0, Stage::AttnOut);
    for id in StageId::all_in_step(0, N_LAYER) {
        // Tiny noise everywhere, 10% relative error from the injection point on.
        let e = if id >= injected { 0.1 } else { 1e-6 };
        map(&mut ours, id, |_, v| v * (1.0 + e));
    }
    let r = diff_captures(&ours, &reference, &Thresholds::uniform(1e9), None);
    assert_eq!(r.verdict, Verdict::Match, "the huge threshold lets everything pass");
    let jump = &r.rows[r.largest_jump.unwrap()];
    assert_eq!(jump.id, injected);
    assert_eq!(jump.jump_from, Some(StageId::layer(0, 0, Stage::AttnCtx)));
    assert!(jump.jump.unwrap() > 100.0);
    let biggest = r.rows.iter().max_by(|a, b| a.metrics.max_abs.total_cmp(&b.metrics.max_abs)).unwrap();
    assert_eq!(biggest.id.layer, Some(1));
    // Downstream stages inherit the error: ratio about 1.
    let after = r.rows.iter().find(|x| x.id == StageId::layer(0, 1, Stage::AttnNorm)).unwrap();
    assert!(after.jump.unwrap() < 1.01);
}

#[test]
fn largest_jump_skips_unavailable_inputs() {
    // attn_probs unavailable (flash attention): attn_ctx falls back to the inputs of attn_probs.
    let mut reference = synthetic("llama.cpp");
    let mut ours = synthetic("ours-cpu");
    for c in [&mut reference, &mut ours] {
        for l in 0..N_LAYER {
            for s in [Stage::AttnScores, Stage::AttnProbs] {
                c.tensors.remove(&StageId::layer(0, l, s));
                c.unavailable.push(StageId::layer(0, l, s));
            }
        }
    }
    map(&mut ours, StageId::layer(0, 1, Stage::QRope), |_, v| v * 1.5);
    let r = diff_captures(&ours, &reference, &Thresholds::uniform(1e9), None);
    let ctx = r.rows.iter().find(|x| x.id == StageId::layer(0, 1, Stage::AttnCtx)).unwrap();
    // Through the unavailable attn_probs and attn_scores to q_rope and k_rope.
    assert_eq!(ctx.jump_from, Some(StageId::layer(0, 1, Stage::QRope)));
    assert_eq!(r.rows[r.largest_jump.unwrap()].id, StageId::layer(0, 1, Stage::QRope));
    assert_eq!(r.unavailable.len(), 2 * N_LAYER);
}

// ---------------------------------------------------------------- thresholds

#[test]
fn thresholds_calibrate_save_load_round_trip() {
    let l = |layer, s| StageId::layer(0, layer, s);
    let observed = vec![
        (l(0, Stage::AttnNorm), 1e-5),
        (StageId::layer(3, 0, Stage::AttnNorm), 2e-5), // a decode step of another prompt
        (l(1, Stage::AttnNorm), 1e-4),
        (l(1, Stage::AttnNorm), f64::NAN), // ignored
        (l(0, Stage::QRope), 0.0),         // floor
        (StageId::global(0, Stage::Logits), 0.05),
        (StageId::global(1, Stage::Logits), 0.02),
    ];
    let mut t = calibrate(&observed, 4.0, 1e-6, 3);
    let attn = &t.stages["attn_norm"];
    assert!((attn.default - 4e-4).abs() < 1e-15);
    let per_layer = attn.per_layer.as_ref().unwrap();
    assert_eq!(per_layer.len(), 3);
    assert!((per_layer[0] - 8e-5).abs() < 1e-15);
    assert!((per_layer[1] - 4e-4).abs() < 1e-15);
    assert_eq!(per_layer[2], attn.default, "unobserved layer gets the stage default");
    assert_eq!(t.stages["q_rope"].default, 1e-6);
    assert!(t.stages["logits"].per_layer.is_none());
    assert!((t.for_stage(&StageId::global(2, Stage::Logits)).unwrap() - 0.2).abs() < 1e-15);
    assert!((t.for_stage(&StageId::layer(5, 0, Stage::AttnNorm)).unwrap() - 8e-5).abs() < 1e-15);
    assert_eq!(t.for_stage(&StageId::layer(0, 7, Stage::AttnNorm)), Some(attn.default), "beyond per_layer: default");
    assert_eq!(t.for_stage(&l(0, Stage::FfnUp)), None);
    assert_eq!(t.created_by, "parity calibrate");

    t.model_sha256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32".into();
    t.backend = "cpu".into();
    t.kv_type = "f16".into();
    t.prompts = 2;
    t.logits_kl_max = Some(1e-3);
    let dir = tempfile::tempdir().unwrap();
    let path = Thresholds::default_path(dir.path(), &t.model_sha256, &t.backend);
    assert_eq!(path, dir.path().join("thresholds/1d9614638d18024d-cpu.json"));
    t.save(&path).unwrap();
    let back = Thresholds::load(&path).unwrap();
    assert_eq!(back.source, path.display().to_string());
    let mut t2 = t.clone();
    t2.source = back.source.clone();
    assert_eq!(back, t2);
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for key in ["model_sha256", "backend", "kv_type", "safety_factor", "prompts", "created_by", "stages", "logits_kl_max"] {
        assert!(raw.get(key).is_some(), "{key}");
    }
    assert!(raw["stages"]["logits"]["per_layer"].is_null());

    // Invalid files are refused.
    let bad = dir.path().join("bad.json");
    let mut v = raw.clone();
    v["stages"]["attn_norm"]["default"] = serde_json::json!(-1.0);
    std::fs::write(&bad, v.to_string()).unwrap();
    assert!(Thresholds::load(&bad).is_err());
    let mut v = raw.clone();
    v["stages"]["not_a_stage"] = serde_json::json!({"default": 1.0, "per_layer": null});
    std::fs::write(&bad, v.to_string()).unwrap();
    assert!(Thresholds::load(&bad).is_err());
    assert!(Thresholds::load(&dir.path().join("absent.json")).is_err());
}

#[test]
fn per_layer_thresholds_gate_per_layer() {
    let reference = synthetic("llama.cpp");
    let mut ours = synthetic("ours-cpu");
    // Same error in both layers' attn_norm: layer 0's threshold is tight, layer 1's loose.
    for l in 0..N_LAYER {
        map(&mut ours, StageId::layer(0, l, Stage::AttnNorm), |i, v| if i == 0 { v + 1e-3 } else { v });
    }
    let observed: Vec<(StageId, f64)> = StageId::all_in_step(0, N_LAYER)
        .into_iter()
        .map(|id| (id, if id == StageId::layer(0, 1, Stage::AttnNorm) { 1e-3 } else { 1e-5 }))
        .collect();
    let t = calibrate(&observed, 2.0, 1e-7, N_LAYER);
    let r = diff_captures(&ours, &reference, &t, None);
    let failed: Vec<_> = r.rows.iter().filter(|x| !x.pass).map(|x| x.id).collect();
    assert_eq!(failed, vec![StageId::layer(0, 0, Stage::AttnNorm)]);
}

#[test]
fn logits_kl_gate() {
    let reference = synthetic("llama.cpp");
    let mut ours = synthetic("ours-cpu");
    map(&mut ours, StageId::global(0, Stage::Logits), |i, v| if i == 0 { v + 0.5 } else { v });
    let mut t = Thresholds::uniform(1.0);
    let r = diff_captures(&ours, &reference, &t, None);
    assert_eq!(r.verdict, Verdict::Match);
    t.logits_kl_max = Some(1e-9);
    let r = diff_captures(&ours, &reference, &t, None);
    assert_eq!(r.verdict, Verdict::Diverged);
    assert!(render_terminal(&r, None).contains("FIRST DIVERGENCE: prefill, logits: KL max"));
}

// ---------------------------------------------------------------- reports

fn diverged_report() -> parity::diff::DiffReport {
    let reference = synthetic("llama.cpp");
    let mut ours = synthetic("ours-cpu");
    map(&mut ours, StageId::layer(0, 1, Stage::VProj), |i, v| if i == 2 { v + 0.3 } else { v });
    map(&mut ours, StageId::layer(0, 1, Stage::FfnUp), |i, v| if i == 1 { f32::NAN } else { v });
    ours.tensors.remove(&StageId::global(0, Stage::FinalNorm));
    diff_captures(&ours, &reference, &Thresholds::uniform(1e-3), None)
}

#[test]
fn json_report_has_the_required_keys() {
    let r = diverged_report();
    let v = render_json(&r);
    for key in [
        "verdict",
        "first_divergence",
        "largest_jump",
        "stages",
        "logits",
        "missing",
        "unavailable",
        "prompt",
        "tokens",
        "model_sha256",
        "kv_type",
        "engines",
        "thresholds_source",
    ] {
        assert!(v.get(key).is_some(), "missing key {key}");
    }
    assert_eq!(v["verdict"], "diverged");
    let fd = &v["first_divergence"];
    assert_eq!((fd["step"].as_u64(), fd["layer"].as_u64(), fd["stage"].as_str()), (Some(0), Some(1), Some("v_proj")));
    assert!((fd["max_abs"].as_f64().unwrap() - 0.3).abs() < 1e-6);
    assert_eq!(fd["threshold"].as_f64(), Some(1e-3));
    let stages = v["stages"].as_array().unwrap();
    assert_eq!(stages.len(), r.rows.len());
    for key in ["step", "layer", "stage", "max_abs", "mean_abs", "rel_l2", "cosine", "nmse", "threshold", "pass", "worst"] {
        assert!(stages[0].get(key).is_some(), "stage key {key}");
    }
    assert!(stages[0]["layer"].is_null(), "embed is global");
    let nan_row = stages.iter().find(|s| s["stage"] == "ffn_up" && s["layer"] == 1).unwrap();
    assert_eq!(nan_row["max_abs"], "inf");
    assert_eq!(nan_row["pass"], false);
    assert_eq!(v["missing"][0]["stage"], "final_norm");
    assert_eq!(v["missing"][0]["missing_in"], "ours");
    assert_eq!(v["engines"]["ours"], "ours-cpu");
    // Serializes as valid JSON text.
    let text = serde_json::to_string(&v).unwrap();
    assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());

    let c = synthetic("x");
    let v = render_json(&diff_captures(&c, &c, &Thresholds::uniform(1e-6), None));
    assert_eq!(v["verdict"], "match");
    assert!(v["first_divergence"].is_null());
}

#[test]
fn html_is_self_contained_with_svg() {
    let r = diverged_report();
    let html = render_html(&r);
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.matches("<svg").count() >= 2, "heatmap and at least one line chart");
    assert!(html.contains("<polyline"));
    assert!(html.contains("FIRST DIVERGENCE: prefill, layer 1, v_proj"));
    assert!(html.contains("hello &lt;world&gt; &amp;"), "prompt is escaped");
    assert!(!html.contains("<world>"));
    for external in ["<script", "<link", "src=", "url("] {
        assert!(!html.contains(external), "self-contained: {external}");
    }
    // Links only within the page.
    assert_eq!(html.matches("href=\"").count(), html.matches("href=\"#").count());
    assert!(html.trim_end().ends_with("</html>"));
}

/// The diverged report with its drill-down, as `parity diff` and `run` make it.
fn drilled_report() -> parity::diff::DiffReport {
    let reference = synthetic("llama.cpp");
    let mut ours = synthetic("ours-cpu");
    // k_rope of layer 1, token 2 only: off by 0.3 in one element.
    map(&mut ours, StageId::layer(0, 1, Stage::KRope), |i, v| if i == 2 * HEAD_DIM + 1 { v + 0.3 } else { v });
    let mut r = diff_captures(&ours, &reference, &Thresholds::uniform(1e-3), None);
    parity::drilldown::attach(&mut r, &ours, &reference);
    r
}

#[test]
fn drilldown_covers_the_first_divergence_and_its_inputs() {
    let r = drilled_report();
    let chosen: Vec<(StageId, &str)> = r.drilldowns.iter().map(|d| (d.id, d.why.as_str())).collect();
    assert_eq!(chosen[0], (StageId::layer(0, 1, Stage::KRope), "first divergence"));
    assert_eq!(chosen[1], (StageId::layer(0, 1, Stage::KProj), "input of the first divergence"));
    assert!(chosen.len() <= parity::drilldown::MAX_STAGES);
    let first = &r.drilldowns[0];
    assert_eq!(first.worst[0].coords, "token 2, head 0, dim 1");
    assert_eq!((first.worst[0].position, first.worst[0].token_id), (Some(2), Some(3)), "prompt tokens [1, 2, 3]");
    let tokens: Vec<bool> = first.per_token.iter().map(|g| g.max_abs > 0.0).collect();
    assert_eq!(tokens, vec![false, false, true], "only token 2");

    let v = render_json(&r);
    let d = &v["drilldowns"][0];
    assert_eq!((d["stage"].as_str(), d["layer"].as_u64(), d["why"].as_str()), (Some("k_rope"), Some(1), Some("first divergence")));
    assert_eq!(d["worst"][0]["coords"], "token 2, head 0, dim 1");
    assert_eq!(d["per_head"].as_array().unwrap().len(), KV_HEADS);
    assert_eq!(d["histogram"].as_array().unwrap().iter().map(|b| b["count"].as_u64().unwrap()).sum::<u64>(), (T * KV_HEADS * HEAD_DIM) as u64);

    // A match still drills into the stages nearest their gates, each once.
    let c = synthetic("x");
    let mut m = diff_captures(&c, &c, &Thresholds::uniform(1e-6), None);
    parity::drilldown::attach(&mut m, &c, &c);
    assert_eq!(m.drilldowns.len(), parity::drilldown::NEAREST_GATE);
    assert!(m.drilldowns.iter().all(|d| d.why == "nearest its gate"));
}

#[test]
fn drilldown_keeps_nan_honest() {
    // v_proj diverges first; ffn_up holds a NaN: infinitely over its gate.
    let reference = synthetic("llama.cpp");
    let mut ours = synthetic("ours-cpu");
    map(&mut ours, StageId::layer(0, 1, Stage::VProj), |i, v| if i == 2 { v + 0.3 } else { v });
    map(&mut ours, StageId::layer(0, 1, Stage::FfnUp), |i, v| if i == 1 { f32::NAN } else { v });
    let mut r = diff_captures(&ours, &reference, &Thresholds::uniform(1e-3), None);
    parity::drilldown::attach(&mut r, &ours, &reference);
    let nan = r.drilldowns.iter().find(|d| d.id == StageId::layer(0, 1, Stage::FfnUp)).expect("the NaN stage is drilled");
    assert_eq!(nan.why, "over its gate");
    assert!(nan.worst[0].ours.is_nan() && nan.worst[0].abs_diff.is_infinite());
    let v = render_json(&r);
    let d = v["drilldowns"].as_array().unwrap().iter().find(|d| d["stage"] == "ffn_up").unwrap();
    assert_eq!((d["worst"][0]["ours"].as_str(), d["worst"][0]["abs_diff"].as_str()), (Some("nan"), Some("inf")));
    assert_eq!(d["per_token"][0]["rel_l2"], "inf");
    let html = render_html(&r);
    assert!(html.contains("<td class=\"fail\">inf (NaN/Inf)</td>"));
    assert!(html.contains("NaN/Inf: 1 elements"), "its own histogram bin");
    assert!(html.contains(">∞</text>"), "a full bar, never a small one");
}

#[test]
fn html_marks_the_first_divergence_and_draws_the_drilldown() {
    let r = drilled_report();
    let html = render_html(&r);
    // One heatmap cell per (layer, stage) and per global stage.
    assert_eq!(html.matches("class=\"cell\"").count(), N_LAYER * Stage::PER_LAYER.len() + Stage::GLOBAL.len());
    assert_eq!(html.matches("data-first-divergence=\"true\"").count(), 1);
    assert!(html.contains(r#"data-step="0" data-layer="1" data-stage="k_rope" id="first-divergence-cell""#));
    assert!(html.contains("href=\"#first-divergence-cell\""), "the verdict links to the cell");
    assert!(html.contains("id=\"drill-0-1-k_rope\" open"));
    assert!(html.contains("href=\"#drill-0-1-k_rope\""), "the cell links to its drill-down");
    assert!(html.contains("rel-L2 per head"));
    assert!(html.contains("<td>token 2, head 0, dim 1</td>"));
    assert!(html.contains("id=\"configuration\""));
    // One step: no table of contents.
    assert!(!html.contains("class=\"toc\""));

    let c = synthetic("x");
    let m = render_html(&diff_captures(&c, &c, &Thresholds::uniform(1e-6), None));
    assert!(!m.contains("data-first-divergence"));
    assert!(!m.contains("first-divergence-cell"));
}

#[test]
fn markdown_has_verdict_and_tables() {
    let r = diverged_report();
    let md = render_markdown(&r);
    assert!(md.contains("FIRST DIVERGENCE: prefill, layer 1, v_proj: max-abs 3.0e-1 > 1.0e-3"), "{md}");
    assert!(md.contains("## First divergence: prefill, layer 1, v_proj"));
    assert!(md.contains("token 0, head 0, dim 2"), "worst element of v_proj: {md}");
    assert!(md.contains("| layer | attn_norm |"));
    assert!(md.contains("missing in ours"));
}

#[test]
fn terminal_summary_has_heat_lines() {
    let r = diverged_report();
    let text = render_terminal(&r, None);
    // Layer 1's heat line: v_proj at 300x its threshold ('#'), ffn_up NaN ('X').
    let fields = |l: &str| l.split(['│', '┆']).map(|f| f.trim().to_string()).collect::<Vec<_>>();
    let row = text
        .lines()
        .map(fields)
        .find(|f| f.len() > 8 && f[1] == "prefill" && f[2] == "1")
        .expect("summary row for layer 1");
    assert_eq!(row[8], "...#.........X...", "{row:?}");
    assert_eq!((row[3].as_str(), row[4].as_str(), row[5].as_str()), ("17", "2", "ffn_up"));
    assert!(text.contains("heat: error/threshold"));
    assert!(text.contains("prefill, layer 1"), "detail table of the first divergence: {text}");
    assert!(text.contains("token 0, head 0, dim 2"));
}
