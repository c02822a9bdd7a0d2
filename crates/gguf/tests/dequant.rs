//! Dequantization against hand-built blocks. Expected values are derived
//! from the block layouts (ggml-common.h) by an independent element ->
//! (byte, bit, scale) mapping, with scales chosen so the products are exact.

use gguf::dequant::{dequantize, dequantize_into};
use gguf::{GgmlType, GgufError};

fn f16(x: f32) -> [u8; 2] {
    let h = half::f16::from_f32(x);
    assert_eq!(h.to_f32(), x, "test value must be exact in f16");
    h.to_bits().to_le_bytes()
}

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u32) -> Vec<u8> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as u8
        })
        .collect()
}

fn check(ty: GgmlType, block: &[u8], expected: &[f32]) {
    assert_eq!(block.len(), ty.type_size().unwrap());
    assert_eq!(expected.len(), ty.block_size().unwrap());
    let got = dequantize(ty, block, expected.len()).unwrap();
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(
            g.to_bits(),
            e.to_bits(),
            "{ty} element {i}: got {g}, expected {e}"
        );
    }
    // Two blocks: the second is independent of the first.
    let mut two = block.to_vec();
    two.extend_from_slice(block);
    let mut out = vec![f32::NAN; 2 * expected.len()];
    dequantize_into(ty, &two, &mut out).unwrap();
    assert_eq!(&out[..expected.len()], &got[..]);
    assert_eq!(&out[expected.len()..], &got[..]);
}

#[test]
fn f32_f16_bf16() {
    let v = [1.0f32, -2.5, 0.0, -0.0, f32::INFINITY, 1e-40, 3.4e38];
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let got = dequantize(GgmlType::F32, &b, v.len()).unwrap();
    assert_eq!(
        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );

    // f16: 1.0, -2.0, smallest subnormal 2^-24, max 65504, -0, +inf, 0.333..
    let h: [u16; 7] = [0x3C00, 0xC000, 0x0001, 0x7BFF, 0x8000, 0x7C00, 0x3555];
    let hb: Vec<u8> = h.iter().flat_map(|x| x.to_le_bytes()).collect();
    let got = dequantize(GgmlType::F16, &hb, 7).unwrap();
    let want = [
        1.0,
        -2.0,
        2f32.powi(-24),
        65504.0,
        -0.0,
        f32::INFINITY,
        0.333_251_95,
    ];
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.to_bits(), w.to_bits(), "{g} vs {w}");
    }

    // bf16: the top 16 bits of an f32.
    let bf: [u16; 4] = [0x3F80, 0xC040, 0x0001, 0x7F80];
    let bb: Vec<u8> = bf.iter().flat_map(|x| x.to_le_bytes()).collect();
    let got = dequantize(GgmlType::BF16, &bb, 4).unwrap();
    for (g, b) in got.iter().zip(bf) {
        assert_eq!(g.to_bits(), (b as u32) << 16);
    }
    assert_eq!(got[0], 1.0);
    assert_eq!(got[1], -3.0);
}

#[test]
fn f16_every_bit_pattern_matches_half() {
    let all: Vec<u8> = (0..=u16::MAX).flat_map(|x| x.to_le_bytes()).collect();
    let got = dequantize(GgmlType::F16, &all, 65536).unwrap();
    for (i, g) in got.iter().enumerate() {
        let w = half::f16::from_bits(i as u16).to_f32();
        assert!(g.to_bits() == w.to_bits(), "f16 {i:#06x}: {g} vs {w}");
    }
}

#[test]
fn q8_0() {
    let mut b = f16(0.5).to_vec();
    let qs: Vec<i8> = (0..32)
        .map(|i| {
            if i == 0 {
                -128
            } else if i == 1 {
                127
            } else {
                i as i8 - 16
            }
        })
        .collect();
    b.extend(qs.iter().map(|&q| q as u8));
    let want: Vec<f32> = qs.iter().map(|&q| q as f32 * 0.5).collect();
    assert_eq!(want[0], -64.0);
    check(GgmlType::Q8_0, &b, &want);
}

