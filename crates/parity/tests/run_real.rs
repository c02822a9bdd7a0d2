//! `parity run` and the engine's CPU backend against llama.cpp on the real
//! model: clean prompts match under the calibrated thresholds, seeded faults
//! are localized to the stage that holds them, bad input exits 2.

#[macro_use]
mod common;
use common::parity;

use engine::fault::{Fault, FaultSpec, FAULTS};
use capture::stage::{Stage, StageId};
use parity::fixtures::fixtures_dir;
use capture::KvType;
use parity::ours::EngineOptions;
use parity::prompts::read_prompts;
use engine::numerics::Numerics;
use parity::session::{compare, resolve_thresholds, GateRequest, ModelFile, Pair};
use parity::thresholds::{Comparison, Thresholds};
use parity::diff::Verdict;
use parity::ours::BackendKind;
use std::process::Output;

const HAIKU: &str = "Write a haiku about GPU computing";


fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn run_layer0_with_decode_matches_and_lists_every_stage() {
    let model = real_model_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let o = parity(&[
        "run", "--backend", "cpu", "--model", model.to_str().unwrap(), "--prompt", HAIKU, "--layer", "0",
        "--decode", "8", "--json", json.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("MATCH"), "{out}");
    for stage in Stage::PER_LAYER {
        assert!(out.contains(stage.name()), "stage {stage} not listed:\n{out}");
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["verdict"], "match");
    assert!(report["first_divergence"].is_null());
    let stages = report["stages"].as_array().unwrap();
    // 9 steps x (17 stages of layer 0 + embed, final_norm, logits).
    assert_eq!(stages.len(), 9 * 20, "{}", stages.len());
    assert_eq!(report["comparison"], "teacher-forced");
    assert_eq!(report["numerics"], "ggml");
    assert_eq!(report["free_running"]["per_layer"].as_array().unwrap().len(), 2, "layer 0 and the head");
    for s in stages {
        assert_eq!(s["gated_on"], "row_rel_l2_max");
        assert!(s["row_rel_l2_max"].as_f64().unwrap() <= s["threshold"].as_f64().unwrap());
        assert!(s["layer"].is_null() || s["layer"] == 0);
    }
}

#[test]
fn run_all_layers_matches() {
    let model = real_model_or_skip!();
    let o = parity(&["run", "--model", model.to_str().unwrap(), "--prompt", HAIKU]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    // 24 layers x 17 stages + 3 globals, prefill only.
    assert!(out.contains("MATCH: 411 stages within thresholds"), "{out}");
}

fn gates(pair: &Pair, numerics: &str, comparison: Comparison, file: Option<&std::path::Path>) -> Thresholds {
    let req = GateRequest { threshold: None, file, model_sha256: &pair.model_sha256, backend: "cpu", kv_type: "f16", numerics, float_reference: false };
    resolve_thresholds(&req, comparison, Comparison::TeacherForced).unwrap()
}

fn cpu(kv: KvType, fault: Fault, numerics: Numerics) -> EngineOptions {
    EngineOptions { kv, fault: fault.into(), numerics, max_ctx: 256, ..EngineOptions::new(BackendKind::Cpu) }
}

/// Every calibration and held-out prompt matches under the built-in gates,
/// with no calibration: teacher-forced (the verdict) in ggml numerics, with
/// every stage's worst row within 1e-5 rel-L2 (1e-3 for attn_scores, whose
/// rows can nearly cancel), and free-running under its looser gates.
#[test]
fn clean_prompts_pass_the_built_in_gates() {
    let model = real_model_or_skip!();
    let mut pair = Pair::load(&ModelFile::open(&model).unwrap(), cpu(KvType::F16, Fault::None, Numerics::Ggml), None).unwrap();
    let tf_gates = gates(&pair, "ggml", Comparison::TeacherForced, None);
    let fr_gates = gates(&pair, "ggml", Comparison::FreeRunning, None);
    let fixtures = fixtures_dir().unwrap();
    let mut prompts = read_prompts(&fixtures.join("prompts/calibration.txt")).unwrap();
    prompts.extend(read_prompts(&fixtures.join("prompts/holdout.txt")).unwrap());
    let mut worst: f64 = 0.0;
    for (i, prompt) in prompts.iter().enumerate() {
        let (tf, fr, reference) = pair.capture_both(&prompt.text, prompt.chat, 3, None).unwrap();
        let report = compare(&tf, &reference, &tf_gates, None);
        assert_eq!(report.verdict, Verdict::Match, "prompt {i} teacher-forced: {:?}", report.first_problem());
        for row in report.rows.iter().filter(|r| r.id.stage != Stage::AttnScores) {
            worst = worst.max(row.metrics.row_rel_l2_max);
            assert!(row.metrics.row_rel_l2_max <= 1e-5, "prompt {i}: {}: worst row {:e}", row.id, row.metrics.row_rel_l2_max);
        }
        let report = compare(&fr, &reference, &fr_gates, None);
        assert_eq!(report.verdict, Verdict::Match, "prompt {i} free-running: {:?}", report.first_problem());
    }
    println!("{} prompts, teacher-forced worst row over all stages but attn_scores: {worst:e}", prompts.len());
}

/// The calibrated max-abs file (exact numerics, free-running) still gates
/// what it was made for, and is refused for ggml numerics.
#[test]
fn calibrated_file_gates_its_own_combination_only() {
    let model = real_model_or_skip!();
    let mut pair = Pair::load(&ModelFile::open(&model).unwrap(), cpu(KvType::F16, Fault::None, Numerics::Exact), None).unwrap();
    let file = Thresholds::default_path(&fixtures_dir().unwrap(), &pair.model_sha256, "cpu");
    let thresholds = gates(&pair, "exact", Comparison::FreeRunning, Some(&file));
    assert_eq!(thresholds.metric, parity::thresholds::GateMetric::MaxAbs);
    for prompt in read_prompts(&fixtures_dir().unwrap().join("prompts/holdout.txt")).unwrap() {
        let (ours, reference) = pair.capture(&prompt.text, prompt.chat, 3, None, false).unwrap();
        let report = compare(&ours, &reference, &thresholds, None);
        assert_eq!(report.verdict, Verdict::Match, "{:?}: {:?}", prompt.text, report.first_problem());
    }
    let req = GateRequest { threshold: None, file: Some(&file), model_sha256: &pair.model_sha256, backend: "cpu", kv_type: "f16", numerics: "ggml", float_reference: false };
    let err = resolve_thresholds(&req, Comparison::FreeRunning, Comparison::TeacherForced).unwrap_err();
    assert!(format!("{err:#}").contains("numerics exact"), "{err:#}");
}

/// A seeded fault is named at the stage that holds it, in the right step,
/// teacher-forced with the built-in gates, by a margin of at least 100.
#[test]
fn seeded_faults_are_localized() {
    let model = real_model_or_skip!();
    // Where each fault must show first comes from the catalogue (kv-offset:
    // invisible in the prefill; the first decode step reads a hole in the cache).
    for info in FAULTS.iter().filter(|f| f.fault != Fault::None) {
        let spec = FaultSpec::from(info.fault);
        let (fault, at) = (info.fault, parity::selftest::expected_at(&FaultSpec { layer: Some(0), ..spec }));
        let mut pair = Pair::load(&ModelFile::open(&model).unwrap(), cpu(KvType::F16, fault, Numerics::Ggml), None).unwrap();
        let thresholds = gates(&pair, "ggml", Comparison::TeacherForced, None);
        let (tf, _, reference) = pair.capture_both(HAIKU, false, 2, Some(vec![0, 1])).unwrap();
        let report = compare(&tf, &reference, &thresholds, Some(&[0, 1]));
        let Some(at) = at else {
            assert_eq!(report.verdict, Verdict::Match, "equivalent variant {fault}: false alarm at {:?}", report.first_problem());
            continue;
        };
        assert_eq!(report.verdict, Verdict::Diverged, "fault {fault} not detected");
        let first = &report.rows[report.first_divergence.unwrap()];
        assert_eq!(first.id, at, "fault {fault} localized at {} instead of {at}", first.id);
        let margin = first.ratio().unwrap();
        assert!(margin >= 100.0, "fault {fault}: margin {margin}");
        println!("fault {fault}: first divergence {at}, worst-row rel-L2 {:.3e} = {margin:.0}x its threshold", first.value());
    }
}

/// Teacher-forced, each recorded error is one op's own: residual adds of
/// llama.cpp's own inputs are exact up to one f32 rounding, embedding rows bit-exact.
#[test]
fn isolation_measures_local_error() {
    let model = real_model_or_skip!();
    let mut pair = Pair::load(&ModelFile::open(&model).unwrap(), cpu(KvType::F16, Fault::None, Numerics::Ggml), None).unwrap();
    let thresholds = gates(&pair, "ggml", Comparison::TeacherForced, None);
    let (ours, reference) = pair.capture(HAIKU, false, 1, None, true).unwrap();
    let report = compare(&ours, &reference, &thresholds, None);
    assert_eq!(report.verdict, Verdict::Match);
    for row in report.rows.iter().filter(|r| matches!(r.id.stage, Stage::AttnResidual | Stage::LayerOut)) {
        let scale = row.metrics.ref_max_abs.max(1.0);
        assert!(row.metrics.max_abs <= scale * 1.2e-7, "{}: {}", row.id, row.metrics.max_abs);
    }
    let embed = report.rows.iter().find(|r| r.id.stage == Stage::Embed).unwrap();
    assert_eq!(embed.metrics.max_abs, 0.0);
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let model = real_model_or_skip!();
    let m = model.to_str().unwrap();
    // 33,000 one-token words: past the 32,768-token context, under the 128 KiB argument limit.
    let long = "a ".repeat(33_000);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--model", m, "--prompt", HAIKU, "--layer", "24"], "layer 24 out of range"),
        (vec!["run", "--model", "/nonexistent.gguf", "--prompt", HAIKU], "/nonexistent.gguf"),
        (vec!["run", "--model", m, "--prompt", &long], "exceeds the model's context"),
        (vec!["run", "--model", m, "--prompt", HAIKU, "--fault", "nope"], "unknown fault"),
        (vec!["run", "--model", m, "--prompt", HAIKU, "--thresholds", "/nonexistent.json"], "nonexistent.json"),
    ];
    let mut cases = cases;
    if parity::ours::cuda_available().is_err() {
        cases.push((vec!["run", "--model", m, "--prompt", HAIKU, "--backend", "cuda"], "no CUDA device: use --backend cpu"));
    } else {
        println!("GPU present: the no-GPU error case is not exercised here");
    }
    for (args, needle) in cases {
        let o = parity(&args);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let lines: Vec<_> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
    }
}

/// On an F32 synthetic model there is no activation quantization in
/// llama.cpp: with an f32 KV cache the two engines agree to f32 rounding.
#[test]
fn synthetic_f32_model_matches_llama_cpp_tightly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    gguf::synth::write_tiny_qwen2(&gguf::synth::SynthSpec::tiny(), &path).unwrap();
    let mut pair = Pair::load(&ModelFile::open(&path).unwrap(), cpu(KvType::F32, Fault::None, Numerics::Ggml), None).unwrap();
    let (ours, reference) = pair.capture("hello world, hello tiny model", false, 4, None, false).unwrap();
    let thresholds = parity::thresholds::Thresholds::uniform(1e-4);
    let report = compare(&ours, &reference, &thresholds, None);
    assert!(report.missing.is_empty(), "{:?}", report.missing);
    assert_eq!(report.rows.len(), 5 * (3 + 17 * 2));
    assert_eq!(report.verdict, Verdict::Match, "{:?}", report.first_divergence.map(|r| (&report.rows[r].id, report.rows[r].metrics.max_abs)));
    // And a seeded fault on the same model is caught.
    let mut faulty = Pair::load(&ModelFile::open(&path).unwrap(), cpu(KvType::F32, Fault::GqaModulo, Numerics::Ggml), None).unwrap();
    let (ours, reference) = faulty.capture("hello world, hello tiny model", false, 1, None, false).unwrap();
    let report = compare(&ours, &reference, &thresholds, None);
    assert_eq!(report.rows[report.first_divergence.unwrap()].id, StageId::layer(0, 0, Stage::AttnScores));
}

