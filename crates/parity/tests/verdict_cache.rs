//! Verdicts from the reference cache and memory that follows what is
//! compared: the capture size estimate against real captures, a damaged
//! cache entry recomputed (never trusted), `run --layer 0` on a long
//! prompt (compared chunk by chunk) within its memory bound, and a
//! comparison in chunks giving the verdict of one pass.

#[macro_use]
mod common;

use capture::Stage;
use parity::ours::{EngineOptions, Mode, OurEngine};
use parity::chunked::{chunked_bytes, runs_in_chunks, whole_bytes};
use parity::session::{capture_bytes, dims_of, ModelFile};
use parity::verdict_bench::{long_prompt, PEAK_RSS_ENV};
use std::process::{Command, Output};

fn bytes_of(c: &capture::Capture) -> u64 {
    c.tensors.values().map(|t| t.tensor.data.len() as u64 * 4).sum()
}

#[test]
fn the_memory_estimate_is_the_size_of_the_captures_it_estimates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    gguf::synth::write_tiny_qwen2(&gguf::synth::SynthSpec::tiny(), &path).unwrap();
    let model = ModelFile::open(&path).unwrap();
    let c = &model.cfg;
    let d = dims_of(c);
    let mut ours = OurEngine::load(&model.gguf, c, EngineOptions::new(parity::ours::BackendKind::Cpu)).unwrap();
    let tokens = [1, 2, 3, 4, 5];
    let full = ours.run(&tokens, 3, None, None, Mode::Observe).unwrap();
    assert_eq!(bytes_of(&full), capture_bytes(&d, 5, 3, None, &|_| true));
    // a free-running pass over layer 0 ends there: the embedding is its only global stage
    let one = ours.run(&tokens, 3, Some(&[7, 8, 9]), Some(vec![0]), Mode::ObserveSelected).unwrap();
    assert_eq!(one.config.ended_after_layer, Some(0));
    assert!(one.generated.is_empty(), "no logits, no greedy token");
    assert_eq!(bytes_of(&one), capture_bytes(&d, 5, 3, Some(&[0]), &|s| s == Stage::Embed));
}

fn run_with_cache(cache: &std::path::Path, model: &std::path::Path, prompt: &str, extra: &[&str]) -> Output {
    let mut args = vec!["run", "--model", model.to_str().unwrap(), "--prompt", prompt];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_parity"))
        .args(&args)
        .env("QWEN2_PARITY_REF_CACHE", cache)
        .env(PEAK_RSS_ENV, "1")
        .output()
        .expect("run parity")
}

fn verdict_line(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout);
    out.lines().find(|l| l.starts_with("MATCH") || l.starts_with("DIVERGED")).unwrap_or("").to_string()
}

fn peak_rss_bytes(o: &Output) -> u64 {
    let err = String::from_utf8_lossy(&o.stderr);
    let kib: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("peak RSS (VmHWM): "))
        .and_then(|v| v.trim_end_matches(" KiB").parse().ok())
        .expect("peak RSS reported");
    kib * 1024
}

#[test]
fn a_damaged_cache_entry_is_recomputed_and_gives_the_same_verdict() {
    let model = real_model_or_skip!();
    let cache = tempfile::tempdir().unwrap();
    let prompt = "Write a haiku about GPU computing";
    let args = ["--layer", "3", "--decode", "2"];
    let first = run_with_cache(cache.path(), &model, prompt, &args);
    assert_eq!(first.status.code(), Some(0), "{}", String::from_utf8_lossy(&first.stderr));
    let entries: Vec<_> = std::fs::read_dir(cache.path()).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(entries.len(), 1, "one reference stored: {entries:?}");
    let entry = &entries[0];
    let good = std::fs::read(entry).unwrap();

    // warm: the same verdict, llama.cpp not loaded (no model load line)
    let warm = run_with_cache(cache.path(), &model, prompt, &args);
    assert_eq!(verdict_line(&warm), verdict_line(&first));
    assert!(!String::from_utf8_lossy(&warm.stderr).contains("recomputing"));

    for (what, damaged) in [
        ("a flipped bit", {
            let mut b = good.clone();
            let mid = b.len() / 2;
            b[mid] ^= 0x04;
            b
        }),
        ("a truncated file", good[..good.len() / 3].to_vec()),
        ("an empty file", Vec::new()),
    ] {
        std::fs::write(entry, &damaged).unwrap();
        let again = run_with_cache(cache.path(), &model, prompt, &args);
        let err = String::from_utf8_lossy(&again.stderr);
        assert_eq!(again.status.code(), Some(0), "{what}: {err}");
        assert!(err.contains("recomputing"), "{what}: the damaged entry must be reported and recomputed: {err}");
        assert_eq!(verdict_line(&again), verdict_line(&first), "{what}");
        assert_eq!(std::fs::read(entry).unwrap(), good, "{what}: the recomputed entry is the original, byte for byte");
    }
}

