//! `parity diff` end to end on synthetic dumps written with `write_dump`.

use capture::{write_dump, Capture, CaptureConfig, CapturedTensor, Tensor};
use capture::stage::{Stage, StageId};
use parity::thresholds::calibrate;
use std::path::Path;
use std::process::{Command, Output};

const N_LAYER: usize = 3;
const T: usize = 4;
const SHA: &str = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";

fn shape_of(stage: Stage) -> Vec<usize> {
    match stage {
        Stage::QProj | Stage::QRope | Stage::AttnCtx => vec![T, 2, 4],
        Stage::KProj | Stage::VProj | Stage::KRope => vec![T, 1, 4],
        Stage::AttnScores | Stage::AttnProbs => vec![2, T, T],
        Stage::FfnGate | Stage::FfnUp | Stage::FfnAct => vec![T, 16],
        Stage::Logits => vec![T, 11],
        _ => vec![T, 8],
    }
}

fn synthetic(engine: &str, steps: usize) -> Capture {
    let mut c = Capture {
        engine: engine.into(),
        model_sha256: SHA.into(),
        prompt: "def fib(n):".into(),
        tokens: vec![750, 15801, 1445, 1648],
        generated: (0..steps as i32).collect(),
        config: CaptureConfig {
            kv_type: "f32".into(),
            n_layer: N_LAYER,
            n_embd: 8,
            n_head: 2,
            n_head_kv: 1,
            head_dim: 4,
            n_ff: 16,
            n_vocab: 11,
            layers: (0..N_LAYER).collect(),
            n_decode: steps.saturating_sub(1),
            ..Default::default()
        },
        ..Default::default()
    };
    for step in 0..steps {
        for (k, id) in StageId::all_in_step(step, N_LAYER).into_iter().enumerate() {
            let shape = shape_of(id.stage);
            let n: usize = shape.iter().product();
            let data = (0..n).map(|i| (((i * 7 + k * 13 + step * 5) % 17) as f32 - 8.0) / 8.0).collect();
            c.tensors.insert(id, CapturedTensor { tensor: Tensor::new(shape, data), provenance: engine.to_string() });
        }
    }
    c
}

fn perturb(c: &mut Capture, id: StageId, at: usize, delta: f32) {
    c.tensors.get_mut(&id).expect("stage present").tensor.data[at] += delta;
}

