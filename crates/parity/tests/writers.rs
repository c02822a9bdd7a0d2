//! The writers for other engines (`writers/python`, `writers/cpp`): their
//! stage tables against the catalogue, their own checks, and end to end on
//! the real model: llama.cpp's tensors written back through each writer
//! match llama.cpp's dump bit for bit under `parity diff`, and one perturbed
//! tensor is named as the first divergence.
//!
//! python3 with numpy, or g++, missing: the test records a skip, or fails
//! under `PARITY_REQUIRE_WRITERS=1` (CI sets it after `scripts/install-deps`).

#[macro_use]
mod common;
use common::parity;

use capture::stage::{Dims, Layout, Stage, StageId, CATALOGUE};
use capture::{read_dump, Capture};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn writers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../writers")
}

fn writers_required() -> bool {
    std::env::var_os("PARITY_REQUIRE_WRITERS").is_some_and(|v| v == "1")
}

/// True when `tool` is usable; otherwise records a skip, or fails when the
/// writers' tools are required.
fn have(tool: &str, usable: bool) -> bool {
    if usable {
        return true;
    }
    if writers_required() {
        panic!("PARITY_REQUIRE_WRITERS=1 but {tool} is missing: run scripts/install-deps");
    }
    testkit::skip(&format!("{tool} not installed"));
    false
}

fn python_with_numpy() -> bool {
    have("python3 with numpy", Command::new("python3").args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success()))
}

fn gpp() -> bool {
    have("g++", Command::new("g++").arg("--version").output().is_ok_and(|o| o.status.success()))
}

/// python3 with the package importable from the checkout (no install needed).
fn python() -> Command {
    let mut c = Command::new("python3");
    c.env("PYTHONPATH", writers_dir().join("python")).env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

fn check_ran(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Compile one of writers/cpp's programs into `dir`.
fn compile(source: &Path, dir: &Path) -> PathBuf {
    let binary = dir.join(source.file_stem().unwrap());
    let o = Command::new("g++")
        .args(["-std=c++17", "-O2", "-Wall", "-Wextra", "-pedantic", "-o"])
        .arg(&binary)
        .arg(source)
        .output()
        .expect("run g++");
    check_ran(&o, &format!("g++ {}", source.display()));
    assert!(o.stderr.is_empty(), "warnings compiling {}:\n{}", source.display(), String::from_utf8_lossy(&o.stderr));
    binary
}

/// How each writer spells a layout: (Python string, C++ enumerator).
fn layout_names(layout: Layout) -> (&'static str, &'static str) {
    match layout {
        Layout::Hidden => ("hidden", "Layout::Hidden"),
        Layout::QHeads => ("q_heads", "Layout::QHeads"),
        Layout::KvHeads => ("kv_heads", "Layout::KvHeads"),
        Layout::Attention => ("attention", "Layout::Attention"),
        Layout::Ffn => ("ffn", "Layout::Ffn"),
        Layout::Vocab => ("vocab", "Layout::Vocab"),
    }
}

/// The lines of `source` after the line starting with `open`, up to the
/// line starting with `close`, trimmed.
fn table_lines<'a>(source: &'a str, open: &str, close: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = source.lines().map(str::trim).collect();
    let start = lines.iter().position(|l| l.starts_with(open)).unwrap_or_else(|| panic!("no line starting {open:?}"));
    lines[start + 1..].iter().take_while(|l| !l.starts_with(close)).copied().collect()
}

#[test]
fn stage_tables_of_both_writers_match_the_catalogue() {
    // The manifest names a stage by its serde name: it must be the catalogue's name.
    for info in &CATALOGUE {
        assert_eq!(serde_json::to_string(&info.stage).unwrap(), format!("\"{}\"", info.name));
    }
    let scope = |global: bool| if global { "global" } else { "layer" };
    let python_expected: Vec<String> = CATALOGUE
        .iter()
        .map(|i| format!("(\"{}\", \"{}\", \"{}\"),", i.name, layout_names(i.layout).0, scope(i.stage.is_global())))
        .collect();
    let cpp_expected: Vec<String> =
        CATALOGUE.iter().map(|i| format!("{{\"{}\", {}, {}}},", i.name, layout_names(i.layout).1, i.stage.is_global())).collect();

    let python = std::fs::read_to_string(writers_dir().join("python/qwen2_parity_dump/stages.py")).unwrap();
    assert_eq!(table_lines(&python, "STAGES = (", ")"), python_expected, "writers/python/qwen2_parity_dump/stages.py");
    let cpp = std::fs::read_to_string(writers_dir().join("cpp/qwen2_parity_dump.hpp")).unwrap();
    assert_eq!(table_lines(&cpp, "inline constexpr StageEntry kStages[] = {", "};"), cpp_expected, "writers/cpp/qwen2_parity_dump.hpp");
}

/// Dimensions all different, so that a swapped axis shows; 3 tokens, 5 cache positions.
const ODD_DIMS: Dims = Dims { n_layer: 2, n_embd: 12, n_head: 4, n_head_kv: 2, head_dim: 3, n_ff: 20, n_vocab: 30 };

/// "name d0 d1 ..." for every stage, as the catalogue's layouts give them.
fn catalogue_shapes() -> Vec<String> {
    CATALOGUE
        .iter()
        .map(|i| {
            let dims: Vec<String> = i.layout.shape(&ODD_DIMS, 3, 5).iter().map(|d| d.to_string()).collect();
            format!("{} {}", i.name, dims.join(" "))
        })
        .collect()
}

#[test]
fn python_writer_computes_the_catalogue_shapes() {
    if !python_with_numpy() {
        return;
    }
    let script = "
from qwen2_parity_dump import STAGES, Dims, canonical_shape
d = Dims(n_layer=2, n_embd=12, n_head=4, n_head_kv=2, head_dim=3, n_ff=20, n_vocab=30)
for name, _, _ in STAGES:
    print(name, *canonical_shape(name, d, 3, 5))
";
    let o = python().args(["-c", script]).output().unwrap();
    check_ran(&o, "python3");
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().collect::<Vec<_>>(), catalogue_shapes());
}