#[test]
fn q4_0() {
    let mut b = f16(2.0).to_vec();
    let qs = bytes(16, 1);
    b.extend_from_slice(&qs);
    let mut want = vec![0f32; 32];
    for j in 0..16 {
        want[j] = ((qs[j] & 15) as f32 - 8.0) * 2.0;
        want[j + 16] = ((qs[j] >> 4) as f32 - 8.0) * 2.0;
    }
    check(GgmlType::Q4_0, &b, &want);
    // Explicit: nibble 0 -> -16, nibble 15 -> 14.
    let mut b = f16(2.0).to_vec();
    b.extend_from_slice(&[0xF0; 16]);
    let got = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
    assert_eq!(got[0], -16.0);
    assert_eq!(got[16], 14.0);
}

#[test]
fn q4_1() {
    let mut b = f16(0.25).to_vec();
    b.extend_from_slice(&f16(-1.0));
    let qs = bytes(16, 2);
    b.extend_from_slice(&qs);
    let mut want = vec![0f32; 32];
    for j in 0..16 {
        want[j] = (qs[j] & 15) as f32 * 0.25 - 1.0;
        want[j + 16] = (qs[j] >> 4) as f32 * 0.25 - 1.0;
    }
    check(GgmlType::Q4_1, &b, &want);
}

fn fifth_bit(qh: u32, e: usize) -> u32 {
    (qh >> e) & 1
}

#[test]
fn q5_0() {
    let mut b = f16(1.0).to_vec();
    let qh: u32 = 0xA5C3_0F96;
    b.extend_from_slice(&qh.to_le_bytes());
    let qs = bytes(16, 3);
    b.extend_from_slice(&qs);
    let mut want = vec![0f32; 32];
    for j in 0..16 {
        want[j] = (((qs[j] & 15) as u32 | fifth_bit(qh, j) << 4) as f32) - 16.0;
        want[j + 16] = (((qs[j] >> 4) as u32 | fifth_bit(qh, j + 16) << 4) as f32) - 16.0;
    }
    check(GgmlType::Q5_0, &b, &want);
}

#[test]
fn q5_1() {
    let mut b = f16(0.5).to_vec();
    b.extend_from_slice(&f16(-4.0));
    let qh: u32 = 0x1234_ABCD;
    b.extend_from_slice(&qh.to_le_bytes());
    let qs = bytes(16, 4);
    b.extend_from_slice(&qs);
    let mut want = vec![0f32; 32];
    for j in 0..16 {
        want[j] = ((qs[j] & 15) as u32 | fifth_bit(qh, j) << 4) as f32 * 0.5 - 4.0;
        want[j + 16] = ((qs[j] >> 4) as u32 | fifth_bit(qh, j + 16) << 4) as f32 * 0.5 - 4.0;
    }
    check(GgmlType::Q5_1, &b, &want);
}

/// Element e of a 256-block in the Q2_K/Q3_K layout: (quant byte index,
/// shift, scale index, hmask byte index, hmask bit).
fn k_2bit_pos(e: usize) -> (usize, u32, usize, usize, u8) {
    let n = e / 128;
    let j = (e % 128) / 32;
    let half = (e % 32) / 16;
    let l = e % 16;
    (
        32 * n + 16 * half + l,
        2 * j as u32,
        8 * n + 2 * j + half,
        16 * half + l,
        1u8 << (4 * n + j),
    )
}

#[test]
fn q2_k() {
    let scales = bytes(16, 5);
    let qs = bytes(64, 6);
    let (d, dmin) = (1.0f32, 0.5f32);
    let mut b = scales.clone();
    b.extend_from_slice(&qs);
    b.extend_from_slice(&f16(d));
    b.extend_from_slice(&f16(dmin));
    let want: Vec<f32> = (0..256)
        .map(|e| {
            let (qi, shift, is, _, _) = k_2bit_pos(e);
            let q = (qs[qi] >> shift) & 3;
            d * (scales[is] & 15) as f32 * q as f32 - dmin * (scales[is] >> 4) as f32
        })
        .collect();
    check(GgmlType::Q2_K, &b, &want);
}

