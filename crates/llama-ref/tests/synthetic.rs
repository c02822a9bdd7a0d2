//! Synthetic Qwen2 models (gguf::synth), F32 and F16, and the F32 one
//! quantized by llama.cpp's own `llama_model_quantize` to every type it
//! offers here: llama.cpp loads and runs each, with a full capture.

mod common;

use common::get;
use capture::Capture;
use capture::stage::{Stage, StageId};
use gguf::synth::{write_tiny_qwen2, SynthSpec};
use gguf::GgmlType;
use llama_ref::{quantize_model, KvType, LlamaRef, RefOptions};
use std::path::Path;

/// Rows of 256 (n_embd) and 512 (n_ff): whole blocks for every K-quant, so
/// no tensor falls back to another type for its width.
fn spec(weight_type: GgmlType) -> SynthSpec {
    SynthSpec { n_layer: 2, n_embd: 256, n_head: 4, n_head_kv: 2, n_ff: 512, weight_type, ..SynthSpec::tiny() }
}

fn run(path: &Path, n_decode: usize) -> Capture {
    let llama = LlamaRef::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tokens = llama.tokenize("Hello world, the quick brown fox", false).unwrap();
    assert!(tokens.len() > 3, "{tokens:?}");
    llama.run(&tokens, n_decode, &RefOptions { kv_type: KvType::F32, ..RefOptions::default() }).unwrap()
}

/// Complete capture, finite values, exact residual adds, greedy = argmax.
fn check_capture(c: &Capture, n_decode: usize, what: &str) {
    let n_layer = c.config.n_layer;
    assert_eq!(c.tensors.len(), (17 * n_layer + 3) * (n_decode + 1), "{what}");
    for step in 0..=n_decode {
        for id in StageId::all_in_step(step, n_layer) {
            let t = c.get(&id).unwrap_or_else(|| panic!("{what}: missing {id}"));
            assert_eq!(t.shape, common::expected_shape(c, step, id.stage), "{what}: {id}");
            assert!(t.data.iter().all(|v| v.is_finite()), "{what}: {id} not finite");
        }
        for l in 0..n_layer {
            let input = if l == 0 { get(c, step, None, Stage::Embed) } else { get(c, step, Some(l - 1), Stage::LayerOut) };
            let res = get(c, step, Some(l), Stage::AttnResidual);
            let out = get(c, step, Some(l), Stage::AttnOut);
            assert!(input.data.iter().zip(&out.data).zip(&res.data).all(|((a, b), r)| (a + b).to_bits() == r.to_bits()), "{what}: residual");
        }
        let logits = get(c, step, None, Stage::Logits);
        let last = &logits.data[logits.data.len() - c.config.n_vocab..];
        assert_eq!(common::argmax(last) as i32, c.generated[step], "{what}: greedy step {step}");
    }
}

/// y = x W^T (+ b) with W row-major [out][in] as GGUF stores it (ne0 = in).
fn check_linear(x: &[f32], w: &[f32], b: Option<&[f32]>, y: &[f32], n_in: usize, what: &str) {
    let n_out = w.len() / n_in;
    let n_t = x.len() / n_in;
    assert_eq!(y.len(), n_t * n_out, "{what}");
    for t in 0..n_t {
        let xr = &x[t * n_in..][..n_in];
        for o in 0..n_out {
            let wr = &w[o * n_in..][..n_in];
            let dot: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mag: f64 = xr.iter().zip(wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            let expect = dot + b.map_or(0.0, |b| b[o] as f64);
            // f32 accumulation of n_in products in another order: 1e-5 of the magnitude
            let tol = 1e-5 * mag + 1e-6;
            assert!((y[t * n_out + o] as f64 - expect).abs() <= tol, "{what}: token {t} out {o}: {} vs {expect}", y[t * n_out + o]);
        }
    }
}

#[test]
fn f32_synthetic_model_projections_are_the_gguf_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f32.gguf");
    write_tiny_qwen2(&spec(GgmlType::F32), &path).unwrap();
    let c = run(&path, 2);
    check_capture(&c, 2, "f32");
    let file = gguf::GgufFile::open(&path).unwrap();
    let w = |name: &str| -> Vec<f32> {
        let info = file.tensor(name).unwrap_or_else(|| panic!("no {name}"));
        gguf::dequant::dequantize(info.ggml_type, file.tensor_data(info), info.n_elements as usize).unwrap()
    };
    let (e, f) = (c.config.n_embd, c.config.n_ff);
    for step in 0..=2 {
        for l in 0..c.config.n_layer {
            let s = |st| &get(&c, step, Some(l), st).data;
            let p = |n: &str| format!("blk.{l}.{n}");
            let what = |n: &str| format!("step {step} layer {l} {n}");
            check_linear(s(Stage::AttnNorm), &w(&p("attn_q.weight")), Some(&w(&p("attn_q.bias"))), s(Stage::QProj), e, &what("q_proj"));
            check_linear(s(Stage::AttnNorm), &w(&p("attn_k.weight")), Some(&w(&p("attn_k.bias"))), s(Stage::KProj), e, &what("k_proj"));
            check_linear(s(Stage::AttnNorm), &w(&p("attn_v.weight")), Some(&w(&p("attn_v.bias"))), s(Stage::VProj), e, &what("v_proj"));
            check_linear(s(Stage::AttnCtx), &w(&p("attn_output.weight")), None, s(Stage::AttnOut), e, &what("attn_out"));
            check_linear(s(Stage::FfnNorm), &w(&p("ffn_gate.weight")), None, s(Stage::FfnGate), e, &what("ffn_gate"));
            check_linear(s(Stage::FfnNorm), &w(&p("ffn_up.weight")), None, s(Stage::FfnUp), e, &what("ffn_up"));
            check_linear(s(Stage::FfnAct), &w(&p("ffn_down.weight")), None, s(Stage::FfnDown), f, &what("ffn_down"));
        }
        let fin = &get(&c, step, None, Stage::FinalNorm).data;
        check_linear(fin, &w("output.weight"), None, &get(&c, step, None, Stage::Logits).data, e, &format!("step {step} logits"));
    }
}

#[test]
fn f16_and_quantized_synthetic_models_load_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let f16 = dir.path().join("f16.gguf");
    write_tiny_qwen2(&spec(GgmlType::F16), &f16).unwrap();
    check_capture(&run(&f16, 2), 2, "f16");

    let f32 = dir.path().join("f32.gguf");
    write_tiny_qwen2(&spec(GgmlType::F32), &f32).unwrap();
    let targets = [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    for ty in targets {
        let out = dir.path().join(format!("{}.gguf", ty.name()));
        quantize_model(&f32, &out, ty).unwrap_or_else(|e| panic!("{}: {e}", ty.name()));
        // the file really is quantized: the attention projections carry the target type
        let file = gguf::GgufFile::open(&out).unwrap();
        let n_target = file.tensors().iter().filter(|t| t.ggml_type == ty).count();
        let types: Vec<&str> = file.tensors().iter().map(|t| t.ggml_type.name()).collect();
        assert!(n_target >= 4, "{}: only {n_target} tensors of that type: {types:?}", ty.name());
        check_capture(&run(&out, 2), 2, ty.name());
    }
    // a type llama_model_quantize is not offered for is an error, not an abort
    assert!(quantize_model(&f32, &dir.path().join("x.gguf"), GgmlType::IQ2_XXS).is_err());
    assert!(quantize_model(&dir.path().join("missing.gguf"), &dir.path().join("y.gguf"), GgmlType::Q8_0).is_err());
}
