//! The diagnosis on dumps of another engine (`parity diff`): llama.cpp's own
//! dump of the real model with one hand-made bug written into it, as a
//! foreign engine with that bug would write it. The pattern tests name the
//! bug with no model at hand; with `--model` the replays of the fault
//! catalogue name it too, and the weight the pattern equals is named.

#[macro_use]
mod common;
use common::parity;

use capture::{read_dump, write_dump, Capture, Stage, StageId};
use std::path::Path;

const PROMPT: &str = "Write a haiku about GPU computing";

/// llama.cpp's dump with `bug` applied to the tensor at `at`, written as
/// engine "hand-made" into `dir`.
fn hand_made(llama: &Capture, at: StageId, dir: &Path, bug: impl Fn(&mut Vec<f32>, &[usize])) {
    let mut c = llama.clone();
    c.engine = "hand-made".into();
    let t = &mut c.tensors.get_mut(&at).expect("the stage is in llama.cpp's dump").tensor;
    let shape = t.shape.clone();
    bug(&mut t.data, &shape);
    write_dump(&c, dir).expect("write the dump");
}

/// `parity diff` with one max-abs gate of 1 for every stage: the dumps
/// differ only at the hand-made bug (every other tensor is llama.cpp's own),
/// and the built-in free-running gates (worst-row rel-L2 1.0, 2.0 for
/// attention internals) would let a dropped Qwen2 bias (rel-L2 0.6 to 1.0)
/// or all heads reversed (1.4) pass.
fn diff(ours: &Path, reference: &Path, model: Option<&Path>) -> (i32, String) {
    let mut args = vec!["diff", ours.to_str().unwrap(), reference.to_str().unwrap(), "--threshold", "1"];
    if let Some(m) = model {
        args.extend(["--model", m.to_str().unwrap()]);
    }
    let o = parity(&args);
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.stderr.is_empty() || !String::from_utf8_lossy(&o.stderr).contains("panicked"), "{}", String::from_utf8_lossy(&o.stderr));
    (o.status.code().unwrap_or(-1), stdout)
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} line in:\n{out}"))
}

#[test]
fn hand_made_bugs_in_a_foreign_dump_are_named() {
    let model = real_model_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let llama_dir = dir.path().join("llama");
    let o = parity(&[
        "capture", "--engine", "llama", "--model", model.to_str().unwrap(), "--prompt", PROMPT, "--layers", "0..=2", "--out", llama_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let llama = read_dump(&llama_dir).unwrap();
    let gguf = gguf::GgufFile::open(&model).unwrap();

    // The K bias dropped at layer 1.
    let bias = gguf.dequantize("blk.1.attn_k.bias").unwrap();
    let no_bias = dir.path().join("no-bias");
    hand_made(&llama, StageId::layer(0, 1, Stage::KProj), &no_bias, |data, _| {
        data.iter_mut().enumerate().for_each(|(i, x)| *x -= bias[i % bias.len()]);
    });
    let (code, out) = diff(&no_bias, &llama_dir, None);
    assert_eq!(code, 1, "{out}");
    assert!(line(&out, "FIRST DIVERGENCE").contains("prefill, layer 1, k_proj"), "{out}");
    assert!(line(&out, "diagnosis:").contains("a constant offset per channel"), "{out}");
    let (code, out) = diff(&no_bias, &llama_dir, Some(&model));
    assert_eq!(code, 1, "{out}");
    let diagnosis = line(&out, "diagnosis:");
    assert!(diagnosis.starts_with("diagnosis: no-qkv-bias"), "{diagnosis}");
    assert!(diagnosis.contains("equal to -blk.1.attn_k.bias"), "{diagnosis}");
    // The Markdown and JSON reports carry the ranked hypotheses.
    let (md, json) = (dir.path().join("no-bias.md"), dir.path().join("no-bias.json"));
    let o = parity(&[
        "diff", no_bias.to_str().unwrap(), llama_dir.to_str().unwrap(), "--threshold", "1", "--model", model.to_str().unwrap(),
        "--markdown", md.to_str().unwrap(), "--json", json.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let md = std::fs::read_to_string(&md).unwrap();
    assert!(md.contains("## Diagnosis: prefill, layer 1, k_proj") && md.contains("Names: **no-qkv-bias**"), "{md}");
    assert!(md.contains("| 1 | replay | no-qkv-bias:"), "{md}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["diagnosis"]["names"], serde_json::json!(["no-qkv-bias"]));
    let top = &v["diagnosis"]["hypotheses"][0];
    assert_eq!((top["kind"].as_str(), top["holds"].as_bool()), (Some("replay"), Some(true)), "{top}");

    // The heads of attn_ctx at layer 2 in reverse order.
    let reversed = dir.path().join("heads");
    hand_made(&llama, StageId::layer(0, 2, Stage::AttnCtx), &reversed, |data, shape| {
        let (n_head, hd) = (shape[1], shape[2]);
        let src = data.clone();
        for (t, row) in data.chunks_mut(n_head * hd).enumerate() {
            for h in 0..n_head {
                row[h * hd..(h + 1) * hd].copy_from_slice(&src[(t * n_head + n_head - 1 - h) * hd..][..hd]);
            }
        }
    });
    let (code, out) = diff(&reversed, &llama_dir, None);
    assert_eq!(code, 1, "{out}");
    assert!(line(&out, "FIRST DIVERGENCE").contains("prefill, layer 2, attn_ctx"), "{out}");
    assert!(line(&out, "diagnosis:").contains("our head 0 = reference head 13"), "{out}");

    // attn_scores at layer 0 scaled by sqrt(head_dim).
    let scaled = dir.path().join("scaled");
    hand_made(&llama, StageId::layer(0, 0, Stage::AttnScores), &scaled, |data, _| data.iter_mut().for_each(|x| *x *= 8.0));
    let (code, out) = diff(&scaled, &llama_dir, None);
    assert_eq!(code, 1, "{out}");
    assert!(line(&out, "diagnosis:").contains("ours = 8.000000 x reference (sqrt(head_dim))"), "{out}");
}

#[test]
fn a_model_other_than_the_dumps_is_refused() {
    let model = real_model_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let llama_dir = dir.path().join("llama");
    let o = parity(&["capture", "--engine", "llama", "--model", model.to_str().unwrap(), "--prompt", PROMPT, "--layer", "0", "--out", llama_dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut other = read_dump(&llama_dir).unwrap();
    other.model_sha256 = "0".repeat(64);
    let bad = &mut other.tensors.get_mut(&StageId::layer(0, 0, Stage::QProj)).unwrap().tensor;
    bad.data.iter_mut().for_each(|x| *x *= 3.0);
    let (ours_dir, ref_dir) = (dir.path().join("ours"), dir.path().join("ref"));
    write_dump(&other, &ours_dir).unwrap();
    other.tensors.get_mut(&StageId::layer(0, 0, Stage::QProj)).unwrap().tensor.data.iter_mut().for_each(|x| *x /= 3.0);
    write_dump(&other, &ref_dir).unwrap();
    let o = parity(&["diff", ours_dir.to_str().unwrap(), ref_dir.to_str().unwrap(), "--model", model.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("but the dumps are of model 0000"), "{err}");
}
