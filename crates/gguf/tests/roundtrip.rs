//! Writer -> reader round trips: every metadata type (nested arrays too),
//! tensors of several types, alignment, and writer-side validation.

mod common;
use common::*;
use gguf::{GgmlType, GgufError, GgufFile, GgufWriter, MetadataValue as V};

fn every_value() -> Vec<(String, V)> {
    vec![
        ("t.u8".into(), V::U8(250)),
        ("t.i8".into(), V::I8(-120)),
        ("t.u16".into(), V::U16(65000)),
        ("t.i16".into(), V::I16(-32000)),
        ("t.u32".into(), V::U32(4_000_000_000)),
        ("t.i32".into(), V::I32(-2_000_000_000)),
        ("t.u64".into(), V::U64(u64::MAX - 1)),
        ("t.i64".into(), V::I64(i64::MIN + 1)),
        ("t.f32".into(), V::F32(-1.5e-7)),
        ("t.f64".into(), V::F64(std::f64::consts::PI)),
        ("t.bool.true".into(), V::Bool(true)),
        ("t.bool.false".into(), V::Bool(false)),
        ("t.str".into(), V::String("héllo, 世界 <|im_end|>".into())),
        ("t.str.empty".into(), V::String(String::new())),
        ("t.arr.u8".into(), V::Array(vec![V::U8(1), V::U8(2)])),
        ("t.arr.i8".into(), V::Array(vec![V::I8(-1), V::I8(2)])),
        ("t.arr.u16".into(), V::Array(vec![V::U16(1)])),
        ("t.arr.i16".into(), V::Array(vec![V::I16(-7)])),
        (
            "t.arr.u32".into(),
            V::Array(vec![V::U32(1), V::U32(2), V::U32(3)]),
        ),
        ("t.arr.i32".into(), V::Array((0..100).map(V::I32).collect())),
        ("t.arr.u64".into(), V::Array(vec![V::U64(9)])),
        ("t.arr.i64".into(), V::Array(vec![V::I64(-9)])),
        (
            "t.arr.f32".into(),
            V::Array(vec![V::F32(0.25), V::F32(f32::MAX)]),
        ),
        ("t.arr.f64".into(), V::Array(vec![V::F64(1e300)])),
        (
            "t.arr.bool".into(),
            V::Array(vec![V::Bool(true), V::Bool(false)]),
        ),
        (
            "t.arr.str".into(),
            V::Array(vec![V::String("a b".into()), V::String("Ġ t".into())]),
        ),
        ("t.arr.empty".into(), V::Array(vec![])),
        (
            "t.arr.nested".into(),
            V::Array(vec![
                V::Array(vec![V::U32(1), V::U32(2)]),
                V::Array(vec![V::String("x".into())]),
                V::Array(vec![]),
                V::Array(vec![V::Array(vec![V::F64(0.5)])]),
            ]),
        ),
    ]
}

#[test]
fn every_metadata_type_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    let kv = every_value();
    for (k, v) in &kv {
        w.add(k.clone(), v.clone());
    }
    let p = dir.path().join("all.gguf");
    w.write(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.metadata(), &kv[..]);
    assert!(f.tensors().is_empty());
    for (k, v) in &kv {
        assert_eq!(f.get(k), Some(v));
    }
    assert_eq!(f.get("t.nope"), None);
}

#[test]
fn typed_getters() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in every_value() {
        w.add(k, v);
    }
    let p = dir.path().join("g.gguf");
    w.write(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.get_u64("t.u8"), Some(250));
    assert_eq!(f.get_u64("t.u64"), Some(u64::MAX - 1));
    assert_eq!(f.get_u64("t.i8"), None, "negative");
    assert_eq!(f.get_u64("t.f32"), None, "float");
    assert_eq!(f.get_f64("t.i32"), Some(-2e9));
    assert_eq!(f.get_f64("t.f32"), Some(-1.5e-7f32 as f64));
    assert_eq!(f.get_f64("t.str"), None);
    assert_eq!(f.get_str("t.str"), Some("héllo, 世界 <|im_end|>"));
    assert_eq!(f.get_str("t.u8"), None);
    assert_eq!(f.architecture(), None);
}

#[test]
fn summaries_are_short() {
    let long: Vec<V> = (0..100_000).map(|i| V::String(format!("tok{i}"))).collect();
    let s = V::Array(long).summary();
    assert!(
        s.starts_with("[100000 x str] [\"tok0\", \"tok1\", \"tok2\", \"tok3\", ...]"),
        "{s}"
    );
    assert!(s.len() < 100, "{s}");
    assert_eq!(V::Array(vec![]).summary(), "[0 x ?]");
    assert_eq!(V::U32(7).summary(), "7");
    let nested = V::Array(vec![V::Array(vec![V::U8(1)])]);
    assert_eq!(nested.type_name(), "arr[arr[u8]]");
    assert_eq!(nested.summary(), "[1 x arr[u8]] [[1 x u8]]");
    let s = V::String("x".repeat(500)).summary();
    assert!(s.len() < 100 && s.contains("500 bytes"), "{s}");
}