/// A synthetic model with a massive-activation token (its residual row a
/// thousand times the others), quantized by llama.cpp to every family of
/// weight type: teacher-forced in ggml numerics it matches under the
/// built-in gates with no calibration, and a seeded fault is still named
/// at its stage by a margin of at least 100.
#[test]
fn massive_activation_synthetic_models_match_without_calibration() {
    use gguf::synth::{write_tiny_qwen2, SynthSpec};
    use gguf::GgmlType;
    let dir = tempfile::tempdir().unwrap();
    let prompt = "hello world, hello tiny model";
    let base = SynthSpec { n_layer: 2, n_embd: 256, n_head: 4, n_head_kv: 2, n_ff: 512, ..SynthSpec::tiny() };
    // The tokenizer does not depend on the weights: find the first token's id.
    let plain = dir.path().join("plain.gguf");
    write_tiny_qwen2(&base, &plain).unwrap();
    let first = llama_ref::LlamaRef::load(&plain).unwrap().tokenize(prompt, false).unwrap()[0];
    let f32_path = dir.path().join("massive-f32.gguf");
    write_tiny_qwen2(&SynthSpec { massive_token: Some(first as u32), ..base }, &f32_path).unwrap();
    for ty in [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4_K, GgmlType::Q6_K] {
        let path = dir.path().join(format!("massive-{}.gguf", ty.name()));
        llama_ref::quantize_model(&f32_path, &path, ty).unwrap();
        let model = ModelFile::open(&path).unwrap();
        let mut pair = Pair::load(&model, cpu(KvType::F16, Fault::None, Numerics::Ggml), None).unwrap();
        let tf_gates = gates(&pair, "ggml", Comparison::TeacherForced, None);
        let (tf, _, reference) = pair.capture_both(prompt, false, 3, None).unwrap();
        let embed = reference.get(&StageId::global(0, Stage::Embed)).unwrap();
        let row0: f32 = embed.row(0).iter().map(|x| x.abs()).fold(0.0, f32::max);
        let row1: f32 = embed.row(1).iter().map(|x| x.abs()).fold(0.0, f32::max);
        assert!(row0 > 100.0 * row1, "{}: the first token is not massive: {row0} vs {row1}", ty.name());
        let report = compare(&tf, &reference, &tf_gates, None);
        assert_eq!(report.verdict, Verdict::Match, "{}: {:?}", ty.name(), report.first_problem().map(|p| format!("{p:?}")));
        let mut faulty = Pair::load(&model, cpu(KvType::F16, Fault::NoQkvBias, Numerics::Ggml), None).unwrap();
        let (tf, _, reference) = faulty.capture_both(prompt, false, 1, None).unwrap();
        let report = compare(&tf, &reference, &tf_gates, None);
        let first = &report.rows[report.first_divergence.expect("fault found")];
        assert_eq!(first.id, StageId::layer(0, 0, Stage::QProj), "{}", ty.name());
        assert!(first.ratio().unwrap() >= 100.0, "{}: margin {:?}", ty.name(), first.ratio());
    }
}