#[test]
fn cpp_writer_computes_the_catalogue_shapes() {
    if !gpp() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("shapes.cpp");
    let program = format!(
        "#include \"{}\"\n#include <iostream>\nint main() {{\n  qwen2_parity_dump::Dims d{{2, 12, 4, 2, 3, 20, 30}};\n  \
         for (const auto& e : qwen2_parity_dump::kStages) {{\n    std::cout << e.name;\n    \
         for (std::size_t n : qwen2_parity_dump::canonical_shape(e.layout, d, 3, 5)) std::cout << ' ' << n;\n    \
         std::cout << '\\n';\n  }}\n}}\n",
        writers_dir().join("cpp/qwen2_parity_dump.hpp").display()
    );
    std::fs::write(&source, program).unwrap();
    let binary = compile(&source, dir.path());
    let o = Command::new(&binary).output().unwrap();
    check_ran(&o, "shapes");
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().collect::<Vec<_>>(), catalogue_shapes());
}

#[test]
fn python_writer_unit_tests() {
    if !python_with_numpy() {
        return;
    }
    let o = python().args(["-m", "unittest", "discover", "-s", "tests", "-v"]).current_dir(writers_dir().join("python")).output().unwrap();
    check_ran(&o, "python3 -m unittest");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("OK") && !stderr.contains("Ran 0 tests"), "{stderr}");
}

#[test]
fn cpp_writer_checks_and_its_dump_reads_back() {
    if !gpp() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(&writers_dir().join("cpp/test_writer.cpp"), dir.path());
    let out = dir.path().join("out");
    let o = Command::new(&binary).arg(&out).output().unwrap();
    check_ran(&o, "test_writer");

    // What the header wrote is what the Rust reader reads (sizes and CRC-32s checked there).
    let dump = read_dump(&out.join("ok")).unwrap();
    assert_eq!(dump.engine, "cpp-test");
    assert_eq!(dump.prompt, "h\u{e9}llo \"quoted\"\n\tline");
    assert_eq!((dump.tokens.clone(), dump.generated.clone()), (vec![5, 6, 7], vec![8, 9]));
    assert_eq!(dump.model_sha256, "a".repeat(64));
    assert_eq!((dump.config.n_decode, dump.config.layers.clone(), dump.config.kv_type.as_str()), (1, vec![0, 1], "f32"));
    assert_eq!(dump.tensors.len(), 3);
    let embed = dump.get(&StageId::global(0, Stage::Embed)).unwrap();
    assert_eq!(embed.shape, vec![3, 12]);
    assert!(embed.data[5].is_nan() && embed.data[6] == f32::NEG_INFINITY && embed.data[7] == 0.25);
    assert_eq!(dump.get(&StageId::layer(1, 1, Stage::AttnScores)).unwrap().data, vec![-1.5; 16]);
    assert_eq!(dump.unavailable, vec![StageId::layer(1, 1, Stage::AttnProbs)]);
    assert!(read_dump(&out.join("ok2")).is_err(), "a reopened dump must not be readable before finish()");
}

