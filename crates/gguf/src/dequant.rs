//! CPU dequantization to f32, bit-exact with ggml's reference
//! `dequantize_row_*` (ggml/src/ggml-quants.c): the same block layouts
//! (ggml-common.h) and the same float operations in the same order. Rust
//! never contracts `a * b - c` into an FMA, so each product and difference is
//! rounded separately, as in a C build without FP contraction.
//!
//! Plain per-block loops over fixed-size arrays: they autovectorize. Callers
//! parallelize across tensors.

use crate::error::GgufError;
use crate::types::GgmlType;
use std::sync::OnceLock;

/// f16 bits -> f32, via a table built once with `half` (exact conversion;
/// NaNs come out quiet with the payload kept, as ggml's
/// `ggml_compute_fp16_to_fp32` gives them).
#[inline(always)]
fn f16_table() -> &'static [f32; 65536] {
    static TABLE: OnceLock<Box<[f32; 65536]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([0f32; 65536]);
        for (i, v) in t.iter_mut().enumerate() {
            *v = half::f16::from_bits(i as u16).to_f32();
        }
        t
    })
}

#[inline(always)]
fn h(table: &[f32; 65536], lo: u8, hi: u8) -> f32 {
    table[u16::from_le_bytes([lo, hi]) as usize]
}

/// Dequantize `n_elements` values of type `ty` from `bytes` (exactly
/// `ty.row_bytes(n_elements)` bytes).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, GgufError> {
    dequantize_named("(buffer)", ty, bytes, n_elements)
}

/// Dequantize into `out`; `out.len()` is the element count.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    dequantize_into_named("(buffer)", ty, bytes, out)
}

pub(crate) fn dequantize_named(
    tensor: &str,
    ty: GgmlType,
    bytes: &[u8],
    n_elements: usize,
) -> Result<Vec<f32>, GgufError> {
    check(tensor, ty, bytes, n_elements)?;
    let mut out = vec![0f32; n_elements];
    dequantize_into_named(tensor, ty, bytes, &mut out)?;
    Ok(out)
}

fn check(tensor: &str, ty: GgmlType, bytes: &[u8], n: usize) -> Result<(), GgufError> {
    if !ty.can_dequantize() {
        return Err(GgufError::UnsupportedType {
            tensor: tensor.to_string(),
            ty,
        });
    }
    let (Some(bs), Some(ts)) = (ty.block_size(), ty.type_size()) else {
        return Err(GgufError::UnsupportedType {
            tensor: tensor.to_string(),
            ty,
        });
    };
    if !n.is_multiple_of(bs) {
        return Err(GgufError::NotBlockMultiple {
            tensor: tensor.to_string(),
            ty,
            n_elements: n,
            block_size: bs,
        });
    }
    let expected = (n / bs).checked_mul(ts);
    if expected != Some(bytes.len()) {
        return Err(GgufError::DataSizeMismatch {
            tensor: tensor.to_string(),
            ty,
            n_elements: n,
            expected: expected.unwrap_or(usize::MAX),
            got: bytes.len(),
        });
    }
    Ok(())
}

