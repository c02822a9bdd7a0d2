//! Qwen2Config::from_gguf: values, defaults, and each error.

use gguf::{GgmlType, GgufError, GgufFile, GgufWriter, MetadataValue as V, Qwen2Config};

const KEYS: [&str; 7] = [
    "qwen2.block_count",
    "qwen2.embedding_length",
    "qwen2.attention.head_count",
    "qwen2.attention.head_count_kv",
    "qwen2.feed_forward_length",
    "qwen2.attention.layer_norm_rms_epsilon",
    "qwen2.context_length",
];

/// A metadata-only qwen2 file; `skip` drops a key, `set` overrides one.
fn file(skip: &[&str], set: &[(&str, V)], output: bool) -> (tempfile::TempDir, GgufFile) {
    let mut kv: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("qwen2".into())),
        ("qwen2.block_count", V::U32(3)),
        ("qwen2.embedding_length", V::U32(64)),
        ("qwen2.attention.head_count", V::U32(8)),
        ("qwen2.attention.head_count_kv", V::U32(2)),
        ("qwen2.feed_forward_length", V::U32(96)),
        ("qwen2.rope.freq_base", V::F32(1e6)),
        ("qwen2.attention.layer_norm_rms_epsilon", V::F32(1e-6)),
        ("qwen2.context_length", V::U64(4096)),
    ];
    for (k, v) in set {
        match kv.iter_mut().find(|(kk, _)| kk == k) {
            Some(e) => e.1 = v.clone(),
            None => kv.push((k, v.clone())),
        }
    }
    let mut w = GgufWriter::new();
    for (k, v) in kv.into_iter().filter(|(k, _)| !skip.contains(k)) {
        w.add(k, v);
    }
    if !skip.contains(&"token_embd.weight") {
        w.add_tensor(
            "token_embd.weight",
            vec![64, 10],
            GgmlType::F16,
            vec![0; 64 * 10 * 2],
        )
        .unwrap();
    }
    if output {
        w.add_tensor(
            "output.weight",
            vec![64, 10],
            GgmlType::F16,
            vec![0; 64 * 10 * 2],
        )
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cfg.gguf");
    w.write(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    (dir, f)
}

#[test]
fn reads_every_field() {
    let (_d, f) = file(&[], &[], true);
    let c = Qwen2Config::from_gguf(&f).unwrap();
    assert_eq!(
        c,
        Qwen2Config {
            n_layer: 3,
            n_embd: 64,
            n_head: 8,
            n_head_kv: 2,
            head_dim: 8,
            n_ff: 96,
            n_vocab: 10,
            rope_freq_base: 1e6,
            rms_eps: 1e-6,
            n_ctx_train: 4096,
            tied_output: false,
        }
    );
}

#[test]
fn tied_output_when_no_output_weight() {
    let (_d, f) = file(&[], &[], false);
    assert!(Qwen2Config::from_gguf(&f).unwrap().tied_output);
}

#[test]
fn defaults_for_optional_keys() {
    let (_d, f) = file(
        &["qwen2.attention.head_count_kv", "qwen2.rope.freq_base"],
        &[],
        true,
    );
    let c = Qwen2Config::from_gguf(&f).unwrap();
    assert_eq!(c.n_head_kv, 8);
    assert_eq!(c.rope_freq_base, 10000.0);
}

#[test]
fn wrong_architecture() {
    let (_d, f) = file(
        &[],
        &[("general.architecture", V::String("llama".into()))],
        true,
    );
    let e = Qwen2Config::from_gguf(&f).unwrap_err();
    assert!(
        matches!(e, GgufError::WrongArchitecture { ref arch, .. } if arch == "llama"),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("architecture is 'llama', expected 'qwen2'"),
        "{e}"
    );
}

#[test]
fn missing_architecture() {
    let (_d, f) = file(&["general.architecture"], &[], true);
    let e = Qwen2Config::from_gguf(&f).unwrap_err();
    assert!(
        matches!(e, GgufError::MissingKey { ref key, .. } if key == "general.architecture"),
        "{e:?}"
    );
}

#[test]
fn each_missing_required_key() {
    for key in KEYS
        .iter()
        .filter(|k| **k != "qwen2.attention.head_count_kv")
    {
        let (_d, f) = file(&[key], &[], true);
        let e = Qwen2Config::from_gguf(&f).unwrap_err();
        assert!(
            matches!(e, GgufError::MissingKey { key: ref k, .. } if k == key),
            "{key}: {e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("missing metadata key '{key}'")) && msg.contains("cfg.gguf"),
            "{msg}"
        );
    }
}

#[test]
fn wrong_key_type() {
    let (_d, f) = file(&[], &[("qwen2.block_count", V::String("3".into()))], true);
    let e = Qwen2Config::from_gguf(&f).unwrap_err();
    assert!(
        matches!(e, GgufError::WrongKeyType { ref key, .. } if key == "qwen2.block_count"),
        "{e:?}"
    );
    let (_d, f) = file(&[], &[("qwen2.block_count", V::I32(-3))], true);
    assert!(matches!(
        Qwen2Config::from_gguf(&f),
        Err(GgufError::WrongKeyType { .. })
    ));
}

#[test]
fn heads_not_dividing_hidden() {
    let (_d, f) = file(
        &[],
        &[
            ("qwen2.attention.head_count", V::U32(6)),
            ("qwen2.attention.head_count_kv", V::U32(6)),
        ],
        true,
    );
    let e = Qwen2Config::from_gguf(&f).unwrap_err();
    assert!(matches!(e, GgufError::BadConfig { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("head_count 6 does not divide embedding_length 64"),
        "{e}"
    );
}

#[test]
fn kv_heads_not_dividing_heads() {
    let (_d, f) = file(&[], &[("qwen2.attention.head_count_kv", V::U32(3))], true);
    let e = Qwen2Config::from_gguf(&f).unwrap_err();
    assert!(matches!(e, GgufError::BadConfig { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("head_count_kv 3 does not divide attention.head_count 8"),
        "{e}"
    );
}

#[test]
fn zero_heads() {
    let (_d, f) = file(&[], &[("qwen2.attention.head_count", V::U32(0))], true);
    assert!(matches!(
        Qwen2Config::from_gguf(&f),
        Err(GgufError::BadConfig { .. })
    ));
}

#[test]
fn missing_token_embd() {
    let (_d, f) = file(&["token_embd.weight"], &[], true);
    let e = Qwen2Config::from_gguf(&f).unwrap_err();
    assert!(
        matches!(e, GgufError::TensorNotFound { ref name, .. } if name == "token_embd.weight"),
        "{e:?}"
    );
}

#[test]
fn token_embd_wrong_width() {
    let (_d, f) = file(
        &[],
        &[
            ("qwen2.embedding_length", V::U32(32)),
            ("qwen2.attention.head_count_kv", V::U32(8)),
        ],
        true,
    );
    let e = Qwen2Config::from_gguf(&f).unwrap_err();
    assert!(matches!(e, GgufError::BadConfig { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("token_embd.weight has dims [64, 10]"),
        "{e}"
    );
}