#[test]
fn q3_k() {
    // 16 signed 6-bit scales (stored +32), packed as ggml packs them.
    let sc6: Vec<u8> = (0..16).map(|i| ((i * 7 + 3) % 64) as u8).collect();
    let mut packed = [0u8; 12];
    for (is, &s) in sc6.iter().enumerate() {
        let low = s & 15;
        if is < 8 {
            packed[is] |= low;
        } else {
            packed[is - 8] |= low << 4;
        }
        packed[8 + is % 4] |= (s >> 4) << (2 * (is / 4));
    }
    let hmask = bytes(32, 7);
    let qs = bytes(64, 8);
    let d = 0.25f32;
    let mut b = hmask.clone();
    b.extend_from_slice(&qs);
    b.extend_from_slice(&packed);
    b.extend_from_slice(&f16(d));
    let want: Vec<f32> = (0..256)
        .map(|e| {
            let (qi, shift, is, hi, bit) = k_2bit_pos(e);
            let low = ((qs[qi] >> shift) & 3) as i32;
            let q = low - if hmask[hi] & bit != 0 { 0 } else { 4 };
            d * (sc6[is] as i32 - 32) as f32 * q as f32
        })
        .collect();
    check(GgmlType::Q3_K, &b, &want);
}

/// Pack 8 (scale, min) 6-bit pairs as Q4_K/Q5_K store them.
fn pack_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    s
}

const SC: [u8; 8] = [1, 63, 17, 32, 5, 48, 60, 33];
const MN: [u8; 8] = [0, 2, 63, 40, 31, 16, 9, 50];

#[test]
fn q4_k() {
    let (d, dmin) = (0.5f32, 0.25f32);
    let qs = bytes(128, 9);
    let mut b = f16(d).to_vec();
    b.extend_from_slice(&f16(dmin));
    b.extend_from_slice(&pack_k4(&SC, &MN));
    b.extend_from_slice(&qs);
    let want: Vec<f32> = (0..256)
        .map(|e| {
            let sub = e / 32;
            let byte = qs[32 * (e / 64) + e % 32];
            let q = if sub % 2 == 0 { byte & 15 } else { byte >> 4 };
            d * SC[sub] as f32 * q as f32 - dmin * MN[sub] as f32
        })
        .collect();
    check(GgmlType::Q4_K, &b, &want);
}

#[test]
fn q5_k() {
    let (d, dmin) = (2.0f32, 0.125f32);
    let qh = bytes(32, 10);
    let qs = bytes(128, 11);
    let mut b = f16(d).to_vec();
    b.extend_from_slice(&f16(dmin));
    b.extend_from_slice(&pack_k4(&SC, &MN));
    b.extend_from_slice(&qh);
    b.extend_from_slice(&qs);
    let want: Vec<f32> = (0..256)
        .map(|e| {
            let sub = e / 32;
            let l = e % 32;
            let byte = qs[32 * (e / 64) + l];
            let low = if sub % 2 == 0 { byte & 15 } else { byte >> 4 };
            let high = (qh[l] >> sub) & 1;
            let q = low as u32 + 16 * high as u32;
            d * SC[sub] as f32 * q as f32 - dmin * MN[sub] as f32
        })
        .collect();
    check(GgmlType::Q5_K, &b, &want);
}

