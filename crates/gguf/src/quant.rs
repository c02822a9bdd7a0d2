//! ggml's CPU rounding of activations: before a matmul, ggml's CPU backend
//! converts each activation row to the weight type's `vec_dot_type` (q8_0 for
//! the legacy 32-blocks, q8_1 for Q4_1/Q5_1, q8_K for the K-quants, f16/bf16
//! for half weights) and multiplies integers (or halves) against the weight
//! blocks. Emulating that rounding is what brings our engine to ggml's
//! numbers. Each quantizer writes ggml's exact block bytes, so tests can
//! compare them bit for bit with ggml's own `from_float` through FFI.
//!
//! The truth is the linked ggml's x86 AVX2 build (llama-cpp-sys-2 0.1.161,
//! ggml-cpu/arch/x86/quants.c and ggml-quants.c, gcc with FMA contraction):
//! - q8_0 / q8_1: `d = amax/127` stored as f16 (round to nearest even),
//!   `id = 127/amax` (not `1/d`), `q = round_ties_even(x * id)` with the
//!   product rounded to f32 first; q8_1 adds `s = f16(d * sum(q))`.
//! - q8_K: the scalar reference, compiled with FMA contraction: `iscale =
//!   -127/max` where `max` is the first element of largest |x| with its sign,
//!   `q = min(127, round_ties_even(iscale * x))` rounded once from the exact
//!   product, `d = 1/iscale` as f32, `bsums` the sums of 16 quants. An
//!   all-zero block gets d = 0 and zero quants (ggml leaves its bsums unset).

use crate::types::GgmlType;
use half::{bf16, f16};

/// The type ggml converts activations to before multiplying them with
/// weights of type `weight` (`type_traits_cpu[weight].vec_dot_type`); `None`
/// for types this crate does not dequantize.
pub fn vec_dot_type(weight: GgmlType) -> Option<GgmlType> {
    use GgmlType::*;
    Some(match weight {
        F32 => F32,
        F16 => F16,
        BF16 => BF16,
        Q4_0 | Q5_0 | Q8_0 | IQ4_NL => Q8_0,
        Q4_1 | Q5_1 => Q8_1,
        Q2_K | Q3_K | Q4_K | Q5_K | Q6_K => Q8_K,
        _ => return None,
    })
}

/// Quantize one row to ggml's q8_0 block bytes (34 bytes per 32 values).
/// `row.len()` must be a multiple of 32.
pub fn quantize_q8_0(row: &[f32]) -> Vec<u8> {
    assert!(row.len().is_multiple_of(32), "q8_0 rows are whole blocks of 32");
    let mut out = Vec::with_capacity(row.len() / 32 * 34);
    for block in row.chunks_exact(32) {
        let (d, qs) = q8_legacy_block(block);
        out.extend_from_slice(&d.to_le_bytes());
        out.extend(qs.iter().map(|&q| q as u8));
    }
    out
}

/// Quantize one row to ggml's q8_1 block bytes (36 bytes per 32 values:
/// d, s as f16, then 32 quants).
pub fn quantize_q8_1(row: &[f32]) -> Vec<u8> {
    assert!(row.len().is_multiple_of(32), "q8_1 rows are whole blocks of 32");
    let mut out = Vec::with_capacity(row.len() / 32 * 36);
    for block in row.chunks_exact(32) {
        let (d, qs) = q8_legacy_block(block);
        // ggml sums the i32 conversions before they are packed to i8
        // (wrapping adds): they differ only in the overflow case above.
        let id = if d.unrounded != 0.0 { 127.0 / block.iter().fold(0f32, |m, &x| m.max(x.abs())) } else { 0.0 };
        let sum = block.iter().fold(0i32, |acc, &x| acc.wrapping_add(cvt_i32((x * id).round_ties_even())));
        let s = f16::from_f32(d.to_f32_unrounded() * sum as f32);
        out.extend_from_slice(&d.bits.to_le_bytes());
        out.extend_from_slice(&s.to_le_bytes());
        out.extend(qs.iter().map(|&q| q as u8));
    }
    out
}

/// The scale of a q8_0/q8_1 block: the f16 stored, and the f32 it was rounded from.
#[derive(Clone, Copy)]
struct LegacyScale {
    bits: u16,
    unrounded: f32,
}

impl LegacyScale {
    fn to_le_bytes(self) -> [u8; 2] {
        self.bits.to_le_bytes()
    }
    /// q8_1's `s` multiplies the f32 `d`, before it was rounded to f16.
    fn to_f32_unrounded(self) -> f32 {
        self.unrounded
    }
}

/// `_mm256_cvtps_epi32` then the saturating packs to i8: values outside
/// i32 (and NaN) become i32::MIN, so -128. That happens when amax is
/// subnormal and `127/amax` overflows to infinity.
fn cvt_pack_i8(r: f32) -> i8 {
    cvt_i32(r).clamp(-128, 127) as i8
}

/// `_mm256_cvtps_epi32` of an already rounded value.
fn cvt_i32(r: f32) -> i32 {
    if r.is_finite() && (-2147483648.0..2147483648.0).contains(&r) {
        r as i32
    } else {
        i32::MIN
    }
}

fn q8_legacy_block(block: &[f32]) -> (LegacyScale, [i8; 32]) {
    // max |x|; NaN is ignored by the AVX max the way `f32::max` ignores it.
    let amax = block.iter().fold(0f32, |m, &x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; 32];
    for (q, &x) in qs.iter_mut().zip(block) {
        *q = cvt_pack_i8((x * id).round_ties_even());
    }
    (LegacyScale { bits: f16::from_f32(d).to_bits(), unrounded: d }, qs)
}

