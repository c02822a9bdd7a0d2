//! Synthetic Qwen2 models: tensor set and shapes as llama.cpp's qwen2 loader
//! requires, config, tokenizer consistency, determinism, weight scales.

use gguf::synth::{byte_symbols, write_tiny_qwen2, SynthSpec, SPECIALS};
use gguf::{GgmlType, GgufError, GgufFile, MetadataValue as V, Qwen2Config};
use std::collections::HashSet;

fn make(spec: &SynthSpec) -> (tempfile::TempDir, GgufFile) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_qwen2(spec, &p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    (dir, f)
}

fn expected_tensors(s: &SynthSpec) -> Vec<(String, Vec<u64>, bool)> {
    let (e, kv, ff, v) = (
        s.n_embd as u64,
        (s.head_dim() * s.n_head_kv) as u64,
        s.n_ff as u64,
        s.n_vocab as u64,
    );
    let mut t = vec![("token_embd.weight".to_string(), vec![e, v], true)];
    for l in 0..s.n_layer {
        let b = |n: &str| format!("blk.{l}.{n}");
        t.push((b("attn_norm.weight"), vec![e], false));
        t.push((b("attn_q.weight"), vec![e, e], true));
        t.push((b("attn_q.bias"), vec![e], false));
        t.push((b("attn_k.weight"), vec![e, kv], true));
        t.push((b("attn_k.bias"), vec![kv], false));
        t.push((b("attn_v.weight"), vec![e, kv], true));
        t.push((b("attn_v.bias"), vec![kv], false));
        t.push((b("attn_output.weight"), vec![e, e], true));
        t.push((b("ffn_norm.weight"), vec![e], false));
        t.push((b("ffn_gate.weight"), vec![e, ff], true));
        t.push((b("ffn_up.weight"), vec![e, ff], true));
        t.push((b("ffn_down.weight"), vec![ff, e], true));
    }
    t.push(("output_norm.weight".into(), vec![e], false));
    if !s.tied_output {
        t.push(("output.weight".into(), vec![e, v], true));
    }
    t
}

fn check_model(spec: &SynthSpec) {
    let (_d, f) = make(spec);
    let c = Qwen2Config::from_gguf(&f).unwrap();
    assert_eq!(c.n_layer, spec.n_layer);
    assert_eq!(c.n_embd, spec.n_embd);
    assert_eq!(c.n_head, spec.n_head);
    assert_eq!(c.n_head_kv, spec.n_head_kv);
    assert_eq!(c.head_dim, spec.n_embd / spec.n_head);
    assert_eq!(c.n_ff, spec.n_ff);
    assert_eq!(c.n_vocab, spec.n_vocab);
    assert_eq!(c.n_ctx_train, spec.n_ctx);
    assert_eq!(c.tied_output, spec.tied_output);
    assert_eq!(c.rope_freq_base, 1e6);
    assert_eq!(c.rms_eps, 1e-6);

    let want = expected_tensors(spec);
    assert_eq!(f.tensors().len(), want.len());
    for (name, dims, is_matrix) in &want {
        let t = f.tensor(name).unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!(&t.dims, dims, "{name}");
        let ty = if *is_matrix {
            spec.weight_type
        } else {
            GgmlType::F32
        };
        assert_eq!(t.ggml_type, ty, "{name}");
        let v = f.dequantize(name).unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let std =
            (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        if name.contains("norm") {
            assert!(
                (mean - 1.0).abs() < 0.05 && std < 0.1,
                "{name}: mean {mean} std {std}"
            );
        } else if name.ends_with(".bias") {
            assert!(
                mean.abs() < 0.02 && std < 0.05,
                "{name}: mean {mean} std {std}"
            );
        } else {
            assert!(
                mean.abs() < 0.02 && (0.015..0.11).contains(&std),
                "{name}: mean {mean} std {std}"
            );
        }
    }
}

#[test]
fn tiny_f32_untied() {
    check_model(&SynthSpec::tiny());
}

#[test]
fn tiny_f16_tied() {
    check_model(&SynthSpec {
        weight_type: GgmlType::F16,
        tied_output: true,
        seed: 7,
        ..SynthSpec::tiny()
    });
}

#[test]
fn other_shapes_and_bigger_vocab() {
    check_model(&SynthSpec {
        n_layer: 3,
        n_embd: 96,
        n_head: 6,
        n_head_kv: 1,
        n_ff: 160,
        n_vocab: 3000,
        n_ctx: 128,
        tied_output: false,
        weight_type: GgmlType::F16,
        seed: 1,
        massive_token: None,
    });
}

#[test]
fn tiny_spec_values() {
    let s = SynthSpec::tiny();
    assert_eq!(
        (
            s.n_layer,
            s.n_embd,
            s.n_head,
            s.n_head_kv,
            s.head_dim(),
            s.n_ff,
            s.n_ctx
        ),
        (2, 64, 4, 2, 16, 128, 256)
    );
    assert!((259..=1000).contains(&s.n_vocab));
}

#[test]
fn deterministic_per_seed() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, seed: u64| {
        let p = dir.path().join(name);
        write_tiny_qwen2(
            &SynthSpec {
                seed,
                ..SynthSpec::tiny()
            },
            &p,
        )
        .unwrap();
        std::fs::read(p).unwrap()
    };
    let a = write("a.gguf", 5);
    let b = write("b.gguf", 5);
    let c = write("c.gguf", 6);
    assert_eq!(a, b);
    assert_eq!(a.len(), c.len());
    assert_ne!(a, c);
}

