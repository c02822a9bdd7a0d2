//! ggml's activation rounding, emulated by `gguf::quant`, equals ggml's own
//! CPU `from_float` (through FFI) bit for bit, and `gguf::quant::vec_dot_type`
//! equals ggml's `vec_dot_type` for every weight type we load.

use gguf::quant::{quantize_q8_0, quantize_q8_1, quantize_q8_k, vec_dot_type};
use gguf::GgmlType;
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Rows of 1024 values: ordinary, tiny and huge scales, all zero, one sign,
/// single outliers of either sign, exact .5 ties after scaling, subnormals,
/// a repeated maximum of both signs, and a massive-activation row.
fn rows(seed: u64) -> Vec<Vec<f32>> {
    let n = 1024;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for kind in 0..12 {
        let row: Vec<f32> = (0..n)
            .map(|i| {
                let g: f32 = (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>() * 0.5;
                match kind {
                    0 | 1 => g,
                    2 => g * 1e-30,
                    3 => g * 1e30,
                    4 => 0.0,
                    5 => g.abs() + 0.1,
                    6 => if i % 97 == 5 { 4000.0 } else { g * 0.01 },
                    7 => if i % 97 == 5 { -4000.0 } else { g },
                    // amax 127 in every block: x * id == x, and halves are ties
                    8 => if i % 32 == 0 { 127.0 } else { (rng.gen_range(-254i32..254) as f32) * 0.5 },
                    9 => g * 1e-41, // subnormal
                    10 => if i % 64 < 2 { if i % 2 == 0 { 3.0 } else { -3.0 } } else { g },
                    _ => if i == 3 { 2500.0 } else { g * 2.0 },
                }
            })
            .collect();
        out.push(row);
    }
    out
}

#[test]
fn activation_quantizers_match_ggml_bit_for_bit() {
    let mut checked = 0;
    for seed in 0..4 {
        for (k, row) in rows(seed).iter().enumerate() {
            let cases: [(GgmlType, Vec<u8>); 5] = [
                (GgmlType::Q8_0, quantize_q8_0(row)),
                (GgmlType::Q8_1, quantize_q8_1(row)),
                (GgmlType::Q8_K, quantize_q8_k(row)),
                (GgmlType::F16, row.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect()),
                (GgmlType::BF16, row.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect()),
            ];
            for (ty, ours) in cases {
                let ggml = llama_ref::ggml::quantize_activations(ty, row).expect("ggml from_float");
                assert_eq!(ours.len(), ggml.len(), "{ty:?} row kind {k}: byte counts");
                if let Some(i) = ours.iter().zip(&ggml).position(|(a, b)| a != b) {
                    panic!("{ty:?}, seed {seed}, row kind {k}: first differing byte {i}: ours {} ggml {}", ours[i], ggml[i]);
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4 * 12 * 5);
}

#[test]
fn vec_dot_types_match_ggml() {
    use GgmlType::*;
    for w in [F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K] {
        let ggml = llama_ref::ggml::vec_dot_type(w).unwrap();
        assert_eq!(vec_dot_type(w), Some(ggml), "weight type {w:?}");
    }
}
