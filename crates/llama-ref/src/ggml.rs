//! ggml's own arithmetic through FFI: the reference our dequantization is
//! proved against, and the quantizer the tests feed it from.

use crate::LlamaError;
use gguf::GgmlType;
use llama_cpp_sys_2 as sys;
use std::ffi::c_void;

/// Types `quantize` hands to `ggml_quantize_chunk` (each has a case there
/// and needs no importance matrix).
const QUANTIZABLE: &[sys::ggml_type] = &[
    sys::GGML_TYPE_F32,
    sys::GGML_TYPE_F16,
    sys::GGML_TYPE_BF16,
    sys::GGML_TYPE_Q4_0,
    sys::GGML_TYPE_Q4_1,
    sys::GGML_TYPE_Q5_0,
    sys::GGML_TYPE_Q5_1,
    sys::GGML_TYPE_Q8_0,
    sys::GGML_TYPE_Q2_K,
    sys::GGML_TYPE_Q3_K,
    sys::GGML_TYPE_Q4_K,
    sys::GGML_TYPE_Q5_K,
    sys::GGML_TYPE_Q6_K,
    sys::GGML_TYPE_IQ4_NL,
    sys::GGML_TYPE_IQ4_XS,
];

struct Traits {
    name: String,
    blck_size: usize,
    type_size: usize,
    to_float: sys::ggml_to_float_t,
}

fn traits(id: u32) -> Option<Traits> {
    if id >= sys::GGML_TYPE_COUNT {
        return None;
    }
    // SAFETY: `id` is below GGML_TYPE_COUNT, so it indexes ggml's static traits table.
    let t = unsafe { sys::ggml_get_type_traits(id) };
    if t.is_null() {
        return None;
    }
    // SAFETY: non-null pointer into ggml's static, immutable traits table.
    let t = unsafe { &*t };
    if t.blck_size <= 0 || t.type_size == 0 {
        return None; // a removed type (Q4_2, Q4_3, ...)
    }
    Some(Traits {
        name: crate::hook::type_name(id),
        blck_size: t.blck_size as usize,
        type_size: t.type_size,
        to_float: t.to_float,
    })
}

/// 16-byte aligned copy of `bytes` when they are not aligned already: ggml's
/// block structs expect at least their natural alignment.
fn aligned(bytes: &[u8]) -> Option<Vec<u128>> {
    if (bytes.as_ptr() as usize).is_multiple_of(16) {
        return None;
    }
    let mut buf = vec![0u128; bytes.len().div_ceil(16)];
    // SAFETY: `buf` spans at least bytes.len() bytes; u8 has no alignment needs; regions are disjoint.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.as_mut_ptr() as *mut u8, bytes.len()) };
    Some(buf)
}