/// `parity selftest` on the real model: every fault of the catalogue at a
/// seeded random layer is named exactly, teacher-forced, by at least 10x its
/// gate; the equivalent variants and the clean run raise no alarm.
#[test]
fn selftest_names_every_fault_of_the_catalogue() {
    let model = real_model_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("selftest.json");
    let o = parity(&["selftest", "--model", model.to_str().unwrap(), "--seed", "20261125", "--json", json.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let s = &v["summary"];
    assert_eq!(s["passed"], true);
    assert!(s["faults"].as_u64().unwrap() >= 18, "{s}");
    assert_eq!(s["exact"], s["faults"]);
    assert!(s["equivalent"].as_u64().unwrap() >= 2);
    assert_eq!(s["equivalent_clean"], s["equivalent"]);
    assert!(s["min_margin"].as_f64().unwrap() >= 10.0);
    // The diagnosis names every bug (ties count: two bug models can leave
    // the same tensor), and the pattern tests alone name every bug whose
    // class they test, as for a foreign dump without a model.
    assert_eq!(s["diagnosed"], s["faults"], "{s}");
    assert!(s["pattern_faults"].as_u64().unwrap() >= 15, "{s}");
    assert_eq!(s["named_by_patterns"], s["pattern_faults"], "{s}");
    // Every layer fault sits at the layer the seed drew, and was found there.
    for o in v["outcomes"].as_array().unwrap() {
        if let Some(l) = o["layer"].as_u64() {
            assert!(o["found"].as_str().unwrap().contains(&format!("layer {l},")) || o["expected"] == "no divergence", "{o}");
        }
    }
    assert!(out.contains("PASS"), "{out}");
}

/// `--fault NAME@L` acts at layer L only and is named there.
#[test]
fn a_fault_at_a_chosen_layer_is_named_at_that_layer() {
    let model = real_model_or_skip!();
    let m = model.to_str().unwrap();
    let o = parity(&["run", "--model", m, "--prompt", HAIKU, "--layers", "13..=15", "--fault", "o-proj-transposed@14"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("FIRST DIVERGENCE: prefill, layer 14, attn_out"), "{out}");
    // ... and the what-if replay names the bug.
    assert!(out.contains("diagnosis: o-proj-transposed:"), "{out}");
    // ... and says how much of it ggml's rounding could explain.
    assert!(out.contains("attribution: ggml's rounding moves prefill, layer 14, attn_out by"), "{out}");
    let o = parity(&["run", "--model", m, "--prompt", HAIKU, "--fault", "o-proj-transposed@24"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("layer 24 out of range"), "{}", text(&o).1);
}

/// A quantization of the real model made on the fly (`parity variant`, cached
/// beside the model): our dequantization equals ggml's bit for bit on it and
/// `parity run` matches with the built-in gates.
#[test]
fn q8_0_variant_of_the_real_model_matches() {
    let model = real_model_or_skip!();
    let o = parity(&["variant", "--model", model.to_str().unwrap(), "--type", "q8_0"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    let path = out.lines().last().unwrap().trim().to_string();
    let file = gguf::GgufFile::open(&path).unwrap();
    assert!(file.tensors().iter().filter(|t| t.ggml_type == gguf::GgmlType::Q8_0).count() > 100);
    let o = parity(&["weights", "--model", &path]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).0);
    let o = parity(&["run", "--model", &path, "--prompt", HAIKU, "--decode", "4"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("MATCH"), "{out}");
}

/// `--reference oracle`: our CPU engine in the same numerics is the
/// reference. The CPU backend against itself is exact (every stage 0), and
/// a seeded fault is named at its layer and stage as against llama.cpp.
#[test]
fn the_cpu_oracle_as_the_reference() {
    let model = real_model_or_skip!();
    let m = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("oracle.json");
    let o = parity(&["run", "--model", m, "--prompt", HAIKU, "--decode", "2", "--reference", "oracle", "--json", json.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("reference: oracle (ours-cpu)"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let stages = v["stages"].as_array().unwrap();
    assert!(stages.len() > 1000, "{}", stages.len());
    assert!(stages.iter().all(|s| s["max_abs"].as_f64() == Some(0.0)), "the CPU backend differs from itself");
    let o = parity(&["run", "--model", m, "--prompt", HAIKU, "--decode", "2", "--reference", "oracle", "--fault", "gqa-modulo@5"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("FIRST DIVERGENCE: prefill, layer 5, attn_scores"), "{out}");
    assert!(out.contains("diagnosis: gqa-modulo"), "{out}");
}