#[test]
fn tensors_round_trip_zero_copy_and_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    w.add("general.architecture", V::String("test".into()));
    let a: Vec<f32> = (0..30).map(|i| i as f32 * 0.5).collect();
    w.add_tensor("a", vec![3, 5, 2], GgmlType::F32, f32_bytes(&a))
        .unwrap();
    let h: Vec<u8> = (0..7u16)
        .flat_map(|i| half::f16::from_f32(i as f32).to_bits().to_le_bytes())
        .collect();
    w.add_tensor("h", vec![7], GgmlType::F16, h.clone())
        .unwrap();
    let q: Vec<u8> = (0..144 * 2).map(|i| (i * 7 % 251) as u8).collect();
    w.add_tensor("q", vec![256, 1, 2, 1], GgmlType::Q4_K, q.clone())
        .unwrap();
    let p = dir.path().join("t.gguf");
    w.write(&p).unwrap();

    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.architecture(), Some("test"));
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "h", "q"]);
    let ta = f.tensor("a").unwrap();
    assert_eq!(ta.dims, [3, 5, 2]);
    assert_eq!((ta.n_elements, ta.n_bytes), (30, 120));
    assert_eq!(f.tensor_data(ta), &f32_bytes(&a)[..]);
    assert_eq!(f.dequantize("a").unwrap(), a);
    let th = f.tensor("h").unwrap();
    assert_eq!((th.ggml_type, th.n_bytes), (GgmlType::F16, 14));
    assert_eq!(f.tensor_data(th), &h[..]);
    assert_eq!(
        f.dequantize("h").unwrap(),
        (0..7).map(|i| i as f32).collect::<Vec<_>>()
    );
    let tq = f.tensor("q").unwrap();
    assert_eq!(tq.dims, [256, 1, 2, 1]);
    assert_eq!(f.tensor_data(tq), &q[..]);
    for t in f.tensors() {
        assert_eq!(t.offset % 32, 0, "{} at {}", t.name, t.offset);
        assert_eq!((t.offset - f.data_offset()) % 32, 0);
    }
    // Zero-copy: the slice points into the map, not a copy.
    let d1 = f.tensor_data(tq).as_ptr();
    let d2 = f.tensor_data(tq).as_ptr();
    assert_eq!(d1, d2);
    assert_eq!(f.file_size(), std::fs::metadata(&p).unwrap().len());
}

#[test]
fn custom_alignment_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    w.add("general.alignment", V::U32(256));
    w.add_tensor("x", vec![3], GgmlType::F32, f32_bytes(&[1.0, 2.0, 3.0]))
        .unwrap();
    w.add_tensor("y", vec![1], GgmlType::F32, f32_bytes(&[4.0]))
        .unwrap();
    let p = dir.path().join("a.gguf");
    w.write(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.alignment(), 256);
    assert_eq!(f.data_offset() % 256, 0);
    assert_eq!(
        f.tensor("y").unwrap().offset - f.tensor("x").unwrap().offset,
        256
    );
    assert_eq!(f.dequantize("y").unwrap(), [4.0]);
}

#[test]
fn writer_rejects_invalid_tensors() {
    let mut w = GgufWriter::new();
    w.add_tensor("x", vec![4], GgmlType::F32, vec![0; 16])
        .unwrap();
    let cases: Vec<(Result<(), GgufError>, &str)> = vec![
        (
            w.add_tensor("x", vec![4], GgmlType::F32, vec![0; 16]),
            "duplicate tensor name 'x'",
        ),
        (
            w.add_tensor("y", vec![4], GgmlType::F32, vec![0; 15]),
            "needs Some(16) bytes, got 15",
        ),
        (
            w.add_tensor("y", vec![], GgmlType::F32, vec![]),
            "0 dimensions",
        ),
        (
            w.add_tensor("y", vec![1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4]),
            "5 dimensions",
        ),
        (
            w.add_tensor("y", vec![4, 0], GgmlType::F32, vec![]),
            "zero dimension",
        ),
        (
            w.add_tensor("y", vec![16], GgmlType::Q8_0, vec![0; 17]),
            "not a multiple of the block size 32",
        ),
        (
            w.add_tensor("y", vec![4], GgmlType::Other(77), vec![0; 4]),
            "unknown ggml type 77",
        ),
        (
            w.add_tensor("", vec![4], GgmlType::F32, vec![0; 16]),
            "empty tensor name",
        ),
    ];
    for (r, want) in cases {
        let e = r.unwrap_err();
        assert!(matches!(e, GgufError::Writer { .. }), "{e:?}");
        assert!(e.to_string().contains(want), "{e} (want {want})");
    }
}

#[test]
fn writer_rejects_invalid_metadata() {
    let cases: Vec<(Vec<(&str, V)>, &str)> = vec![
        (
            vec![("k", V::U8(1)), ("k", V::U8(2))],
            "duplicate metadata key 'k'",
        ),
        (vec![("", V::U8(1))], "empty metadata key"),
        (
            vec![("mix", V::Array(vec![V::U8(1), V::I8(1)]))],
            "array mixes u8 and i8",
        ),
        (
            vec![(
                "mix",
                V::Array(vec![V::Array(vec![V::U8(1), V::Bool(true)])]),
            )],
            "array mixes u8 and bool",
        ),
        (vec![("general.alignment", V::U32(48))], "power of two"),
        (vec![("general.alignment", V::U64(64))], "power of two"),
    ];
    for (kv, want) in cases {
        let mut w = GgufWriter::new();
        for (k, v) in kv {
            w.add(k, v);
        }
        let e = w.to_bytes().unwrap_err();
        assert!(matches!(e, GgufError::Writer { .. }), "{e:?}");
        assert!(e.to_string().contains(want), "{e} (want {want})");
    }
}

#[test]
fn writer_io_error_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("no/such/dir/x.gguf");
    let e = GgufWriter::new().write(&p).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("no/such/dir/x.gguf"), "{e}");
}