fn dequantize_into_named(
    tensor: &str,
    ty: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<(), GgufError> {
    check(tensor, ty, bytes, out.len())?;
    match ty {
        GgmlType::F32 => f32_row(bytes, out),
        GgmlType::F16 => f16_row(bytes, out),
        GgmlType::BF16 => bf16_row(bytes, out),
        GgmlType::Q4_0 => blocks::<18, 32>(bytes, out, q4_0),
        GgmlType::Q4_1 => blocks::<20, 32>(bytes, out, q4_1),
        GgmlType::Q5_0 => blocks::<22, 32>(bytes, out, q5_0),
        GgmlType::Q5_1 => blocks::<24, 32>(bytes, out, q5_1),
        GgmlType::Q8_0 => blocks::<34, 32>(bytes, out, q8_0),
        GgmlType::Q2_K => blocks::<84, 256>(bytes, out, q2_k),
        GgmlType::Q3_K => blocks::<110, 256>(bytes, out, q3_k),
        GgmlType::Q4_K => blocks::<144, 256>(bytes, out, q4_k),
        GgmlType::Q5_K => blocks::<176, 256>(bytes, out, q5_k),
        GgmlType::Q6_K => blocks::<210, 256>(bytes, out, q6_k),
        // `check` rejected everything else.
        _ => {
            return Err(GgufError::UnsupportedType {
                tensor: tensor.to_string(),
                ty,
            })
        }
    }
    Ok(())
}

#[inline(always)]
fn blocks<const TS: usize, const BS: usize>(
    bytes: &[u8],
    out: &mut [f32],
    f: fn(&[f32; 65536], &[u8; TS], &mut [f32; BS]),
) {
    let table = f16_table();
    for (b, y) in bytes.chunks_exact(TS).zip(out.chunks_exact_mut(BS)) {
        // Infallible: chunks_exact yields slices of exactly TS / BS items.
        if let (Ok(b), Ok(y)) = (<&[u8; TS]>::try_from(b), <&mut [f32; BS]>::try_from(y)) {
            f(table, b, y);
        }
    }
}

fn f32_row(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(4).zip(out.iter_mut()) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

fn f16_row(bytes: &[u8], out: &mut [f32]) {
    let table = f16_table();
    for (b, y) in bytes.chunks_exact(2).zip(out.iter_mut()) {
        *y = h(table, b[0], b[1]);
    }
}

/// ggml_compute_bf16_to_fp32: the bits shifted into the top half.
fn bf16_row(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(2).zip(out.iter_mut()) {
        *y = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
}

// block_q4_0 { half d; u8 qs[16]; }
fn q4_0(t: &[f32; 65536], b: &[u8; 18], y: &mut [f32; 32]) {
    let d = h(t, b[0], b[1]);
    let qs = &b[2..18];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32 - 8;
        let x1 = (qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

// block_q4_1 { half d; half m; u8 qs[16]; }
fn q4_1(t: &[f32; 65536], b: &[u8; 20], y: &mut [f32; 32]) {
    let d = h(t, b[0], b[1]);
    let m = h(t, b[2], b[3]);
    let qs = &b[4..20];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32;
        let x1 = (qs[j] >> 4) as i32;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

// block_q5_0 { half d; u8 qh[4]; u8 qs[16]; }
fn q5_0(t: &[f32; 65536], b: &[u8; 22], y: &mut [f32; 32]) {
    let d = h(t, b[0], b[1]);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh_0) as i32 - 16;
        let x1 = ((qs[j] >> 4) | xh_1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// The fault zoo's dequantization bug (`q5-0-high-bit`): Q5_0 with the
/// `<< 4` forgotten on the second half's high bit, so element j + 16 takes
/// bit j + 20 of `qh` (garbage, or 0 past bit 31) as its fifth bit. Rows of
/// 32-blocks: `bytes` a whole number of 22-byte blocks.
pub fn q5_0_forgotten_shift(bytes: &[u8], out: &mut [f32]) {
    let table = f16_table();
    for (b, y) in bytes.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
        let d = h(table, b[0], b[1]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        for j in 0..16 {
            let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh_1 = (qh.checked_shr(j as u32 + 16).unwrap_or(0) & 0x10) as u8;
            y[j] = (((b[6 + j] & 0x0F) | xh_0) as i32 - 16) as f32 * d;
            y[j + 16] = (((b[6 + j] >> 4) | xh_1) as i32 - 16) as f32 * d;
        }
    }
}

// block_q5_1 { half d; half m; u8 qh[4]; u8 qs[16]; }
fn q5_1(t: &[f32; 65536], b: &[u8; 24], y: &mut [f32; 32]) {
    let d = h(t, b[0], b[1]);
    let m = h(t, b[2], b[3]);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh_0) as i32;
        let x1 = ((qs[j] >> 4) | xh_1) as i32;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

// block_q8_0 { half d; i8 qs[32]; }
fn q8_0(t: &[f32; 65536], b: &[u8; 34], y: &mut [f32; 32]) {
    let d = h(t, b[0], b[1]);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

// block_q2_K { u8 scales[16]; u8 qs[64]; half d; half dmin; }
fn q2_k(t: &[f32; 65536], b: &[u8; 84], y: &mut [f32; 256]) {
    let scales = &b[0..16];
    let d = h(t, b[80], b[81]);
    let min = h(t, b[82], b[83]);
    let mut is = 0;
    let mut o = 0;
    for n in 0..2 {
        let q = &b[16 + 32 * n..16 + 32 * n + 32];
        let mut shift = 0;
        for _ in 0..4 {
            let sc = scales[is];
            is += 1;
            let dl = d * (sc & 0xF) as f32;
            let ml = min * (sc >> 4) as f32;
            for l in 0..16 {
                y[o + l] = dl * ((q[l] >> shift) & 3) as f32 - ml;
            }
            o += 16;
            let sc = scales[is];
            is += 1;
            let dl = d * (sc & 0xF) as f32;
            let ml = min * (sc >> 4) as f32;
            for l in 0..16 {
                y[o + l] = dl * ((q[l + 16] >> shift) & 3) as f32 - ml;
            }
            o += 16;
            shift += 2;
        }
    }
}

// block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; half d; }
fn q3_k(t: &[f32; 65536], b: &[u8; 110], y: &mut [f32; 256]) {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let hm = &b[0..32];
    let d_all = h(t, b[108], b[109]);
    let s = &b[96..108];
    let a0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let a1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let tmp = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut scales = [0i8; 16];
    for (k, a) in aux.iter().enumerate() {
        for (i, byte) in a.to_le_bytes().iter().enumerate() {
            scales[4 * k + i] = *byte as i8;
        }
    }
    let mut m: u8 = 1;
    let mut is = 0;
    let mut o = 0;
    for n in 0..2 {
        let q = &b[32 + 32 * n..32 + 32 * n + 32];
        let mut shift = 0;
        for _ in 0..4 {
            let dl = d_all * (scales[is] as i32 - 32) as f32;
            is += 1;
            for l in 0..16 {
                let v = ((q[l] >> shift) & 3) as i32 - if hm[l] & m != 0 { 0 } else { 4 };
                y[o + l] = dl * v as f32;
            }
            o += 16;
            let dl = d_all * (scales[is] as i32 - 32) as f32;
            is += 1;
            for l in 0..16 {
                let v = ((q[l + 16] >> shift) & 3) as i32 - if hm[l + 16] & m != 0 { 0 } else { 4 };
                y[o + l] = dl * v as f32;
            }
            o += 16;
            shift += 2;
            m <<= 1;
        }
    }
}

/// ggml's get_scale_min_k4: 6-bit scale and min j of the 12 packed bytes.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

// block_q4_K { half d; half dmin; u8 scales[12]; u8 qs[128]; }
fn q4_k(t: &[f32; 65536], b: &[u8; 144], y: &mut [f32; 256]) {
    let d = h(t, b[0], b[1]);
    let min = h(t, b[2], b[3]);
    let scales = &b[4..16];
    for g in 0..4 {
        let q = &b[16 + 32 * g..16 + 32 * g + 32];
        let (sc, m) = scale_min_k4(2 * g, scales);
        let d1 = d * sc as f32;
        let m1 = min * m as f32;
        let (sc, m) = scale_min_k4(2 * g + 1, scales);
        let d2 = d * sc as f32;
        let m2 = min * m as f32;
        let o = 64 * g;
        for l in 0..32 {
            y[o + l] = d1 * (q[l] & 0xF) as f32 - m1;
        }
        for l in 0..32 {
            y[o + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

// block_q5_K { half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }
fn q5_k(t: &[f32; 65536], b: &[u8; 176], y: &mut [f32; 256]) {
    let d = h(t, b[0], b[1]);
    let min = h(t, b[2], b[3]);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let mut u1: u8 = 1;
    let mut u2: u8 = 2;
    for g in 0..4 {
        let ql = &b[48 + 32 * g..48 + 32 * g + 32];
        let (sc, m) = scale_min_k4(2 * g, scales);
        let d1 = d * sc as f32;
        let m1 = min * m as f32;
        let (sc, m) = scale_min_k4(2 * g + 1, scales);
        let d2 = d * sc as f32;
        let m2 = min * m as f32;
        let o = 64 * g;
        for l in 0..32 {
            let v = (ql[l] & 0xF) as i32 + if qh[l] & u1 != 0 { 16 } else { 0 };
            y[o + l] = d1 * v as f32 - m1;
        }
        for l in 0..32 {
            let v = (ql[l] >> 4) as i32 + if qh[l] & u2 != 0 { 16 } else { 0 };
            y[o + 32 + l] = d2 * v as f32 - m2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; half d; }
fn q6_k(t: &[f32; 65536], b: &[u8; 210], y: &mut [f32; 256]) {
    let d = h(t, b[208], b[209]);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let o = 128 * n;
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 as i32 - 32;
            y[o + l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[o + l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[o + l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[o + l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