/// Dequantize `n_elements` values of ggml type `id` with ggml's own
/// `to_float` (after checking that `bytes` holds exactly those elements).
pub fn dequantize_id(id: u32, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, LlamaError> {
    let t = traits(id).ok_or_else(|| LlamaError::UnsupportedType { ty: format!("id {id}"), what: "dequantization by ggml" })?;
    if !n_elements.is_multiple_of(t.blck_size) {
        return Err(LlamaError::BadLength {
            ty: t.name,
            msg: format!("{n_elements} elements is not a multiple of the block size {}", t.blck_size),
        });
    }
    let need = n_elements / t.blck_size * t.type_size;
    if bytes.len() != need {
        return Err(LlamaError::BadLength {
            ty: t.name,
            msg: format!("{} bytes given, {n_elements} elements take {need}", bytes.len()),
        });
    }
    if id == sys::GGML_TYPE_F32 {
        return Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
    }
    let to_float = t.to_float.ok_or_else(|| LlamaError::UnsupportedType { ty: t.name.clone(), what: "dequantization by ggml" })?;
    let copy = aligned(bytes);
    let src = copy.as_ref().map_or(bytes.as_ptr() as *const c_void, |b| b.as_ptr() as *const c_void);
    let mut out = vec![0f32; n_elements];
    // SAFETY: `src` holds exactly n_elements/blck_size blocks of this type
    // (checked above), 16-byte aligned; `out` holds n_elements floats;
    // n_elements is a multiple of the block size, as to_float requires.
    unsafe { to_float(src, out.as_mut_ptr(), n_elements as i64) };
    Ok(out)
}

/// Quantize rows of `n_per_row` values to ggml type `id` with `ggml_quantize_chunk`.
pub fn quantize_id(id: u32, data: &[f32], n_per_row: usize) -> Result<Vec<u8>, LlamaError> {
    let t = traits(id).ok_or_else(|| LlamaError::UnsupportedType { ty: format!("id {id}"), what: "quantization by ggml" })?;
    // SAFETY: `id` is a valid type (traits found); the function only compares it.
    if unsafe { sys::ggml_quantize_requires_imatrix(id) } {
        return Err(LlamaError::Quantize(format!("{} needs an importance matrix", t.name)));
    }
    if !QUANTIZABLE.contains(&id) {
        return Err(LlamaError::UnsupportedType { ty: t.name, what: "quantization by ggml" });
    }
    if n_per_row == 0 || !n_per_row.is_multiple_of(t.blck_size) {
        return Err(LlamaError::BadLength {
            ty: t.name,
            msg: format!("row length {n_per_row} is not a positive multiple of the block size {}", t.blck_size),
        });
    }
    if !data.len().is_multiple_of(n_per_row) {
        return Err(LlamaError::BadLength { ty: t.name, msg: format!("{} values do not make whole rows of {n_per_row}", data.len()) });
    }
    let n_rows = data.len() / n_per_row;
    // SAFETY: valid type, row length checked to be whole blocks.
    let row_size = unsafe { sys::ggml_row_size(id, n_per_row as i64) };
    let mut out = vec![0u128; (row_size * n_rows).div_ceil(16)];
    // SAFETY: `data` holds n_rows*n_per_row floats; `out` holds at least
    // n_rows*row_size bytes, 16-byte aligned; start 0 satisfies both of
    // ggml's start asserts; the type needs no imatrix (checked) and has a
    // case in ggml_quantize_chunk (QUANTIZABLE).
    let written = unsafe {
        sys::ggml_quantize_chunk(
            id,
            data.as_ptr(),
            out.as_mut_ptr() as *mut c_void,
            0,
            n_rows as i64,
            n_per_row as i64,
            std::ptr::null(),
        )
    };
    if written != row_size * n_rows {
        return Err(LlamaError::Quantize(format!("{}: ggml wrote {written} bytes, expected {}", t.name, row_size * n_rows)));
    }
    // SAFETY: `out` holds at least `written` initialised bytes.
    let bytes = unsafe { std::slice::from_raw_parts(out.as_ptr() as *const u8, written) };
    Ok(bytes.to_vec())
}


/// ggml's CPU type traits for `id`: (`from_float`, `vec_dot_type`).
fn cpu_traits(id: u32) -> Option<(sys::ggml_from_float_t, u32)> {
    if id >= sys::GGML_TYPE_COUNT {
        return None;
    }
    crate::backend::ensure().ok()?;
    // SAFETY: `id` is below GGML_TYPE_COUNT, so it indexes ggml-cpu's static
    // traits table; the CPU backend is initialised (ensure above).
    let t = unsafe { sys::ggml_get_type_traits_cpu(id) };
    if t.is_null() {
        return None;
    }
    // SAFETY: non-null pointer into ggml-cpu's static, immutable table.
    let t = unsafe { &*t };
    Some((t.from_float, t.vec_dot_type))
}

/// The type ggml's CPU matmul converts activations to for weights of type
/// `weight` (`ggml_get_type_traits_cpu(weight)->vec_dot_type`).
pub fn vec_dot_type(weight: GgmlType) -> Result<GgmlType, LlamaError> {
    let (_, vdt) = cpu_traits(weight.id())
        .ok_or_else(|| LlamaError::UnsupportedType { ty: weight.name().to_string(), what: "ggml's CPU matmul" })?;
    Ok(GgmlType::from_id(vdt))
}

/// Convert one activation row the way ggml's CPU matmul does before a dot
/// product: `ggml_get_type_traits_cpu(ty)->from_float`, ty being a
/// `vec_dot_type` (q8_0, q8_1, q8_K, f16, bf16). Returns ggml's block bytes.
pub fn quantize_activations(ty: GgmlType, row: &[f32]) -> Result<Vec<u8>, LlamaError> {
    let id = ty.id();
    let (from_float, _) = cpu_traits(id).ok_or_else(|| LlamaError::UnsupportedType { ty: ty.name().to_string(), what: "ggml's CPU from_float" })?;
    let from_float = from_float.ok_or_else(|| LlamaError::UnsupportedType { ty: ty.name().to_string(), what: "ggml's CPU from_float" })?;
    let t = traits(id).ok_or_else(|| LlamaError::UnsupportedType { ty: ty.name().to_string(), what: "ggml's CPU from_float" })?;
    if row.is_empty() || !row.len().is_multiple_of(t.blck_size) {
        return Err(LlamaError::BadLength {
            ty: t.name,
            msg: format!("row of {} values is not a positive multiple of the block size {}", row.len(), t.blck_size),
        });
    }
    let n_bytes = row.len() / t.blck_size * t.type_size;
    // Zeroed: ggml leaves q8_K's bsums of an all-zero block unwritten.
    let mut out = vec![0u128; n_bytes.div_ceil(16)];
    // SAFETY: `row` holds row.len() floats, a whole number of blocks;
    // `out` holds at least n_bytes bytes, 16-byte aligned; from_float writes
    // exactly row.len()/blck_size blocks of type_size bytes.
    unsafe { from_float(row.as_ptr(), out.as_mut_ptr() as *mut c_void, row.len() as i64) };
    // SAFETY: `out` holds at least n_bytes initialised bytes.
    let bytes = unsafe { std::slice::from_raw_parts(out.as_ptr() as *const u8, n_bytes) };
    Ok(bytes.to_vec())
}

/// Dequantize with ggml itself (`ggml_get_type_traits(type)->to_float`),
/// after checking that `bytes` holds exactly `n_elements` values.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, LlamaError> {
    dequantize_id(ty.id(), bytes, n_elements)
}