/// Quantize one row to ggml's q8_K block bytes (292 bytes per 256 values:
/// d as f32, 256 quants, 16 bsums as i16). `row.len()` must be a multiple of 256.
pub fn quantize_q8_k(row: &[f32]) -> Vec<u8> {
    assert!(row.len().is_multiple_of(256), "q8_K rows are whole blocks of 256");
    let mut out = Vec::with_capacity(row.len() / 256 * 292);
    for block in row.chunks_exact(256) {
        let (d, qs) = q8_k_block(block);
        out.extend_from_slice(&d.to_le_bytes());
        out.extend(qs.iter().map(|&q| q as u8));
        for sixteen in qs.chunks_exact(16) {
            let s: i16 = sixteen.iter().map(|&q| q as i16).sum();
            out.extend_from_slice(&s.to_le_bytes());
        }
    }
    out
}

fn q8_k_block(block: &[f32]) -> (f32, [i8; 256]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &x in block {
        if x.abs() > amax {
            amax = x.abs();
            max = x;
        }
    }
    let mut qs = [0i8; 256];
    if amax == 0.0 {
        return (0.0, qs);
    }
    let iscale = -127.0 / max;
    for (q, &x) in qs.iter_mut().zip(block) {
        // ggml's nearest_int, FMA-contracted: fma(iscale, x, 1.5*2^23) rounds
        // the exact product once; the integer is read from the mantissa bits.
        // Then MIN(127, v) stored to int8 (a truncating conversion: the
        // garbage of an infinite iscale, subnormal max, becomes 0 as in ggml).
        let bits = iscale.mul_add(x, 12582912.0).to_bits() as i32;
        let v = (bits & 0x7f_ffff) - 0x40_0000;
        *q = v.min(127) as i8;
    }
    (1.0 / iscale, qs)
}

/// Replace `row` by the values ggml's integer dot products effectively see
/// after converting it to `vec_dot_type` (dequantize of the quantized row).
/// Rows whose length is not a whole number of blocks are left unchanged
/// (ggml would not accept such a weight).
pub fn round_like_ggml(vec_dot_type: GgmlType, row: &mut [f32]) {
    match vec_dot_type {
        GgmlType::F32 => {}
        GgmlType::F16 => row.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        GgmlType::BF16 => row.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
        GgmlType::Q8_0 | GgmlType::Q8_1 if row.len().is_multiple_of(32) => {
            for block in row.chunks_exact_mut(32) {
                let (d, qs) = q8_legacy_block(block);
                let d = f16::from_bits(d.bits).to_f32();
                for (x, &q) in block.iter_mut().zip(&qs) {
                    *x = d * q as f32;
                }
            }
        }
        GgmlType::Q8_K if row.len().is_multiple_of(256) => {
            for block in row.chunks_exact_mut(256) {
                let (d, qs) = q8_k_block(block);
                for (x, &q) in block.iter_mut().zip(&qs) {
                    *x = d * q as f32;
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_ties_round_to_even_and_d_is_f16() {
        // amax 127 -> id 1: x * id is x itself, so .5 ties show the rounding.
        let mut row = vec![0f32; 32];
        row[0] = 127.0;
        row[1] = 2.5;
        row[2] = -3.5;
        row[3] = 0.5;
        let bytes = quantize_q8_0(&row);
        assert_eq!(u16::from_le_bytes([bytes[0], bytes[1]]), f16::from_f32(1.0).to_bits());
        assert_eq!(&bytes[2..6], &[127u8, 2, (-4i8) as u8, 0]);
    }

    #[test]
    fn q8_k_keeps_the_sign_of_the_largest_and_sums_blocks_of_16() {
        let mut row = vec![0.25f32; 256];
        row[7] = 2.0;
        row[9] = -2.0; // same |x|, later: the first one wins
        let bytes = quantize_q8_k(&row);
        let d = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        assert_eq!(d, 1.0 / (-127.0f32 / 2.0));
        let q = |i: usize| bytes[4 + i] as i8;
        assert_eq!(q(7), -127);
        assert_eq!(q(9), 127);
        assert_eq!(q(0), (-127.0f64 / 2.0 * 0.25).round_ties_even() as i8);
        let bsum0 = i16::from_le_bytes([bytes[4 + 256], bytes[5 + 256]]);
        assert_eq!(bsum0 as i32, (0..16).map(|i| q(i) as i32).sum::<i32>());
        // all zero: d = 0, quants 0
        assert!(quantize_q8_k(&[0.0; 256]).iter().all(|&b| b == 0));
    }

    #[test]
    fn rounding_matches_the_block_bytes() {
        let row: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let mut r = row.clone();
        round_like_ggml(GgmlType::Q8_K, &mut r);
        let bytes = quantize_q8_k(&row);
        let d = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        assert_eq!(r[5], d * (bytes[4 + 5] as i8) as f32);
        let mut r = row.clone();
        round_like_ggml(GgmlType::Q8_0, &mut r);
        let bytes = quantize_q8_0(&row);
        let d = f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32();
        assert_eq!(r[3], d * (bytes[2 + 3] as i8) as f32);
        assert!(vec_dot_type(GgmlType::Q4_K) == Some(GgmlType::Q8_K));
        assert!(vec_dot_type(GgmlType::Q5_0) == Some(GgmlType::Q8_0));
    }
}