/// The token count a run's header states.
fn prompt_tokens(o: &Output) -> usize {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.rsplit_once(" (").and_then(|(_, t)| t.strip_suffix(" tokens)")).and_then(|n| n.parse::<usize>().ok()))
        .expect("token count in the header")
}

#[test]
fn layer_0_on_a_long_prompt_stays_within_its_memory_bound() {
    let model = real_model_or_skip!();
    let cache = tempfile::tempdir().unwrap();
    let json = cache.path().join("report.json");
    let prompt = long_prompt(600);
    let o = run_with_cache(cache.path(), &model, &prompt, &["--layer", "0", "--json", json.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let n_prompt = prompt_tokens(&o);
    let m = ModelFile::open(&model).unwrap();
    let d = dims_of(&m.cfg);
    // Held whole, its captures would pass the line: it ran chunk by chunk,
    // every pass ending after layer 0.
    assert!(runs_in_chunks(&d, n_prompt, 0, Some(&[0])));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let config = report["configuration"].to_string();
    assert!(config.contains("compared in chunks") && config.contains("ended after layer 0"), "{config}");
    assert!(report["stages"].as_array().unwrap().iter().all(|r| r["stage"] != "logits"));
    // What it may hold: the weights as both engines map them (the file,
    // twice at most), one chunk's captures on the three sides with
    // llama.cpp's working buffers, and 200 MB for everything else.
    let bound = 2 * m.gguf.file_size() + chunked_bytes(&d, n_prompt, 0, Some(&[0])) + (200 << 20);
    let peak = peak_rss_bytes(&o);
    let mib = |b: u64| b >> 20;
    eprintln!("{n_prompt} tokens: peak RSS {} MiB, bound {} MiB (held whole: {} MiB)", mib(peak), mib(bound), mib(whole_bytes(&d, n_prompt, 0, Some(&[0]))));
    assert!(peak <= bound, "--layer 0 on {n_prompt} tokens peaked at {} MiB, over its bound of {} MiB", mib(peak), mib(bound));
}

#[test]
fn a_long_prompt_compared_in_chunks_gets_the_verdict_of_one_pass() {
    let model = real_model_or_skip!();
    let cache = tempfile::tempdir().unwrap();
    let prompt = long_prompt(220);
    // With a decode step the passes run to the logits: every stage compared.
    let report = |chunk_above_mb: &str, name: &str| {
        let json = cache.path().join(name);
        let args = ["run", "--model", model.to_str().unwrap(), "--prompt", &prompt, "--layer", "0", "--decode", "1", "--no-cache", "--json", json.to_str().unwrap()];
        let o = Command::new(env!("CARGO_BIN_EXE_parity")).args(args).env("QWEN2_PARITY_CHUNK_ABOVE_MB", chunk_above_mb).output().expect("run parity");
        assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(&json).unwrap()).unwrap()
    };
    let chunked = report("0", "chunked.json");
    let whole = report("1000000", "whole.json");
    assert!(chunked["configuration"].to_string().contains("compared in chunks"));
    assert!(!whole["configuration"].to_string().contains("compared in chunks"));
    assert_eq!(chunked["verdict"], whole["verdict"]);
    let stages = |r: &serde_json::Value| r["stages"].as_array().unwrap().clone();
    let (a, b) = (stages(&chunked), stages(&whole));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().any(|r| r["stage"] == "logits") && a.iter().any(|r| r["stage"] == "attn_scores"));
    for (x, y) in a.iter().zip(&b) {
        let what = format!("{} layer {} step {}", x["stage"], x["layer"], x["step"]);
        assert_eq!((&x["stage"], &x["layer"], &x["step"], &x["n"], &x["shape"]), (&y["stage"], &y["layer"], &y["step"], &y["n"], &y["shape"]), "{what}");
        // The same tensors (llama.cpp's chunks are its one pass's rows, bit
        // for bit), the same worst element; sums differ in f64 order only.
        assert_eq!(x["max_abs"], y["max_abs"], "{what}");
        assert_eq!(x["worst"]["flat_index"], y["worst"]["flat_index"], "{what}");
        for key in ["rel_l2", "row_rel_l2_max", "row_rel_l2_median"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!((p - q).abs() <= 1e-9 * q.abs().max(1e-30), "{what} {key}: {p} vs {q}");
        }
    }
    assert_eq!(chunked["logits"], whole["logits"]);
}