#[test]
fn q6_k() {
    let ql = bytes(128, 12);
    let qh = bytes(64, 13);
    let scales: Vec<i8> = (0..16).map(|i| (i as i8 * 9) - 70).collect();
    let d = 0.5f32;
    let mut b = ql.clone();
    b.extend_from_slice(&qh);
    b.extend(scales.iter().map(|&s| s as u8));
    b.extend_from_slice(&f16(d));
    let want: Vec<f32> = (0..256)
        .map(|e| {
            let n = e / 128;
            let quarter = (e % 128) / 32;
            let l = e % 32;
            let lbyte = ql[64 * n + l + 32 * (quarter % 2)];
            let low = if quarter < 2 { lbyte & 15 } else { lbyte >> 4 };
            let high = (qh[32 * n + l] >> (2 * quarter)) & 3;
            let q = (low | (high << 4)) as i32 - 32;
            let sc = scales[8 * n + l / 16 + 2 * quarter];
            d * sc as f32 * q as f32
        })
        .collect();
    check(GgmlType::Q6_K, &b, &want);
}

#[test]
fn unsupported_types_are_errors_naming_the_type() {
    for ty in GgmlType::all_known() {
        let Some(ts) = ty.type_size() else { continue };
        let bs = ty.block_size().unwrap();
        let r = dequantize(ty, &vec![0u8; ts], bs);
        assert_eq!(r.is_ok(), ty.can_dequantize(), "{ty}");
        if let Err(e) = r {
            assert!(matches!(e, GgufError::UnsupportedType { .. }), "{e:?}");
            assert!(
                e.to_string()
                    .contains(&format!("cannot dequantize ggml type {}", ty.name())),
                "{e}"
            );
        }
    }
    let e = dequantize(GgmlType::Other(99), &[], 0).unwrap_err();
    assert!(e.to_string().contains("unknown ggml type 99"), "{e}");
}

#[test]
fn size_errors() {
    let e = dequantize(GgmlType::Q4_K, &[0; 144], 255).unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::NotBlockMultiple {
                block_size: 256,
                ..
            }
        ),
        "{e:?}"
    );
    let e = dequantize(GgmlType::Q4_K, &[0; 143], 256).unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::DataSizeMismatch {
                expected: 144,
                got: 143,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("must be 144 bytes, got 143"), "{e}");
    let mut out = [0f32; 64];
    let e = dequantize_into(GgmlType::Q8_0, &[0; 34], &mut out).unwrap_err();
    assert!(matches!(e, GgufError::DataSizeMismatch { .. }), "{e:?}");
    assert_eq!(
        dequantize(GgmlType::Q6_K, &[], 0).unwrap(),
        Vec::<f32>::new()
    );
}

#[test]
fn random_blocks_are_finite_and_into_matches() {
    for ty in GgmlType::all_known().filter(|t| t.can_dequantize()) {
        let (bs, ts) = (ty.block_size().unwrap(), ty.type_size().unwrap());
        let n_blocks = 64 * 32 / bs.max(32) + 3;
        let mut raw = bytes(ts * n_blocks, ty.id());
        // Keep every f16 scale finite: clear the top exponent bit of each byte
        // pair that could be a scale by using small random data for F16/BF16.
        if matches!(ty, GgmlType::F16 | GgmlType::BF16 | GgmlType::F32) {
            for c in raw.chunks_mut(2) {
                c[c.len() - 1] &= 0x3F;
            }
        } else {
            let (lo, hi) = match ty {
                GgmlType::Q2_K => (80, 84),
                GgmlType::Q3_K => (108, 110),
                GgmlType::Q6_K => (208, 210),
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => (0, 4),
                _ => (0, 2),
            };
            for blk in raw.chunks_mut(ts) {
                for k in (lo..hi).step_by(2) {
                    blk[k + 1] &= 0x3F;
                }
            }
        }
        let n = n_blocks * bs;
        let a = dequantize(ty, &raw, n).unwrap();
        let mut b = vec![0f32; n];
        dequantize_into(ty, &raw, &mut b).unwrap();
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{ty}"
        );
        assert!(a.iter().all(|x| x.is_finite()), "{ty}");
        assert!(a.iter().any(|&x| x != 0.0), "{ty}");
    }
}
