//! The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M file, if cached.

use gguf::{GgmlType, GgufFile, Qwen2Config};
use std::collections::BTreeMap;

#[test]
fn real_model() {
    let path = testkit::real_model_or_skip!();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.file_size(), 491_400_064);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.architecture(), Some("qwen2"));
    assert_eq!(f.tensors().len(), 291);
    let c = Qwen2Config::from_gguf(&f).unwrap();
    assert_eq!(
        c,
        Qwen2Config {
            n_layer: 24,
            n_embd: 896,
            n_head: 14,
            n_head_kv: 2,
            head_dim: 64,
            n_ff: 4864,
            n_vocab: 151_936,
            rope_freq_base: 1e6,
            rms_eps: 1e-6,
            n_ctx_train: 32768,
            tied_output: false,
        }
    );
    let mut by_type: BTreeMap<&str, usize> = BTreeMap::new();
    for t in f.tensors() {
        *by_type.entry(t.ggml_type.name()).or_default() += 1;
    }
    let types: Vec<&str> = by_type.keys().copied().collect();
    assert_eq!(
        types,
        ["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"],
        "{by_type:?}"
    );
    assert_eq!(f.tensor("output.weight").unwrap().ggml_type, GgmlType::Q8_0);
    assert_eq!(
        f.get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len()),
        Some(151_936)
    );

    let t0 = std::time::Instant::now();
    let mut total = 0usize;
    for t in f.tensors() {
        let v = f.dequantize(&t.name).unwrap();
        assert_eq!(v.len() as u64, t.n_elements);
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{} has non-finite values",
            t.name
        );
        assert!(v.iter().any(|&x| x != 0.0), "{} is all zeros", t.name);
        total += v.len();
    }
    println!("dequantized {total} elements in {:?}", t0.elapsed());
    // Norm weights are the F32 tensors and sensible.
    let norm = f.dequantize("blk.0.attn_norm.weight").unwrap();
    assert_eq!(norm.len(), 896);
}
