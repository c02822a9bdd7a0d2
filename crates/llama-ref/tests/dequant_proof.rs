//! Foundation item 4: our dequantization (gguf::dequant) equals ggml's own
//! (`to_float`) bit for bit, on data quantized by ggml itself
//! (`ggml_quantize_chunk`) for every type the gguf crate supports.

use gguf::GgmlType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Rows of 512 values with very different scales: gaussian-ish weights,
/// a tiny-scale row, a large-scale row, an all-zero row, a row of one sign,
/// a row with a single outlier.
fn rows(seed: u64) -> (Vec<f32>, usize) {
    let n_per_row = 512;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut data = Vec::new();
    for r in 0..8 {
        for i in 0..n_per_row {
            let g: f32 = (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>() * 0.5;
            data.push(match r {
                0..=2 => g * 0.05,
                3 => g * 1e-6,
                4 => g * 300.0,
                5 => 0.0,
                6 => g.abs() + 0.1,
                _ => if i == 77 { 40.0 } else { g * 0.01 },
            });
        }
    }
    (data, n_per_row)
}

#[test]
fn gguf_dequantize_matches_ggml_bit_for_bit_for_every_supported_type() {
    for &ty in TYPES {
        assert!(ty.can_dequantize(), "{} should be supported by gguf", ty.name());
        for seed in [1u64, 2, 3] {
            let (data, n_per_row) = rows(seed);
            let q = llama_ref::ggml::quantize(ty, &data, n_per_row).unwrap_or_else(|e| panic!("{}: {e}", ty.name()));
            let expect_bytes = ty.row_bytes(n_per_row).expect("row size") * (data.len() / n_per_row);
            assert_eq!(q.len(), expect_bytes, "{}: quantized size", ty.name());
            let ggml = llama_ref::ggml::dequantize(ty, &q, data.len()).unwrap();
            let ours = gguf::dequant::dequantize(ty, &q, data.len()).unwrap();
            let bad: Vec<usize> = (0..data.len()).filter(|&i| ours[i].to_bits() != ggml[i].to_bits()).collect();
            assert!(
                bad.is_empty(),
                "{} seed {seed}: {} values differ, first at {}: ours {} ggml {}",
                ty.name(),
                bad.len(),
                bad[0],
                ours[bad[0]],
                ggml[bad[0]]
            );
            // the round trip is a real quantization of the data, not zeros
            let err: f32 = data.iter().zip(&ggml).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            let nonzero = ggml.iter().filter(|v| **v != 0.0).count();
            assert!(nonzero > data.len() / 2, "{}: {nonzero} non-zero values", ty.name());
            assert!(err < 300.0 * 0.5, "{}: max round-trip error {err}", ty.name());
        }
    }
}

#[test]
fn special_float_values_agree_for_f16_and_bf16() {
    // infinities, subnormals, overflow to inf, signed zero, NaN
    let data: Vec<f32> = vec![
        0.0, -0.0, 1.0, -1.0, 65504.0, 70000.0, -1e6, 1e-7, 6e-8, -3e-8, f32::INFINITY, f32::NEG_INFINITY,
        f32::NAN, 1e30, 1e-30, 3.3895314e38, f32::MIN_POSITIVE, 0.333333, 2.5e-5, 12345.678, -0.1, 7.0, 1e-45, -1e-40,
        5.0, 6.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0,
    ];
    for ty in [GgmlType::F16, GgmlType::BF16] {
        let q = llama_ref::ggml::quantize(ty, &data, data.len()).unwrap();
        let ggml = llama_ref::ggml::dequantize(ty, &q, data.len()).unwrap();
        let ours = gguf::dequant::dequantize(ty, &q, data.len()).unwrap();
        for i in 0..data.len() {
            assert_eq!(ours[i].to_bits(), ggml[i].to_bits(), "{} value {}: ours {} ggml {}", ty.name(), data[i], ours[i], ggml[i]);
        }
    }
}

#[test]
fn imatrix_types_and_bad_lengths_are_refused() {
    assert!(llama_ref::ggml::quantize(GgmlType::IQ2_XXS, &[0.0; 256], 256).is_err());
    assert!(llama_ref::ggml::dequantize(GgmlType::Q4_K, &[0u8; 143], 256).is_err());
    assert!(llama_ref::ggml::dequantize(GgmlType::Q4_K, &[0u8; 144], 256).is_ok());
}
