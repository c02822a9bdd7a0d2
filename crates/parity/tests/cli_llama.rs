//! `parity capture --engine llama` and `parity weights` through the built binary.

#[macro_use]
mod common;
use common::parity;

use std::process::{Command, Output};

const REFERENCE_SHA256: &str = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";


fn numpy_available() -> bool {
    Command::new("python3").args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn capture_writes_every_stage_of_every_step() {
    let model = real_model_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dump");
    let o = parity(&[
        "capture",
        "--engine",
        "llama",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Write a haiku about GPU computing",
        "--decode",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("2055 stages written"), "{stdout}");

    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let stages = manifest["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 17 * 24 * 5 + 3 * 5);
    assert_eq!(manifest["n_steps"], 5);
    assert_eq!(manifest["engine"], "llama.cpp");
    assert_eq!(manifest["prompt"], "Write a haiku about GPU computing");
    assert_eq!(manifest["chat"], false);
    assert_eq!(manifest["generated"].as_array().unwrap().len(), 5);
    assert_eq!(manifest["config"]["kv_type"], "f16");
    assert_eq!(manifest["unavailable"].as_array().unwrap().len(), 0);
    let sha = manifest["model_sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64);
    if std::fs::metadata(&model).unwrap().len() == 491_400_064 {
        assert_eq!(sha, REFERENCE_SHA256);
    }

    // every .npy loads, with the manifest's shape: our reader always, numpy when installed
    let back = capture::read_dump(&out).unwrap();
    assert_eq!(back.tensors.len(), stages.len());
    if numpy_available() {
        let script = r#"
import json, sys, numpy as np, os
d = sys.argv[1]
m = json.load(open(os.path.join(d, "manifest.json")))
for e in m["stages"]:
    a = np.load(os.path.join(d, e["file"]))
    assert a.dtype == np.float32, e["file"]
    assert list(a.shape) == e["shape"], (e["file"], a.shape, e["shape"])
    assert np.isfinite(a).all(), e["file"]
print(len(m["stages"]))
"#;
        let o = Command::new("python3").args(["-c", script, out.to_str().unwrap()]).output().unwrap();
        assert!(o.status.success(), "numpy: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "2055");
    } else {
        println!("numpy not installed: .npy files checked with capture::read_npy only");
    }
}

#[test]
fn capture_of_one_layer_with_flash_attention() {
    let model = real_model_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dump");
    let o = parity(&[
        "capture", "--model", model.to_str().unwrap(), "--prompt", "Hello", "--chat", "--decode", "1", "--layer", "3",
        "--flash-attn", "--kv", "f32", "--threads", "1", "--out", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = capture::read_dump(&out).unwrap();
    assert!(c.chat);
    assert_eq!(c.config.layers, vec![3]);
    assert_eq!(c.config.threads, 1);
    assert_eq!(c.config.kv_type, "f32");
    assert!(c.config.flash_attn);
    assert_eq!(c.tensors.len(), (15 + 3) * 2);
    assert_eq!(c.unavailable.len(), 2 * 2);
    assert!(c.tensors.keys().all(|id| id.layer.is_none_or(|l| l == 3)));
}

fn assert_usage_error(o: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.contains(needle), "{stderr:?} does not mention {needle:?}");
}

#[test]
fn bad_capture_inputs_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dump");
    let out = out.to_str().unwrap();
    let o = parity(&["capture", "--model", "/nonexistent/model.gguf", "--prompt", "hi", "--out", out]);
    assert_usage_error(&o, "model file not found: /nonexistent/model.gguf");
    let o = parity(&["capture", "--engine", "ours", "--model", "/nonexistent/model.gguf", "--prompt", "hi", "--out", out]);
    assert_usage_error(&o, "/nonexistent/model.gguf: file not found");

    let model = real_model_or_skip!();
    let m = model.to_str().unwrap();
    let o = parity(&["capture", "--model", m, "--prompt", "hi", "--layer", "30", "--out", out]);
    assert_usage_error(&o, "layer 30 out of range: the model has 24 layers (0..=23)");
    let o = parity(&["capture", "--model", m, "--prompt", "hi", "--layers", "20..=24", "--out", out]);
    assert_usage_error(&o, "layer 24 out of range: the model has 24 layers (0..=23)");
    let o = parity(&["capture", "--model", m, "--prompt", "hi", "--decode", "40000", "--out", out]);
    assert_usage_error(&o, "prompt of 1 tokens + 40000 decode steps exceeds the model's context of 32768");
    // Qwen2 tokenizes digits one by one: 33,000 digits are 33,000 tokens in a 33 KB argument
    let long = "0123456789".repeat(3_300);
    let o = parity(&["capture", "--model", m, "--prompt", &long, "--out", out]);
    assert_usage_error(&o, "prompt of 33000 tokens + 0 decode steps exceeds the model's context of 32768");
    assert!(!std::path::Path::new(out).exists(), "a failed capture must not leave a dump");
}

#[test]
fn weights_match_ggml_bit_for_bit_on_the_real_model() {
    let model = real_model_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("w.json");
    let o = parity(&["weights", "--model", model.to_str().unwrap(), "--json", json.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["tensors_checked"], 291);
    assert_eq!(v["tensors_mismatched"], 0);
    assert_eq!(v["model"], model.to_str().unwrap());
    for ty in ["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"] {
        assert_eq!(v["by_type"][ty]["mismatched"], 0, "{ty}");
        assert!(v["by_type"][ty]["tensors"].as_u64().unwrap() > 0, "{ty}");
    }
    let total: u64 = v["by_type"].as_object().unwrap().values().map(|s| s["tensors"].as_u64().unwrap()).sum();
    assert_eq!(total, 291);
    assert!(stdout.contains("Q4_K"), "{stdout}");
}

/// stderr piped (as in CI): plain progress lines, never a carriage return
/// or a cursor escape, and nothing of the progress on stdout.
#[test]
fn weights_with_stderr_piped_prints_plain_progress_lines() {
    let model = real_model_or_skip!();
    let o = parity(&["weights", "--model", model.to_str().unwrap()]);
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stderr.contains('\r') && !stderr.contains('\x1b'), "{stderr:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.first(), Some(&"weights: started, 291 tensors"), "{stderr}");
    let done = lines.last().copied().unwrap_or("");
    assert!(done.starts_with("weights: 291 tensors dequantized both ways in ") && done.ends_with(" s"), "{stderr}");
    // Milestones (printed once the task has run a second) count up in tenths.
    let mut last = 0;
    for line in &lines[1..lines.len() - 1] {
        let rest = line.strip_prefix("weights [").unwrap_or_else(|| panic!("not a progress line: {line}"));
        let (done, _) = rest.split_once("/291] ").unwrap_or_else(|| panic!("no count: {line}"));
        let done: usize = done.parse().unwrap_or_else(|_| panic!("bad count: {line}"));
        assert!(done > last && done < 291, "{stderr}");
        last = done;
    }
    assert!(lines.len() <= 11, "at most one line per tenth: {stderr}");
    assert!(!stdout.contains("weights ["), "progress on stdout: {stdout}");
}

#[test]
fn weights_on_a_synthetic_f16_model_and_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f16.gguf");
    let spec = gguf::synth::SynthSpec { weight_type: gguf::GgmlType::F16, ..gguf::synth::SynthSpec::tiny() };
    gguf::synth::write_tiny_qwen2(&spec, &path).unwrap();
    let json = dir.path().join("w.json");
    let o = parity(&["weights", "--model", path.to_str().unwrap(), "--json", json.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["by_type"]["F16"]["tensors"].as_u64().unwrap() > 0);
    assert!(v["by_type"]["F32"]["tensors"].as_u64().unwrap() > 0);

    let o = parity(&["weights", "--model", "/nonexistent/model.gguf"]);
    assert_usage_error(&o, "/nonexistent/model.gguf");

    // a tensor type neither side dequantizes: exit 2 naming the type and the tensor
    let mut w = gguf::GgufWriter::new();
    w.add("general.architecture", gguf::MetadataValue::String("qwen2".into()));
    w.add_tensor("blk.0.odd.weight", vec![32, 1], gguf::GgmlType::IQ4_NL, vec![0u8; 18]).unwrap();
    let odd = dir.path().join("odd.gguf");
    w.write(&odd).unwrap();
    let o = parity(&["weights", "--model", odd.to_str().unwrap()]);
    assert_usage_error(&o, "tensor blk.0.odd.weight: ggml type IQ4_NL is not supported");
}

/// `capture --out DIR` over an existing dump, interrupted (SIGINT) while it
/// runs: the process stops within a second with the signal's status, and
/// `diff` refuses what is left (neither the new files nor the old dump
/// they were replacing pass for a dump).
#[test]
fn an_interrupted_capture_leaves_nothing_diff_accepts() {
    use std::os::unix::process::ExitStatusExt;
    let model = real_model_or_skip!();
    let m = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dump");
    let first = parity(&["capture", "--engine", "llama", "--model", m, "--prompt", "Write a haiku about GPU computing", "--out", out.to_str().unwrap()]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert_eq!(parity(&["diff", out.to_str().unwrap(), out.to_str().unwrap()]).status.code(), Some(0), "the first dump is whole");

    // A long prompt: the capture runs for many seconds on any machine.
    let long = parity::verdict_bench::long_prompt(1500);
    let mut child = Command::new(env!("CARGO_BIN_EXE_parity"))
        .args(["capture", "--engine", "llama", "--model", m, "--prompt", &long, "--decode", "4", "--out", out.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "the capture must still be running when interrupted");
    let sent = std::time::Instant::now();
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let took = sent.elapsed();
    assert!(took.as_secs_f64() < 1.0, "stopped {took:?} after SIGINT");
    assert_eq!(status.signal(), Some(2), "killed by SIGINT (a shell reports exit 130): {status:?}");

    let o = parity(&["diff", out.to_str().unwrap(), out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("a capture that did not finish"), "{err}");
}