fn parity(args: &[&str], fixtures: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parity"))
        .arg("diff")
        .args(args)
        .env("PARITY_FIXTURES", fixtures)
        .output()
        .expect("run parity")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

struct Dumps {
    dir: tempfile::TempDir,
}

impl Dumps {
    fn new(ours: &Capture, reference: &Capture) -> Dumps {
        let dir = tempfile::tempdir().unwrap();
        write_dump(ours, &dir.path().join("ours")).unwrap();
        write_dump(reference, &dir.path().join("ref")).unwrap();
        std::fs::create_dir_all(dir.path().join("fixtures")).unwrap();
        Dumps { dir }
    }
    fn ours(&self) -> String {
        s(&self.dir.path().join("ours")).to_string()
    }
    fn reference(&self) -> String {
        s(&self.dir.path().join("ref")).to_string()
    }
    fn fixtures(&self) -> std::path::PathBuf {
        self.dir.path().join("fixtures")
    }
    fn run(&self, extra: &[&str]) -> Output {
        let (o, r) = (self.ours(), self.reference());
        let mut args = vec![o.as_str(), r.as_str()];
        args.extend_from_slice(extra);
        parity(&args, &self.fixtures())
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn identical_dumps_match_with_exit_0() {
    let d = Dumps::new(&synthetic("ours-cpu", 2), &synthetic("llama.cpp", 2));
    let out = d.run(&["--threshold", "1e-6"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&format!("MATCH: {} stages within thresholds", 2 * (3 + 17 * N_LAYER))), "{text}");
    assert!(text.contains("decode 1"), "the summary covers the decode step: {text}");
}

#[test]
fn perturbed_stage_diverges_with_exit_1_and_is_named() {
    let reference = synthetic("llama.cpp", 2);
    let mut ours = synthetic("ours-cpu", 2);
    perturb(&mut ours, StageId::layer(1, 2, Stage::KRope), 5, 0.25);
    perturb(&mut ours, StageId::layer(1, 2, Stage::LayerOut), 0, 3.0); // later and larger
    let d = Dumps::new(&ours, &reference);
    let json = d.dir.path().join("r.json");
    let md = d.dir.path().join("r.md");
    let html = d.dir.path().join("r.html");
    let out = d.run(&["--threshold", "1e-3", "--json", s(&json), "--markdown", s(&md), "--html", s(&html)]);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("FIRST DIVERGENCE: decode 1, layer 2, k_rope: max-abs 2.5e-1 > 1.0e-3"), "{text}");
    assert!(text.contains("look at: RoPE"), "{text}");
    // k_rope [4, 1, 4]: flat 5 = token 1, head 0, dim 1
    assert!(text.contains("token 1, head 0, dim 1"), "{text}");

    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["verdict"], "diverged");
    assert_eq!(v["first_divergence"]["step"], 1);
    assert_eq!(v["first_divergence"]["layer"], 2);
    assert_eq!(v["first_divergence"]["stage"], "k_rope");
    assert!(std::fs::read_to_string(&md).unwrap().contains("FIRST DIVERGENCE: decode 1, layer 2, k_rope"));
    // `diff` holds both dumps: it drills into the first divergence.
    let drill = &v["drilldowns"][0];
    assert_eq!((drill["step"].as_u64(), drill["layer"].as_u64(), drill["stage"].as_str()), (Some(1), Some(2), Some("k_rope")));
    assert_eq!(drill["worst"][0]["coords"], "token 1, head 0, dim 1");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg"));
    assert!(page.contains(r#"data-step="1" data-layer="2" data-stage="k_rope" id="first-divergence-cell""#));
    assert!(page.contains("id=\"drill-1-2-k_rope\""));

    // The same with a layer filter that excludes it: match.
    let out = d.run(&["--threshold", "1e-3", "--layers", "0..=1"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    // The ambiguous spelling is refused with the fix.
    let out = d.run(&["--threshold", "1e-3", "--layers", "0..2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("write 0..=2"), "{}", stderr(&out));
    let out = d.run(&["--threshold", "1e-3", "--layer", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("decode 1, layer 2"), "{text}");
    assert!(!text.contains("layer 1\n"), "only the selected layer's tables: {text}");
}

#[test]
fn missing_stage_diverges() {
    let reference = synthetic("llama.cpp", 1);
    let mut ours = synthetic("ours-cpu", 1);
    ours.tensors.remove(&StageId::layer(0, 1, Stage::FfnAct));
    let d = Dumps::new(&ours, &reference);
    let out = d.run(&["--threshold", "1e-3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("FIRST DIVERGENCE: prefill, layer 1, ffn_act: missing in ours"), "{}", stdout(&out));
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let c = synthetic("ours-cpu", 1);
    let d = Dumps::new(&c, &c);
    let absent = d.dir.path().join("nope");
    let out = parity(&[&d.ours(), s(&absent), "--threshold", "1e-3"], &d.fixtures());
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("nope"), "{err}");

    // Different models.
    let mut other = synthetic("llama.cpp", 1);
    other.model_sha256 = "00".repeat(32);
    let d2 = Dumps::new(&c, &other);
    let out = d2.run(&["--threshold", "1e-3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("different models"), "{}", stderr(&out));

    // Different tokens.
    let mut other = synthetic("llama.cpp", 1);
    other.tokens.push(9);
    let d3 = Dumps::new(&c, &other);
    let out = d3.run(&["--threshold", "1e-3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("different prompt tokens"), "{}", stderr(&out));

    // A directory that is not a dump.
    let out = parity(&[&d.ours(), s(&d.fixtures()), "--threshold", "1e-3"], &d.fixtures());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("manifest.json"), "{}", stderr(&out));

    // Bad --threshold / --layers.
    assert_eq!(d.run(&["--threshold", "-1"]).status.code(), Some(2));
    assert_eq!(d.run(&["--threshold", "1e-3", "--layers", "3..=1"]).status.code(), Some(2));
    assert_eq!(d.run(&["--threshold", "1e-3", "--layer", "7"]).status.code(), Some(2));
}

#[test]
fn built_in_gates_without_a_file_and_files_only_for_their_combination() {
    let reference = synthetic("llama.cpp", 1);
    let mut ours = synthetic("ours-cpu", 1);
    perturb(&mut ours, StageId::layer(0, 1, Stage::AttnOut), 3, 0.01);
    let d = Dumps::new(&ours, &reference);

    // No file: the built-in free-running gates (worst-row rel-L2) apply;
    // a 0.01 change in one element of a row of norm ~1.6 passes them.
    let out = d.run(&[]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("built-in free-running defaults"), "{}", stdout(&out));

    // A row replaced by its negative fails them, named at its stage (2 x its
    // norm, over the median row norm where that is larger: 1.9).
    let mut flipped = synthetic("ours-cpu", 1);
    for v in flipped.tensors.get_mut(&StageId::layer(0, 2, Stage::FfnUp)).unwrap().tensor.data[16..32].iter_mut() {
        *v = -*v;
    }
    let d2 = Dumps::new(&flipped, &reference);
    let out = d2.run(&[]);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("FIRST DIVERGENCE: prefill, layer 2, ffn_up: worst-row rel-L2 1.9e0 > 1.0e0"), "{}", stdout(&out));

    // A calibrated max-abs file gates what it records.
    let observed: Vec<(StageId, f64)> = StageId::all_in_step(0, N_LAYER)
        .into_iter()
        .map(|id| (id, if id == StageId::layer(0, 1, Stage::AttnOut) { 0.004 } else { 1e-4 }))
        .collect();
    let tight = d.dir.path().join("tight.json");
    let mut t = calibrate(&observed, 1.0, 1e-6, N_LAYER); // 0.004 < 0.01
    t.model_sha256 = SHA.into();
    t.backend = "cpu".into();
    t.kv_type = "f32".into();
    t.save(&tight).unwrap();
    let out = d.run(&["--thresholds", s(&tight)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("FIRST DIVERGENCE: prefill, layer 1, attn_out: max-abs 1.0e-2 > 4.0e-3"), "{}", stdout(&out));
    assert!(stdout(&out).contains(s(&tight)), "the report names its thresholds source");

    // ... and is refused for another model or KV type, naming the difference.
    t.model_sha256 = "ab".repeat(32);
    t.save(&tight).unwrap();
    let out = d.run(&["--thresholds", s(&tight)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("recorded for model sha256 abab"), "{}", stderr(&out));
    t.model_sha256 = SHA.into();
    t.kv_type = "f16".into();
    t.save(&tight).unwrap();
    let out = d.run(&["--thresholds", s(&tight)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("KV type f16"), "{}", stderr(&out));
}

/// A dump with a hand-made bug: the diagnosis names a scale by its constant
/// and a dropped bias as an offset per channel, with no engine loaded.
#[test]
fn diff_diagnoses_a_scale_and_an_offset() {
    let reference = synthetic("llama.cpp", 1);
    let mut scaled = synthetic("ours-cpu", 1);
    for v in scaled.tensors.get_mut(&StageId::layer(0, 1, Stage::QRope)).unwrap().tensor.data.iter_mut() {
        *v *= 4.0; // head_dim is 4
    }
    let d = Dumps::new(&scaled, &reference);
    let out = d.run(&[]);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("diagnosis: ours = 4.000000 x reference (head_dim)"), "{}", stdout(&out));

    let mut biased = synthetic("ours-cpu", 1);
    let t = &mut biased.tensors.get_mut(&StageId::layer(0, 0, Stage::KProj)).unwrap().tensor;
    let width = t.data.len() / T;
    for (i, v) in t.data.iter_mut().enumerate() {
        *v -= 0.5 + 0.25 * (i % width) as f32; // the same row removed from every token
    }
    let d = Dumps::new(&biased, &reference);
    let out = d.run(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("diagnosis: a constant offset per channel"), "{}", stdout(&out));
}