// ---- end to end on the real model ----

const PROMPT: &str = "Write a haiku about GPU computing";

/// llama.cpp's capture of layer 0 (and the global stages), prefill and one decode step.
fn llama_dump(model: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("llama");
    let o = parity(&["capture", "--engine", "llama", "--model", model.to_str().unwrap(), "--prompt", PROMPT, "--layer", "0", "--decode", "1", "--out", out.to_str().unwrap()]);
    check_ran(&o, "parity capture --engine llama");
    out
}

/// `parity diff written llama`: its exit code and stdout.
fn diff(written: &Path, llama: &Path) -> (Option<i32>, String) {
    let o = parity(&["diff", written.to_str().unwrap(), llama.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.code() != Some(2), "parity diff refused the dump: {}\n{stdout}", String::from_utf8_lossy(&o.stderr));
    (o.status.code(), stdout)
}

/// The written dump holds exactly llama.cpp's checkpoints with the same bits.
fn assert_same_tensors(written: &Capture, llama: &Capture) {
    assert_eq!(written.tokens, llama.tokens);
    assert_eq!(written.model_sha256, llama.model_sha256);
    assert_eq!(written.tensors.keys().collect::<Vec<_>>(), llama.tensors.keys().collect::<Vec<_>>());
    for (id, t) in &llama.tensors {
        assert!(written.tensors[id].tensor == t.tensor, "{id} differs");
    }
}

fn first_divergence(stdout: &str) -> &str {
    stdout.lines().find(|l| l.starts_with("FIRST DIVERGENCE:")).unwrap_or_else(|| panic!("no first divergence in:\n{stdout}"))
}

/// Writes the dump in argv[1] again through the Python package, as engine
/// "python-writer" into argv[2]; argv[3..] optionally: step layer stage
/// (layer "-" for a global stage) whose last token row is negated (a sign
/// bug: worst-row rel-L2 2, over the free-running gates of 1 and 2 that
/// `parity diff` gives another engine's dump).
const PYTHON_COPY: &str = r#"
import json, os, sys
import numpy as np
from qwen2_parity_dump import Dims, DumpWriter

src, out = sys.argv[1], sys.argv[2]
perturb = None
if len(sys.argv) == 6:
    perturb = (int(sys.argv[3]), None if sys.argv[4] == "-" else int(sys.argv[4]), sys.argv[5])
with open(os.path.join(src, "manifest.json"), encoding="utf-8") as f:
    m = json.load(f)
c = m["config"]
dims = Dims(**{k: c[k] for k in ("n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_ff", "n_vocab")})
dump = DumpWriter(out, engine="python-writer", model_sha256=m["model_sha256"], prompt=m["prompt"],
                  tokens=m["tokens"], dims=dims, chat=m["chat"], kv_type=c["kv_type"])
for e in m["stages"]:
    a = np.load(os.path.join(src, e["file"]))
    if (e["step"], e["layer"], e["stage"]) == perturb:
        a[-1] *= -1
    dump.add(e["step"], e["layer"], e["stage"], a, provenance="numpy " + e["file"])
dump.finish(generated=m["generated"])
print(len(m["stages"]))
"#;

#[test]
fn python_writer_dump_matches_llama_and_names_a_perturbed_stage() {
    let model = real_model_or_skip!();
    if !python_with_numpy() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let llama = llama_dump(&model, dir.path());
    let reference = read_dump(&llama).unwrap();
    let n = reference.tensors.len();
    assert_eq!(n, 2 * (3 + 17), "prefill and one decode step, layer 0 and the global stages");

    let written = dir.path().join("python");
    let o = python().args(["-c", PYTHON_COPY]).arg(&llama).arg(&written).output().unwrap();
    check_ran(&o, "the Python copy");
    let copy = read_dump(&written).unwrap();
    assert_eq!(copy.engine, "python-writer");
    assert_same_tensors(&copy, &reference);
    let (code, stdout) = diff(&written, &llama);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains(&format!("MATCH: {n} stages within thresholds")), "{stdout}");

    let perturbed = dir.path().join("python-perturbed");
    let o = python().args(["-c", PYTHON_COPY]).arg(&llama).arg(&perturbed).args(["0", "0", "q_proj"]).output().unwrap();
    check_ran(&o, "the perturbed Python copy");
    let (code, stdout) = diff(&perturbed, &llama);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(first_divergence(&stdout).starts_with("FIRST DIVERGENCE: prefill, layer 0, q_proj:"), "{stdout}");
}