/// Quantize rows of `n_per_row` values with `ggml_quantize_chunk`; types
/// that need an importance matrix are refused.
pub fn quantize(ty: GgmlType, data: &[f32], n_per_row: usize) -> Result<Vec<u8>, LlamaError> {
    quantize_id(ty.id(), data, n_per_row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_checked_before_ggml_sees_them() {
        assert!(matches!(dequantize_id(sys::GGML_TYPE_Q4_0, &[0u8; 17], 32), Err(LlamaError::BadLength { .. })));
        assert!(matches!(dequantize_id(sys::GGML_TYPE_Q4_0, &[0u8; 18], 31), Err(LlamaError::BadLength { .. })));
        assert!(matches!(dequantize_id(4, &[0u8; 18], 32), Err(LlamaError::UnsupportedType { .. })));
        assert!(matches!(dequantize_id(9999, &[], 0), Err(LlamaError::UnsupportedType { .. })));
        assert!(matches!(quantize_id(sys::GGML_TYPE_Q4_K, &[0.0; 128], 128), Err(LlamaError::BadLength { .. })));
        assert!(matches!(quantize_id(sys::GGML_TYPE_IQ2_XXS, &[0.0; 256], 256), Err(LlamaError::Quantize(_))));
    }

    #[test]
    fn q8_0_round_trip_is_close_and_unaligned_input_is_fine() {
        let data: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = quantize_id(sys::GGML_TYPE_Q8_0, &data, 32).unwrap();
        assert_eq!(q.len(), 2 * 34);
        let back = dequantize_id(sys::GGML_TYPE_Q8_0, &q, 64).unwrap();
        for (a, b) in data.iter().zip(&back) {
            // q8_0: d = max|x|/127 <= 1/127, rounding error <= d/2, plus d stored
            // as f16 (relative error 2^-11) times |q| <= 127: |x| <= 1 adds 2^-11
            assert!((a - b).abs() <= 0.5 / 127.0 + 1.0 / 2048.0, "{a} vs {b}");
        }
        let mut shifted = vec![0u8; q.len() + 1];
        shifted[1..].copy_from_slice(&q);
        let back2 = dequantize_id(sys::GGML_TYPE_Q8_0, &shifted[1..], 64).unwrap();
        assert_eq!(back, back2);
    }
}
