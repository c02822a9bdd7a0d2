//! Property test on stable Rust (the fuzzing fallback of the robustness
//! issue): 10,000 mutations of a valid GGUF (bytes flipped, overwritten with
//! boundary values, cut, duplicated) must each open cleanly or fail with an
//! error, never panic, and never allocate what a header claims (every size
//! is checked against the file first, so each open stays fast).

use gguf::synth::{write_tiny_qwen2, SynthSpec};
use gguf::{GgufFile, Qwen2Config};
use std::time::Instant;
use testkit::mutate;

#[test]
fn ten_thousand_mutated_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.gguf");
    write_tiny_qwen2(&SynthSpec::tiny(), &base_path).unwrap();
    let base = std::fs::read(&base_path).unwrap();
    let header_len = GgufFile::open(&base_path).unwrap().data_offset() as usize;
    let path = dir.path().join("m.gguf");
    let mut state = 20261125u64;
    let (mut opened, mut refused, mut slowest) = (0usize, 0usize, 0f64);
    for i in 0..10_000 {
        let m = mutate(&base, header_len, &mut state);
        std::fs::write(&path, &m).unwrap();
        let t = Instant::now();
        let outcome = std::panic::catch_unwind(|| match GgufFile::open(&path) {
            Ok(f) => {
                // A file that opens is also read as a model, and a tensor dequantized.
                let _ = Qwen2Config::from_gguf(&f);
                if let Some(info) = f.tensors().first() {
                    let _ = f.dequantize(&info.name);
                }
                true
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                false
            }
        });
        slowest = slowest.max(t.elapsed().as_secs_f64());
        match outcome {
            Ok(true) => opened += 1,
            Ok(false) => refused += 1,
            Err(_) => panic!("mutation {i} panicked (seed 20261125); bytes at {}", path.display()),
        }
    }
    println!("10000 mutations: {opened} opened, {refused} refused, slowest open {slowest:.4} s");
    assert!(refused > 1000, "the mutations must reach the parser's checks: {refused} refused");
    assert!(slowest < 1.0, "an open took {slowest} s: a size was trusted before it was checked?");
}
