//! Whole-model quantization with llama.cpp's own `llama_model_quantize`.

use crate::{backend, LlamaError};
use gguf::GgmlType;
use llama_cpp_sys_2 as sys;
use std::ffi::CString;
use std::path::Path;

/// The llama_ftype that quantizes a model "mostly" to ggml type `id`
/// (K-quants: the _M mixes, as llama-quantize's Q3_K/Q4_K/Q5_K aliases).
fn ftype_for(id: u32) -> Option<sys::llama_ftype> {
    Some(match id {
        sys::GGML_TYPE_F16 => sys::LLAMA_FTYPE_MOSTLY_F16,
        sys::GGML_TYPE_BF16 => sys::LLAMA_FTYPE_MOSTLY_BF16,
        sys::GGML_TYPE_Q8_0 => sys::LLAMA_FTYPE_MOSTLY_Q8_0,
        sys::GGML_TYPE_Q4_0 => sys::LLAMA_FTYPE_MOSTLY_Q4_0,
        sys::GGML_TYPE_Q4_1 => sys::LLAMA_FTYPE_MOSTLY_Q4_1,
        sys::GGML_TYPE_Q5_0 => sys::LLAMA_FTYPE_MOSTLY_Q5_0,
        sys::GGML_TYPE_Q5_1 => sys::LLAMA_FTYPE_MOSTLY_Q5_1,
        sys::GGML_TYPE_Q2_K => sys::LLAMA_FTYPE_MOSTLY_Q2_K,
        sys::GGML_TYPE_Q3_K => sys::LLAMA_FTYPE_MOSTLY_Q3_K_M,
        sys::GGML_TYPE_Q4_K => sys::LLAMA_FTYPE_MOSTLY_Q4_K_M,
        sys::GGML_TYPE_Q5_K => sys::LLAMA_FTYPE_MOSTLY_Q5_K_M,
        sys::GGML_TYPE_Q6_K => sys::LLAMA_FTYPE_MOSTLY_Q6_K,
        _ => return None,
    })
}

fn c_path(path: &Path) -> Result<CString, LlamaError> {
    let s = path.to_str().ok_or_else(|| LlamaError::Input(format!("path is not UTF-8: {}", path.display())))?;
    CString::new(s).map_err(|_| LlamaError::Input(format!("path contains a NUL byte: {}", path.display())))
}

/// Quantize the model at `src` into `dst`, mostly `target` (llama.cpp's
/// usual per-tensor mix for that ftype: Q3_K/Q4_K/Q5_K mean the _M mixes;
/// rows that do not fit a K-quant's 256-wide blocks fall back to llama.cpp's
/// own choice). Quiet unless PARITY_LLAMA_LOG is set.
pub fn quantize_model(src: &Path, dst: &Path, target: GgmlType) -> Result<(), LlamaError> {
    quantize_model_id(src, dst, target.id())
}

fn quantize_model_id(src: &Path, dst: &Path, id: u32) -> Result<(), LlamaError> {
    let ftype = ftype_for(id).ok_or_else(|| LlamaError::UnsupportedType {
        ty: crate::hook::type_name(id),
        what: "whole-model quantization",
    })?;
    if !src.is_file() {
        return Err(LlamaError::NotFound(src.to_path_buf()));
    }
    backend::ensure()?;
    let (csrc, cdst) = (c_path(src)?, c_path(dst)?);
    // SAFETY: plain constructor of a params struct.
    let mut params = unsafe { sys::llama_model_quantize_default_params() };
    params.ftype = ftype;
    params.nthread = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    // SAFETY: both paths are NUL-terminated and live for the call; `params`
    // is fully initialised from the defaults. llama_model_quantize catches
    // its own C++ exceptions and reports them as a non-zero return.
    let rc = unsafe { sys::llama_model_quantize(csrc.as_ptr(), cdst.as_ptr(), &params) };
    if rc != 0 {
        return Err(LlamaError::Quantize(format!(
            "llama_model_quantize {} -> {} returned {rc} (PARITY_LLAMA_LOG=1 shows why)",
            src.display(),
            dst.display()
        )));
    }
    Ok(())
}
