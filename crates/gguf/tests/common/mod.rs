#![allow(dead_code)]
//! Shared helpers: a small valid GGUF built by the writer, and byte patching.

use gguf::{GgmlType, GgufError, GgufFile, GgufWriter, MetadataValue as V};
use std::path::{Path, PathBuf};

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A valid file: 5 keys, tensors "alpha" F32 [8, 2] and "beta" Q8_0 [32, 2].
pub fn base_bytes() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add("general.architecture", V::String("qwen2".into()));
    w.add("test.kaa", V::U32(7));
    w.add("test.kab", V::I8(-1));
    w.add(
        "test.array",
        V::Array(vec![V::U32(1), V::U32(2), V::U32(3)]),
    );
    w.add("test.string", V::String("hello world".into()));
    let alpha: Vec<f32> = (0..16).map(|i| i as f32).collect();
    w.add_tensor("alpha", vec![8, 2], GgmlType::F32, f32_bytes(&alpha))
        .unwrap();
    let mut beta = Vec::new();
    for b in 0..2u8 {
        beta.extend_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        beta.extend((0..32).map(|i| (i as i8 - 16 + b as i8) as u8));
    }
    w.add_tensor("alphb", vec![32, 2], GgmlType::Q8_0, beta)
        .unwrap();
    w.to_bytes().unwrap()
}

/// Position of the first occurrence of `needle`.
pub fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present in test file")
}

/// Offset just past a length-prefixed string `s` (the string itself found by content).
pub fn after_str(bytes: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(s.as_bytes());
    find(bytes, &needle) + needle.len()
}

pub fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

pub fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Open `bytes` as a file and return the error (panics if it opens).
pub fn open_err(bytes: &[u8]) -> GgufError {
    let dir = tempfile::tempdir().unwrap();
    let p = write_tmp(dir.path(), "bad.gguf", bytes);
    match GgufFile::open(&p) {
        Ok(_) => panic!("corrupt file opened without error"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "message is not one line: {msg}");
            assert!(
                msg.contains("bad.gguf"),
                "message does not name the file: {msg}"
            );
            e
        }
    }
}

/// Offsets inside the tensor info of `name`: (n_dims, dims[0], type, offset).
pub fn tensor_fields(bytes: &[u8], name: &str) -> (usize, usize, usize, usize) {
    let n_dims_at = after_str(bytes, name);
    let n_dims = u32::from_le_bytes(bytes[n_dims_at..n_dims_at + 4].try_into().unwrap()) as usize;
    let dims_at = n_dims_at + 4;
    let type_at = dims_at + 8 * n_dims;
    (n_dims_at, dims_at, type_at, type_at + 4)
}