#[test]
fn tokenizer_is_consistent() {
    let spec = SynthSpec {
        n_vocab: 700,
        ..SynthSpec::tiny()
    };
    let (_d, f) = make(&spec);
    assert_eq!(f.get_str("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(f.get_str("tokenizer.ggml.pre"), Some("qwen2"));
    assert_eq!(f.get_str("general.architecture"), Some("qwen2"));
    assert!(f.get_str("general.name").is_some());
    let strs = |k: &str| -> Vec<String> {
        f.get(k)
            .and_then(V::as_array)
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let tokens = strs("tokenizer.ggml.tokens");
    assert_eq!(tokens.len(), spec.n_vocab);
    let set: HashSet<&String> = tokens.iter().collect();
    assert_eq!(set.len(), tokens.len(), "tokens are unique");
    // The 256 byte symbols first, in GPT-2 order.
    let syms = byte_symbols();
    assert_eq!(syms.len(), 256);
    assert_eq!(syms.iter().map(|s| s.0).collect::<HashSet<u8>>().len(), 256);
    for (i, (_, c)) in syms.iter().enumerate() {
        assert_eq!(tokens[i], c.to_string());
    }
    assert_eq!(tokens[0], "!");
    assert!(tokens.contains(&"Ġ".to_string()) && tokens.contains(&"Ċ".to_string()));
    // Normal tokens are made of byte symbols only (llama.cpp decodes them).
    let sym_chars: HashSet<char> = syms.iter().map(|s| s.1).collect();
    let n_normal = spec.n_vocab - SPECIALS.len();
    for t in &tokens[..n_normal] {
        assert!(t.chars().all(|c| sym_chars.contains(&c)), "{t}");
    }
    assert_eq!(&tokens[n_normal..], &SPECIALS.map(String::from));
    // Every merge joins two tokens into a token.
    let merges = strs("tokenizer.ggml.merges");
    assert!(merges.len() >= n_normal - 256);
    for m in &merges {
        let (a, b) = m.split_once(' ').unwrap_or_else(|| panic!("merge {m:?}"));
        assert!(
            set.contains(&a.to_string()) && set.contains(&b.to_string()),
            "{m}"
        );
        assert!(set.contains(&format!("{a}{b}")), "{m}");
    }
    assert!(
        merges.iter().any(|m| m.starts_with("Ġ ")),
        "corpus merges present"
    );
    // Types: 1 normal, 3 control for the specials.
    let types: Vec<i32> = f
        .get("tokenizer.ggml.token_type")
        .and_then(V::as_array)
        .unwrap()
        .iter()
        .map(|v| match v {
            V::I32(x) => *x,
            o => panic!("{o:?}"),
        })
        .collect();
    assert_eq!(types.len(), spec.n_vocab);
    assert!(types[..n_normal].iter().all(|&t| t == 1));
    assert!(types[n_normal..].iter().all(|&t| t == 3));
    let id = |k: &str| f.get_u64(k).unwrap() as usize;
    assert_eq!(tokens[id("tokenizer.ggml.eos_token_id")], "<|im_end|>");
    assert_eq!(tokens[id("tokenizer.ggml.bos_token_id")], "<|endoftext|>");
    assert_eq!(f.get("tokenizer.ggml.add_bos_token"), Some(&V::Bool(false)));
    // llama.cpp reads these keys with exact types.
    for k in [
        "qwen2.block_count",
        "qwen2.context_length",
        "qwen2.embedding_length",
        "qwen2.feed_forward_length",
        "qwen2.attention.head_count",
        "qwen2.attention.head_count_kv",
        "tokenizer.ggml.eos_token_id",
    ] {
        assert!(matches!(f.get(k), Some(V::U32(_))), "{k}");
    }
    for k in [
        "qwen2.rope.freq_base",
        "qwen2.attention.layer_norm_rms_epsilon",
    ] {
        assert!(matches!(f.get(k), Some(V::F32(_))), "{k}");
    }
}

#[test]
fn invalid_specs_are_errors() {
    let t = SynthSpec::tiny();
    let cases = [
        (
            SynthSpec {
                n_head: 5,
                ..t.clone()
            },
            "n_head 5 does not divide n_embd 64",
        ),
        (
            SynthSpec {
                n_head_kv: 3,
                ..t.clone()
            },
            "n_head_kv 3 does not divide n_head 4",
        ),
        (
            SynthSpec {
                n_vocab: 100,
                ..t.clone()
            },
            "n_vocab 100 is below",
        ),
        (
            SynthSpec {
                weight_type: GgmlType::Q8_0,
                ..t.clone()
            },
            "weight_type Q8_0",
        ),
        (
            SynthSpec {
                n_layer: 0,
                ..t.clone()
            },
            "must all be > 0",
        ),
        (
            SynthSpec {
                n_embd: 60,
                n_head: 4,
                ..t.clone()
            },
            "head_dim 15 must be even",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (spec, want) in cases {
        let e = write_tiny_qwen2(&spec, &dir.path().join("x.gguf")).unwrap_err();
        assert!(matches!(e, GgufError::BadSynthSpec { .. }), "{e:?}");
        assert!(e.to_string().contains(want), "{e} (want {want})");
    }
}
