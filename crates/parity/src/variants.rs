//! Variants of a model made on the fly and cached beside it: an F32 copy
//! written with our bit-exact dequantization (the float reference, and the
//! source every other variant is quantized from), and llama.cpp's own
//! quantizations of that copy (Q8_0, Q4_0, Q5_0, Q5_K_M, Q6_K, F16, ...), so
//! the tool is shown on every weight type, on real weights.

use anyhow::{bail, Context, Result};
use gguf::{GgmlType, GgufFile, GgufWriter, MetadataValue};
use crate::progress::{Milestones, Progress, Unit};
use std::path::{Path, PathBuf};

/// The variants `parity variant --type` makes, by name: (name, type
/// llama.cpp quantizes "mostly" to; K-quants are the _M mixes).
pub const VARIANTS: &[(&str, Option<GgmlType>)] = &[
    ("f32", None),
    ("f16", Some(GgmlType::F16)),
    ("q8_0", Some(GgmlType::Q8_0)),
    ("q6_k", Some(GgmlType::Q6_K)),
    ("q5_k_m", Some(GgmlType::Q5_K)),
    ("q5_0", Some(GgmlType::Q5_0)),
    ("q4_0", Some(GgmlType::Q4_0)),
];

/// `<dir>/<stem>.<variant>.gguf` beside the source model.
pub fn variant_path(model: &Path, name: &str) -> PathBuf {
    let stem = model.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    model.with_file_name(format!("{stem}.{name}.gguf"))
}

/// The variant `name` of `model`: made (and cached) when missing, else the
/// cached file. Every file is written under a temporary name and renamed,
/// so a cached file is always whole.
pub fn variant(model: &Path, name: &str) -> Result<PathBuf> {
    let Some(&(_, ty)) = VARIANTS.iter().find(|(n, _)| *n == name) else {
        let names: Vec<_> = VARIANTS.iter().map(|(n, _)| *n).collect();
        bail!("unknown variant {name:?}; one of: {}", names.join(", "));
    };
    let out = variant_path(model, name);
    if out.is_file() {
        eprintln!("variant {name}: cached at {}", out.display());
        return Ok(out);
    }
    let f32_copy = variant_path(model, "f32");
    if !f32_copy.is_file() {
        write_f32_copy(model, &f32_copy)?;
    }
    if let Some(ty) = ty {
        eprintln!("variant {name}: quantizing {} with llama.cpp", f32_copy.display());
        let mut tmp = out.clone().into_os_string();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        llama_ref::quantize_model(&f32_copy, &tmp, ty).with_context(|| format!("making the {name} variant"))?;
        std::fs::rename(&tmp, &out).with_context(|| format!("renaming {} into place", out.display()))?;
    }
    eprintln!("variant {name}: {}", out.display());
    Ok(out)
}

/// Every tensor upcast to F32 with our dequantization (bit for bit ggml's),
/// metadata copied, `general.file_type` set to 0 (all F32).
pub fn write_f32_copy(model: &Path, out: &Path) -> Result<()> {
    let src = GgufFile::open(model)?;
    let mut w = GgufWriter::new();
    for (key, value) in src.metadata() {
        let value = if key == "general.file_type" { MetadataValue::U32(0) } else { value.clone() };
        w.add(key.clone(), value);
    }
    let n = src.tensors().len() as u64;
    let mut progress = Progress::new("f32 copy", n, Unit::Items("tensors"), Milestones::EveryTenth);
    for (i, t) in src.tensors().iter().enumerate() {
        progress.set(i as u64, n, &format!("{} ({})", t.name, t.ggml_type.name()));
        let values = src.dequantize(&t.name).with_context(|| format!("dequantizing {}", t.name))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.add_tensor(t.name.clone(), t.dims.clone(), GgmlType::F32, bytes)?;
    }
    progress.finish(&format!("{n} tensors upcast"));
    eprintln!("f32 copy: writing {}", out.display());
    w.write(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_sit_beside_the_model() {
        let p = Path::new("/cache/qwen.gguf");
        assert_eq!(variant_path(p, "q8_0"), Path::new("/cache/qwen.q8_0.gguf"));
        assert!(variant(p, "q9_9").unwrap_err().to_string().contains("unknown variant"));
    }
}
