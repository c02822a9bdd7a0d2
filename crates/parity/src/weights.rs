//! Every GGUF tensor dequantized by our `gguf` crate and by ggml itself
//! (`to_float` through llama-ref), compared bit for bit.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use crate::progress::{Milestones, Progress, Unit};
use std::path::Path;

#[derive(Default, serde::Serialize)]
pub struct TypeStats {
    pub tensors: usize,
    pub elements: u64,
    pub max_abs_diff: f64,
    pub mismatched: usize,
}

#[derive(serde::Serialize)]
pub struct Report {
    pub model: String,
    pub tensors_checked: usize,
    pub tensors_mismatched: usize,
    pub elements_checked: u64,
    pub by_type: BTreeMap<String, TypeStats>,
    pub mismatched_tensors: Vec<String>,
}

/// Number of differing bit patterns and the largest |a - b| (infinite where
/// exactly one side is NaN or the sides are infinities of different sign).
pub fn compare(ours: &[f32], ggml: &[f32]) -> (usize, f64) {
    let mut n = 0;
    let mut max = 0f64;
    for (&a, &b) in ours.iter().zip(ggml) {
        if a.to_bits() != b.to_bits() {
            n += 1;
            let d = (a as f64 - b as f64).abs();
            let d = if d.is_nan() { if a.is_nan() && b.is_nan() { 0.0 } else { f64::INFINITY } } else { d };
            max = max.max(d);
        }
    }
    (n, max)
}

/// Check every tensor of the GGUF at `path`; progress on stderr.
pub fn check(path: &Path) -> Result<Report> {
    if !path.is_file() {
        bail!("model file not found: {}", path.display());
    }
    let file = gguf::GgufFile::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let tensors = file.tensors();
    // refuse up front: a type neither side can dequantize is an input error
    for t in tensors {
        if !t.ggml_type.can_dequantize() {
            bail!("tensor {}: ggml type {} is not supported", t.name, t.ggml_type.name());
        }
    }
    let mut progress = Progress::new("weights", tensors.len() as u64, Unit::Items("tensors"), Milestones::EveryTenth);
    let mut by_type: BTreeMap<String, TypeStats> = BTreeMap::new();
    let mut mismatched_tensors = Vec::new();
    let mut elements_checked = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let ty = t.ggml_type;
        progress.set(i as u64, tensors.len() as u64, &format!("{} ({})", t.name, ty.name()));
        let n = usize::try_from(t.n_elements).context("tensor too large for this machine")?;
        let bytes = file.tensor_data(t);
        let ours = gguf::dequant::dequantize(ty, bytes, n).with_context(|| format!("tensor {}: our dequantization", t.name))?;
        let ggml = llama_ref::ggml::dequantize(ty, bytes, n).with_context(|| format!("tensor {}: ggml's dequantization", t.name))?;
        if ours.len() != n || ggml.len() != n {
            bail!("tensor {}: {n} elements expected, ours gave {}, ggml {}", t.name, ours.len(), ggml.len());
        }
        let (diff, max) = compare(&ours, &ggml);
        let s = by_type.entry(ty.name().to_string()).or_default();
        s.tensors += 1;
        s.elements += t.n_elements;
        s.max_abs_diff = s.max_abs_diff.max(max);
        if diff > 0 {
            s.mismatched += 1;
            mismatched_tensors.push(format!("{} ({}): {diff} of {n} values differ, max |diff| {max:e}", t.name, ty.name()));
        }
        elements_checked += t.n_elements;
    }
    progress.finish(&format!("{} tensors dequantized both ways", tensors.len()));

    let report = Report {
        model: path.display().to_string(),
        tensors_checked: tensors.len(),
        tensors_mismatched: mismatched_tensors.len(),
        elements_checked,
        by_type,
        mismatched_tensors,
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::compare;

    #[test]
    fn comparison_is_on_bits() {
        assert_eq!(compare(&[1.0, 2.0], &[1.0, 2.0]), (0, 0.0));
        assert_eq!(compare(&[0.0], &[-0.0]), (1, 0.0));
        assert_eq!(compare(&[1.0, f32::NAN], &[1.5, 0.0]), (2, f64::INFINITY));
        assert_eq!(compare(&[f32::NAN], &[f32::NAN]), (0, 0.0));
    }
}
