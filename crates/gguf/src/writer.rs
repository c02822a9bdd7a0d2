//! GGUF v3 writer: metadata of every value type (nested arrays included),
//! tensors as raw bytes, data aligned to `general.alignment` (default 32).

use crate::error::GgufError;
use crate::reader::{MetadataValue, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_NESTING, T_U8};
use crate::types::GgmlType;
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// Builds a GGUF v3 file in memory, then writes it.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<PendingTensor>,
    tensor_names: HashSet<String>,
}

fn err(reason: String) -> GgufError {
    GgufError::Writer { reason }
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Add a metadata pair (written in the order added). Keys must be
    /// unique and non-empty and arrays homogeneous; [`GgufWriter::write`]
    /// reports violations.
    pub fn add(&mut self, key: impl Into<String>, value: MetadataValue) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Add a tensor: `dims` in ggml order (ne0 first), `data` exactly
    /// `ty.row_bytes(n_elements)` bytes.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: Vec<u64>,
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<(), GgufError> {
        let name = name.into();
        if name.is_empty() {
            return Err(err("empty tensor name".into()));
        }
        if self.tensor_names.contains(&name) {
            return Err(err(format!("duplicate tensor name '{name}'")));
        }
        if dims.is_empty() || dims.len() > 4 {
            return Err(err(format!(
                "tensor '{name}' has {} dimensions (1 to 4 allowed)",
                dims.len()
            )));
        }
        if dims.contains(&0) {
            return Err(err(format!(
                "tensor '{name}' has a zero dimension: {dims:?}"
            )));
        }
        let (Some(bs), Some(ts)) = (ty.block_size(), ty.type_size()) else {
            return Err(err(format!("tensor '{name}' has {ty}")));
        };
        if !dims[0].is_multiple_of(bs as u64) {
            return Err(err(format!(
                "tensor '{name}' of type {ty}: row size {} is not a multiple of the block size {bs}",
                dims[0]
            )));
        }
        let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let expected = n.and_then(|n| (n / bs as u64).checked_mul(ts as u64));
        if expected != Some(data.len() as u64) {
            return Err(err(format!(
                "tensor '{name}' of type {ty} and dims {dims:?} needs {expected:?} bytes, got {}",
                data.len()
            )));
        }
        self.tensor_names.insert(name.clone());
        self.tensors.push(PendingTensor {
            name,
            dims,
            ty,
            data,
        });
        Ok(())
    }

    fn alignment(&self) -> Result<usize, GgufError> {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => Ok(DEFAULT_ALIGNMENT),
            Some((_, MetadataValue::U32(a))) if *a != 0 && a.is_power_of_two() => Ok(*a as usize),
            Some((_, v)) => Err(err(format!(
                "general.alignment must be a u32 power of two, got {v:?}"
            ))),
        }
    }

    /// Everything before the tensor data (padded to the alignment), and each
    /// tensor's offset in the data section.
    fn header(&self) -> Result<(Vec<u8>, Vec<usize>, usize), GgufError> {
        let align = self.alignment()?;
        let mut keys = HashSet::new();
        for (k, v) in &self.metadata {
            if k.is_empty() {
                return Err(err("empty metadata key".into()));
            }
            if !keys.insert(k.as_str()) {
                return Err(err(format!("duplicate metadata key '{k}'")));
            }
            check_homogeneous(k, v, 0)?;
        }

        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset += t.data.len().next_multiple_of(align);
        }
        if !self.tensors.is_empty() {
            out.resize(out.len().next_multiple_of(align), 0);
        }
        Ok((out, offsets, offset))
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let (mut out, offsets, total) = self.header()?;
        let data_start = out.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend_from_slice(&t.data);
        }
        if !self.tensors.is_empty() {
            out.resize(data_start + total, 0);
        }
        Ok(out)
    }

    /// Write the file (GGUF v3), streaming the tensor data (no second copy
    /// of it in memory), to a temporary name renamed into place at the end:
    /// an interrupted write never leaves a file that looks whole.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        let (header, offsets, total) = self.header()?;
        let io = |op: &'static str| {
            move |e| GgufError::Io {
                path: path.to_path_buf(),
                op,
                err: e,
            }
        };
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".partial");
        let tmp = std::path::PathBuf::from(tmp_name);
        let f = std::fs::File::create(&tmp).map_err(io("cannot create"))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 22, f);
        w.write_all(&header).map_err(io("cannot write"))?;
        let mut written = 0usize;
        for (t, off) in self.tensors.iter().zip(offsets) {
            w.write_all(&vec![0u8; off - written]).map_err(io("cannot write"))?;
            w.write_all(&t.data).map_err(io("cannot write"))?;
            written = off + t.data.len();
        }
        w.write_all(&vec![0u8; total - written]).map_err(io("cannot write"))?;
        let f = w.into_inner().map_err(|e| e.into_error()).map_err(io("cannot write"))?;
        f.sync_all().map_err(io("cannot sync"))?;
        std::fs::rename(&tmp, path).map_err(io("cannot rename into place"))?;
        Ok(())
    }
}

fn check_homogeneous(key: &str, v: &MetadataValue, depth: usize) -> Result<(), GgufError> {
    if let MetadataValue::Array(items) = v {
        if depth >= MAX_NESTING {
            return Err(err(format!(
                "key '{key}': arrays nested deeper than {MAX_NESTING} levels"
            )));
        }
        if let Some(first) = items.first() {
            let t = first.type_id();
            if let Some(bad) = items.iter().find(|i| i.type_id() != t) {
                return Err(err(format!(
                    "key '{key}': array mixes {} and {} items (GGUF arrays are homogeneous)",
                    first.type_name(),
                    bad.type_name()
                )));
            }
        }
        for i in items {
            check_homogeneous(key, i, depth + 1)?;
        }
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetadataValue) {
    match v {
        MetadataValue::U8(x) => out.push(*x),
        MetadataValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::Bool(x) => out.push(u8::from(*x)),
        MetadataValue::String(s) => put_str(out, s),
        MetadataValue::Array(items) => {
            // Like gguf-py: an empty array is typed u8; each element of an
            // array of arrays is (element type, count, items).
            let elem = items.first().map(|i| i.type_id()).unwrap_or(T_U8);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
    }
}