/// Writes every checkpoint of `dump` as a raw little-endian f32 file under
/// `dir` with the index `raw_to_dump` reads; `negate_last_row` (one
/// checkpoint) has its last token row negated, as in `PYTHON_COPY`.
fn write_raw(dump: &Capture, dir: &Path, negate_last_row: Option<StageId>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let c = &dump.config;
    let list = |v: &[i32]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ");
    let mut index = format!(
        "engine cpp-writer\nmodel_sha256 {}\nprompt {}\nchat {}\ntokens {}\ndims {} {} {} {} {} {} {}\nkv_type {}\ngenerated {}\n",
        dump.model_sha256,
        dump.prompt,
        u8::from(dump.chat),
        list(&dump.tokens),
        c.n_layer,
        c.n_embd,
        c.n_head,
        c.n_head_kv,
        c.head_dim,
        c.n_ff,
        c.n_vocab,
        c.kv_type,
        list(&dump.generated)
    );
    for (i, (id, captured)) in dump.tensors.iter().enumerate() {
        let mut tensor = captured.tensor.clone();
        if Some(*id) == negate_last_row {
            let width = tensor.row(0).len();
            let n = tensor.data.len();
            tensor.data[n - width..].iter_mut().for_each(|x| *x = -*x);
        }
        let file = format!("t{i}.f32");
        let bytes: Vec<u8> = tensor.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.join(&file), bytes).unwrap();
        let layer = id.layer.map_or("-".to_string(), |l| l.to_string());
        let shape: Vec<String> = tensor.shape.iter().map(|d| d.to_string()).collect();
        index += &format!("tensor {} {layer} {} {file} {}\n", id.step, id.stage, shape.join(" "));
    }
    let path = dir.join("index.txt");
    std::fs::write(&path, index).unwrap();
    path
}

#[test]
fn cpp_writer_dump_matches_llama_and_names_a_perturbed_stage() {
    let model = real_model_or_skip!();
    if !gpp() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw_to_dump = compile(&writers_dir().join("cpp/raw_to_dump.cpp"), dir.path());
    let llama = llama_dump(&model, dir.path());
    let reference = read_dump(&llama).unwrap();
    let n = reference.tensors.len();

    let written = dir.path().join("cpp");
    let o = Command::new(&raw_to_dump).arg(write_raw(&reference, &dir.path().join("raw"), None)).arg(&written).output().unwrap();
    check_ran(&o, "raw_to_dump");
    let copy = read_dump(&written).unwrap();
    assert_eq!(copy.engine, "cpp-writer");
    assert_eq!(copy.prompt, PROMPT);
    assert_eq!(copy.generated, reference.generated);
    assert_same_tensors(&copy, &reference);
    let (code, stdout) = diff(&written, &llama);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains(&format!("MATCH: {n} stages within thresholds")), "{stdout}");

    // A decode-step checkpoint this time: the first divergence names the step too.
    let ffn_up = StageId::layer(1, 0, Stage::FfnUp);
    let perturbed = dir.path().join("cpp-perturbed");
    let o = Command::new(&raw_to_dump)
        .arg(write_raw(&reference, &dir.path().join("raw-perturbed"), Some(ffn_up)))
        .arg(&perturbed)
        .output()
        .unwrap();
    check_ran(&o, "raw_to_dump (perturbed)");
    let (code, stdout) = diff(&perturbed, &llama);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(first_divergence(&stdout).starts_with("FIRST DIVERGENCE: decode 1, layer 0, ffn_up:"), "{stdout}");
}
