//! Every bad input of the README's robustness table, through the built
//! binary: the exit code, one `error:` line that names the problem, no
//! panic. The table in the README is checked to list each case.
//!
//! The models are the synthetic tiny Qwen2 (written here) and byte-level
//! mutations of it, so the whole table runs offline in seconds.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

struct Case {
    /// The README table's first column.
    what: &'static str,
    args: Vec<String>,
    exit: i32,
    needle: &'static str,
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> usize {
    from + hay[from..].windows(needle.len()).position(|w| w == needle).expect("pattern in the file")
}

/// `src` with `bytes` written at `at`.
fn patch(src: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut out = src.to_vec();
    out[at..at + bytes.len()].copy_from_slice(bytes);
    out
}

/// Byte offset of the type field of tensor `name`'s info (its offset field follows).
fn type_field(src: &[u8], name: &str) -> usize {
    let k = find(src, name.as_bytes(), 0) + name.len();
    let n_dims = u32::from_le_bytes(src[k..k + 4].try_into().unwrap()) as usize;
    k + 4 + 8 * n_dims
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// A dump of the tiny model written by `parity capture`, copied to `name`.
fn dump(dir: &Path, model: &str, name: &str, prompt: &str) -> PathBuf {
    let out = dir.join(name);
    let o = common::parity(&["capture", "--engine", "ours", "--model", model, "--prompt", prompt, "--decode", "1", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "capture: {}", String::from_utf8_lossy(&o.stderr));
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

fn cases(dir: &Path) -> Vec<Case> {
    let tiny = dir.join("tiny.gguf");
    gguf::synth::write_tiny_qwen2(&gguf::synth::SynthSpec::tiny(), &tiny).unwrap();
    let src = std::fs::read(&tiny).unwrap();
    let m = tiny.display().to_string();
    let wide = dir.join("tiny256.gguf");
    gguf::synth::write_tiny_qwen2(&gguf::synth::SynthSpec { n_embd: 256, n_ff: 512, ..gguf::synth::SynthSpec::tiny() }, &wide).unwrap();
    let wide_src = std::fs::read(&wide).unwrap();

    let arch = find(&src, b"qwen2", find(&src, b"general.architecture", 0));
    let q_type = type_field(&src, "blk.0.attn_q.weight");
    let q_offset = u64::from_le_bytes(src[q_type + 4..q_type + 12].try_into().unwrap());
    let k_type = type_field(&src, "blk.0.attn_k.weight");
    let table = find(&src, b"token_embd.weight", 0);
    let huge = (1u64 << 60).to_le_bytes();
    let models: Vec<(&'static str, String, &'static str)> = vec![
        ("model: missing file", dir.join("missing.gguf").display().to_string(), "file not found"),
        ("model: a directory", dir.display().to_string(), "is a directory, not a GGUF file"),
        ("model: empty file", put(dir, "empty.gguf", b""), "truncated in header"),
        ("model: not a GGUF (text)", put(dir, "text.gguf", &b"not a model\n".repeat(20)), "not a GGUF file"),
        ("model: truncated in the header", put(dir, "cut-header.gguf", &src[..10]), "truncated in header"),
        ("model: truncated in the tensor table", put(dir, "cut-table.gguf", &src[..table + 8]), "beyond the end of the file"),
        ("model: truncated in the tensor data", put(dir, "cut-data.gguf", &src[..src.len() - 1000]), "truncated in tensor data"),
        ("model: another architecture", put(dir, "llama.gguf", &patch(&src, arch, b"llama")), "architecture is 'llama', expected 'qwen2'"),
        ("model: unknown tensor type id", put(dir, "type4.gguf", &patch(&src, q_type, &4u32.to_le_bytes())), "unknown ggml type id 4"),
        ("model: tensor count 2^60", put(dir, "n-tensors.gguf", &patch(&src, 8, &huge)), "tensor count 1152921504606846976 cannot be right"),
        ("model: metadata key count 2^60", put(dir, "n-kv.gguf", &patch(&src, 16, &huge)), "metadata count 1152921504606846976 cannot be right"),
        ("model: string length 2^60", put(dir, "string.gguf", &patch(&src, 24, &huge)), "string length 1152921504606846976"),
        ("model: tensor offset past the end", put(dir, "offset.gguf", &patch(&src, q_type + 4, &(1u64 << 40).to_le_bytes())), "is out of bounds"),
        ("model: misaligned tensor", put(dir, "misaligned.gguf", &patch(&src, q_type + 4, &(q_offset + 4).to_le_bytes())), "is not a multiple of the alignment"),
        ("model: overlapping tensors", put(dir, "overlap.gguf", &patch(&src, k_type + 4, &q_offset.to_le_bytes())), "overlap"),
    ];
    let mut out: Vec<Case> = models
        .into_iter()
        .map(|(what, path, needle)| Case { what, args: s(&["inspect", "--model", &path]), exit: 2, needle })
        .collect();
    let iq = type_field(&wide_src, "blk.0.attn_q.weight");
    let iq_model = put(dir, "iq2.gguf", &patch(&wide_src, iq, &16u32.to_le_bytes()));
    out.push(Case { what: "model: unsupported quant type (IQ2_XXS)", args: s(&["run", "--model", &iq_model, "--prompt", "hi"]), exit: 2, needle: "unsupported quant type" });

    let run = |extra: &[&str]| -> Vec<String> {
        let mut a = s(&["run", "--model", &m, "--prompt", "hello tiny model"]);
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let long = "hello ".repeat(300);
    let bad_json = put(dir, "bad.json", b"{ not json");
    // Calibrated for the real model: refused for the tiny one.
    let other_model = parity::fixtures::fixtures_dir().unwrap().join("thresholds/1d9614638d18024d-cpu.json").display().to_string();
    out.extend([
        Case { what: "run: empty prompt", args: run(&[]).into_iter().map(|a| if a == "hello tiny model" { String::new() } else { a }).collect(), exit: 2, needle: "no tokens" },
        Case { what: "run: prompt longer than the context", args: s(&["run", "--model", &m, "--prompt", &long]), exit: 2, needle: "exceeds the model's context" },
        Case { what: "run: decode past the context", args: run(&["--decode", "1000"]), exit: 2, needle: "exceeds the model's context" },
        Case { what: "run: --layer out of range", args: run(&["--layer", "2"]), exit: 2, needle: "out of range" },
        Case { what: "run: reversed range", args: run(&["--layers", "1..=0"]), exit: 2, needle: "reversed" },
        Case { what: "run: half-open range A..B", args: run(&["--layers", "0..1"]), exit: 2, needle: "write 0..=1" },
        Case { what: "run: negative threshold", args: run(&["--threshold=-1"]), exit: 2, needle: "must be a positive number" },
        Case { what: "run: NaN threshold", args: run(&["--threshold", "NaN"]), exit: 2, needle: "must be a positive number" },
        Case { what: "run: malformed thresholds file", args: run(&["--thresholds", &bad_json]), exit: 2, needle: "bad.json" },
        Case { what: "run: thresholds recorded for another model", args: run(&["--thresholds", &other_model]), exit: 2, needle: "recorded for model sha256" },
        Case { what: "run: unknown fault", args: run(&["--fault", "nope"]), exit: 2, needle: "unknown fault" },
        Case { what: "run: unwritable report path", args: run(&["--json", "/nonexistent-dir/report.json"]), exit: 2, needle: "/nonexistent-dir/report.json" },
        Case { what: "gate: shard 0/3", args: s(&["gate", "--model", &m, "--prompts", &bad_json, "--shard", "0/3"]), exit: 2, needle: "expected I/N" },
        Case { what: "gate: --fault at a layer the model lacks", args: s(&["gate", "--model", &m, "--prompts", &bad_json, "--fault", "rope-adjacent@5"]), exit: 2, needle: "layer 5 out of range" },
        Case { what: "generate: -n 0", args: s(&["generate", "--model", &m, "--prompt", "hi", "-n", "0"]), exit: 2, needle: "-n must be at least 1" },
    ]);
    if parity::ours::cuda_available().is_err() {
        out.push(Case { what: "run: --backend cuda with no GPU", args: run(&["--backend", "cuda"]), exit: 2, needle: "no CUDA device: use --backend cpu" });
    }

    // Dumps.
    let good = dump(dir, &m, "good", "hello tiny model");
    let other = dump(dir, &m, "other-prompt", "a different prompt");
    let other_model_dump = dump(dir, &wide.display().to_string(), "other-model", "hello tiny model");
    let variant = |name: &str, change: &dyn Fn(&Path)| -> String {
        let d = dir.join(name);
        copy_dir(&good, &d);
        change(&d);
        d.display().to_string()
    };
    let g = good.display().to_string();
    let no_manifest = variant("no-manifest", &|d| std::fs::remove_file(d.join("manifest.json")).unwrap());
    let bad_manifest = variant("bad-manifest", &|d| std::fs::write(d.join("manifest.json"), "{ truncated").unwrap());
    let npy = "step0/layer00/attn_norm.npy";
    let no_npy = variant("no-npy", &|d| std::fs::remove_file(d.join(npy)).unwrap());
    let bad_npy = variant("bad-npy", &|d| std::fs::write(d.join(npy), b"\x93NUMPY\x01\x00garbage").unwrap());
    let cut_npy = variant("cut-npy", &|d| {
        let b = std::fs::read(d.join(npy)).unwrap();
        std::fs::write(d.join(npy), &b[..b.len() - 8]).unwrap();
    });
    let changed_npy = variant("changed-npy", &|d| {
        let mut b = std::fs::read(d.join(npy)).unwrap();
        let last = b.len() - 1;
        b[last] ^= 0x10;
        std::fs::write(d.join(npy), b).unwrap();
    });
    let shape = variant("shape", &|d| {
        let t = std::fs::read_to_string(d.join("manifest.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        let mut v = v;
        for st in v["stages"].as_array_mut().unwrap() {
            if st["file"] == npy {
                st["shape"] = serde_json::json!([1, 1]);
                st.as_object_mut().unwrap().remove("bytes");
                st.as_object_mut().unwrap().remove("crc32");
            }
        }
        std::fs::write(d.join("manifest.json"), serde_json::to_string(&v).unwrap()).unwrap();
    });
    let nan = variant("nan", &|d| {
        capture::write_npy(&d.join(npy), &{
            let mut t = capture::read_npy(&d.join(npy)).unwrap();
            t.data[0] = f32::NAN;
            t
        })
        .unwrap();
        let t = std::fs::read_to_string(d.join("manifest.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&t).unwrap();
        for st in v["stages"].as_array_mut().unwrap() {
            if st["file"] == npy {
                st.as_object_mut().unwrap().remove("bytes");
                st.as_object_mut().unwrap().remove("crc32");
            }
        }
        std::fs::write(d.join("manifest.json"), serde_json::to_string(&v).unwrap()).unwrap();
    });
    let diff = |a: &str, b: &str| s(&["diff", a, b]);
    out.extend([
        Case { what: "diff: missing manifest", args: diff(&no_manifest, &g), exit: 2, needle: "a capture that did not finish" },
        Case { what: "diff: malformed manifest", args: diff(&bad_manifest, &g), exit: 2, needle: "manifest.json" },
        Case { what: "diff: missing .npy", args: diff(&no_npy, &g), exit: 2, needle: "attn_norm.npy" },
        Case { what: "diff: malformed .npy header", args: diff(&bad_npy, &g), exit: 2, needle: "attn_norm.npy" },
        Case { what: "diff: .npy cut short after the capture", args: diff(&cut_npy, &g), exit: 2, needle: "the manifest records" },
        Case { what: "diff: .npy changed after the capture", args: diff(&changed_npy, &g), exit: 2, needle: "CRC-32" },
        Case { what: "diff: shape mismatch with the manifest", args: diff(&shape, &g), exit: 2, needle: "but the manifest says" },
        Case { what: "diff: dumps of different prompts", args: diff(&other.display().to_string(), &g), exit: 2, needle: "different" },
        Case {
            what: "capture: --out over an existing dump (replaced, never mixed)",
            args: s(&["capture", "--engine", "ours", "--model", &m, "--prompt", "hello tiny model", "--out", &other.display().to_string()]),
            exit: 0,
            needle: "stages written",
        },
        Case { what: "diff: dumps of different models", args: diff(&other_model_dump.display().to_string(), &g), exit: 2, needle: "different models" },
        Case { what: "diff: NaN in a dump (never passes)", args: diff(&nan, &g), exit: 1, needle: "NaN/Inf values" },
    ]);
    out
}

#[test]
fn every_bad_input_gets_one_line_and_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases(dir.path());
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let o = Command::new(env!("CARGO_BIN_EXE_parity")).args(&c.args).env("QWEN2_PARITY_REF_CACHE", dir.path().join("refs")).output().unwrap();
        let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        let text = format!("{out}{err}");
        let ok = o.status.code() == Some(c.exit)
            && text.contains(c.needle)
            && !text.contains("panicked")
            && !text.contains("RUST_BACKTRACE")
            && (c.exit != 2 || errors.len() == 1);
        // The README's table row (`--nocapture` prints the table).
        let line = err.lines().find(|l| l.starts_with("error")).or_else(|| out.lines().find(|l| l.contains(c.needle))).unwrap_or("");
        let shown = line.replace(&dir.path().display().to_string(), "…").replace('|', "\\|");
        println!("| {} | {} | `{}` |", c.what, o.status.code().unwrap_or(-1), shown.chars().take(160).collect::<String>());
        if !ok {
            failures.push(format!("{}: exit {:?} (want {}), needle {:?}\n  stderr: {}", c.what, o.status.code(), c.exit, c.needle, err.trim()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_readme_table_lists_every_case() {
    let dir = tempfile::tempdir().unwrap();
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md")).unwrap();
    for c in cases(dir.path()) {
        assert!(readme.contains(&format!("| {} |", c.what)), "README's robustness table lacks {:?}", c.what);
    }
}

/// A process that runs past `limit` is killed and reported as a hang.
fn run_bounded(args: &[&str], limit: std::time::Duration) -> Option<std::process::ExitStatus> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_parity"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn a_thousand_mutated_models_through_inspect_never_panic_or_hang() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.gguf");
    gguf::synth::write_tiny_qwen2(&gguf::synth::SynthSpec::tiny(), &base_path).unwrap();
    let base = std::fs::read(&base_path).unwrap();
    let header_len = gguf::GgufFile::open(&base_path).unwrap().data_offset() as usize;
    let path = dir.path().join("m.gguf");
    let mut state = 7u64;
    let (mut ok, mut refused) = (0, 0);
    for i in 0..1000 {
        std::fs::write(&path, testkit::mutate(&base, header_len, &mut state)).unwrap();
        match run_bounded(&["inspect", "--model", path.to_str().unwrap()], std::time::Duration::from_secs(10)).map(|s| s.code()) {
            Some(Some(0)) => ok += 1,
            Some(Some(2)) => refused += 1,
            other => panic!("mutation {i}: {other:?} (101 is a panic, None a hang or a signal)"),
        }
    }
    println!("1000 mutated models through inspect: {ok} exit 0, {refused} exit 2");
}
