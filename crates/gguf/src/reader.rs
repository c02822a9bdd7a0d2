//! GGUF v2/v3 reader over a memory map. Every count and length read from the
//! file is checked against the bytes that remain before anything is
//! allocated, so a corrupt or hostile file yields an error, never a huge
//! allocation or a panic.

use crate::error::{GgufError, Section};
use crate::types::GgmlType;
use memmap2::Mmap;
use std::sync::Arc;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub(crate) const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub(crate) const DEFAULT_ALIGNMENT: usize = 32;
/// Arrays nested deeper than this are rejected (a recursion bound, not a
/// format limit: real files nest at most one level).
pub(crate) const MAX_NESTING: usize = 32;

// GGUF metadata value type ids (ggml/include/gguf.h).
pub(crate) const T_U8: u32 = 0;
pub(crate) const T_I8: u32 = 1;
pub(crate) const T_U16: u32 = 2;
pub(crate) const T_I16: u32 = 3;
pub(crate) const T_U32: u32 = 4;
pub(crate) const T_I32: u32 = 5;
pub(crate) const T_F32: u32 = 6;
pub(crate) const T_BOOL: u32 = 7;
pub(crate) const T_STRING: u32 = 8;
pub(crate) const T_ARRAY: u32 = 9;
pub(crate) const T_U64: u32 = 10;
pub(crate) const T_I64: u32 = 11;
pub(crate) const T_F64: u32 = 12;

/// One metadata value. Arrays may nest (each element of an array of arrays
/// carries its own element type, as gguf-py writes them).
#[derive(Clone, Debug, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetadataValue>),
}

impl MetadataValue {
    /// The GGUF value type id of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            MetadataValue::U8(_) => T_U8,
            MetadataValue::I8(_) => T_I8,
            MetadataValue::U16(_) => T_U16,
            MetadataValue::I16(_) => T_I16,
            MetadataValue::U32(_) => T_U32,
            MetadataValue::I32(_) => T_I32,
            MetadataValue::U64(_) => T_U64,
            MetadataValue::I64(_) => T_I64,
            MetadataValue::F32(_) => T_F32,
            MetadataValue::F64(_) => T_F64,
            MetadataValue::Bool(_) => T_BOOL,
            MetadataValue::String(_) => T_STRING,
            MetadataValue::Array(_) => T_ARRAY,
        }
    }

    /// Short type name as gguf.cpp prints it: "u32", "f32", "str",
    /// "arr[str]" (the element type of the first element; "arr[]" if empty).
    pub fn type_name(&self) -> String {
        match self {
            MetadataValue::Array(items) => match items.first() {
                Some(first) => format!("arr[{}]", first.type_name()),
                None => "arr[]".to_string(),
            },
            other => scalar_type_name(other.type_id()).to_string(),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any non-negative integer, widened.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any float or integer, as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v.into()),
            MetadataValue::F64(v) => Some(v),
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v as f64),
            MetadataValue::I8(v) => Some(v.into()),
            MetadataValue::I16(v) => Some(v.into()),
            MetadataValue::I32(v) => Some(v.into()),
            MetadataValue::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// One short line: scalars as themselves, strings quoted and cut at 60
    /// characters, arrays as `[N x type] [first, few, items, ...]`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        self.write_summary(&mut out, true);
        out
    }

    fn write_summary(&self, out: &mut String, top: bool) {
        match self {
            MetadataValue::String(s) => {
                let cut: String = s.chars().take(60).collect();
                let _ = write!(out, "{cut:?}");
                if cut.len() < s.len() {
                    let _ = write!(out, "... ({} bytes)", s.len());
                }
            }
            MetadataValue::Array(items) => {
                let elem = items
                    .first()
                    .map(|v| v.type_name())
                    .unwrap_or_else(|| "?".into());
                let _ = write!(out, "[{} x {}]", items.len(), elem);
                if top && !items.is_empty() {
                    out.push_str(" [");
                    for (i, item) in items.iter().take(4).enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        item.write_summary(out, false);
                    }
                    if items.len() > 4 {
                        out.push_str(", ...");
                    }
                    out.push(']');
                }
            }
            MetadataValue::U8(v) => {
                let _ = write!(out, "{v}");
            }
            MetadataValue::I8(v) => {
                let _ = write!(out, "{v}");
            }
            MetadataValue::U16(v) => {
                let _ = write!(out, "{v}");
            }
            MetadataValue::I16(v) => {
                let _ = write!(out, "{v}");
            }
            MetadataValue::U32(v) => {
                let _ = write!(out, "{v}");
            }
            MetadataValue::I32(v) => {
                let _ = write!(out, "{v}");
            }
            MetadataValue::U64(v) => {
                let _ = write!(out, "{v}");
            }
            MetadataValue::I64(v) => {
                let _ = write!(out, "{v}");
            }
            MetadataValue::F32(v) => {
                let _ = write!(out, "{v:e}");
            }
            MetadataValue::F64(v) => {
                let _ = write!(out, "{v:e}");
            }
            MetadataValue::Bool(v) => {
                let _ = write!(out, "{v}");
            }
        }
    }
}

pub(crate) fn scalar_type_name(type_id: u32) -> &'static str {
    match type_id {
        T_U8 => "u8",
        T_I8 => "i8",
        T_U16 => "u16",
        T_I16 => "i16",
        T_U32 => "u32",
        T_I32 => "i32",
        T_F32 => "f32",
        T_BOOL => "bool",
        T_STRING => "str",
        T_ARRAY => "arr",
        T_U64 => "u64",
        T_I64 => "i64",
        T_F64 => "f64",
        _ => "invalid",
    }
}

/// Fixed byte size of a scalar value type; None for string/array/invalid.
fn scalar_size(type_id: u32) -> Option<usize> {
    match type_id {
        T_U8 | T_I8 | T_BOOL => Some(1),
        T_U16 | T_I16 => Some(2),
        T_U32 | T_I32 | T_F32 => Some(4),
        T_U64 | T_I64 | T_F64 => Some(8),
        _ => None,
    }
}

/// The fewest bytes one value of this type can occupy in a file.
fn min_value_size(type_id: u32) -> Option<usize> {
    match type_id {
        T_STRING => Some(8),
        T_ARRAY => Some(4 + 8),
        t => scalar_size(t),
    }
}

/// One tensor descriptor.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: ne0 (innermost, the row length) first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute file offset of the data.
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

/// A range of a GGUF's memory map that keeps the map alive.
#[derive(Clone)]
pub struct MappedBytes {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl std::ops::Deref for MappedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

/// An opened, fully validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    file_size: u64,
    version: u32,
    alignment: usize,
    data_offset: u64,
    metadata: Vec<(String, MetadataValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    section: Section,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                section: self.section,
                what: what(),
                offset: self.pos as u64,
                needed: n as u64,
                available: self.remaining() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed UTF-8 string; the length is checked against the
    /// remaining bytes before anything is copied.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len_what = || format!("length of {}", what());
        let len = self.u64(&len_what)?;
        let start = self.pos as u64;
        if len > self.remaining() as u64 {
            return Err(GgufError::StringTooLong {
                path: self.path.to_path_buf(),
                what: what(),
                offset: start - 8,
                len,
                available: self.remaining() as u64,
            });
        }
        let bytes = self.take(len as usize, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 {
                path: self.path.to_path_buf(),
                what: what(),
                offset: start,
            }),
        }
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<MetadataValue, GgufError> {
        let what = || format!("value of key '{key}'");
        let v = match type_id {
            T_U8 => MetadataValue::U8(self.array::<1>(&what)?[0]),
            T_I8 => MetadataValue::I8(self.array::<1>(&what)?[0] as i8),
            T_U16 => MetadataValue::U16(u16::from_le_bytes(self.array(&what)?)),
            T_I16 => MetadataValue::I16(i16::from_le_bytes(self.array(&what)?)),
            T_U32 => MetadataValue::U32(u32::from_le_bytes(self.array(&what)?)),
            T_I32 => MetadataValue::I32(i32::from_le_bytes(self.array(&what)?)),
            T_F32 => MetadataValue::F32(f32::from_le_bytes(self.array(&what)?)),
            // ggml reads an int8 and takes != 0 as true.
            T_BOOL => MetadataValue::Bool(self.array::<1>(&what)?[0] != 0),
            T_U64 => MetadataValue::U64(u64::from_le_bytes(self.array(&what)?)),
            T_I64 => MetadataValue::I64(i64::from_le_bytes(self.array(&what)?)),
            T_F64 => MetadataValue::F64(f64::from_le_bytes(self.array(&what)?)),
            T_STRING => MetadataValue::String(self.string(&what)?),
            T_ARRAY => {
                if depth >= MAX_NESTING {
                    return Err(GgufError::NestingTooDeep {
                        path: self.path.to_path_buf(),
                        key: key.to_string(),
                        max_depth: MAX_NESTING,
                    });
                }
                let type_offset = self.pos as u64;
                let elem = self.u32(&|| format!("array element type of key '{key}'"))?;
                let Some(min) = min_value_size(elem) else {
                    return Err(GgufError::InvalidValueType {
                        path: self.path.to_path_buf(),
                        key: key.to_string(),
                        type_id: elem,
                        offset: type_offset,
                    });
                };
                let count_offset = self.pos as u64;
                let count = self.u64(&|| format!("array length of key '{key}'"))?;
                let available = self.remaining() as u64;
                if (count as u128) * (min as u128) > available as u128 {
                    return Err(GgufError::ArrayTooLong {
                        path: self.path.to_path_buf(),
                        key: key.to_string(),
                        offset: count_offset,
                        count,
                        available,
                        min_item_bytes: min as u64,
                    });
                }
                // Bounded by the check above: count <= remaining / min.
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                MetadataValue::Array(items)
            }
            other => {
                return Err(GgufError::InvalidValueType {
                    path: self.path.to_path_buf(),
                    key: key.to_string(),
                    type_id: other,
                    offset: self.pos as u64 - 4,
                })
            }
        };
        Ok(v)
    }
}

fn pad_to(x: u64, align: u64) -> Option<u64> {
    let rem = x % align;
    if rem == 0 {
        Some(x)
    } else {
        x.checked_add(align - rem)
    }
}

impl GgufFile {
    /// Open, map and validate a GGUF file (header, metadata, tensor infos,
    /// and the bounds and alignment of every tensor's data).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(GgufError::NotFound { path })
            }
            Err(err) => {
                return Err(GgufError::Io {
                    path,
                    op: "cannot stat",
                    err,
                })
            }
        };
        if meta.is_dir() {
            return Err(GgufError::IsDirectory { path });
        }
        let file = std::fs::File::open(&path).map_err(|err| GgufError::Io {
            path: path.clone(),
            op: "cannot open",
            err,
        })?;
        // SAFETY: the map is read-only; like every mmap-based model loader
        // (llama.cpp included) we rely on the file not being truncated or
        // rewritten by another process while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|err| GgufError::Io {
            path: path.clone(),
            op: "cannot mmap",
            err,
        })?;
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<GgufFile, GgufError> {
        let buf: &[u8] = &mmap;
        let file_size = buf.len() as u64;
        let mut c = Cursor {
            buf,
            pos: 0,
            path: &path,
            section: Section::Header,
        };

        let magic: [u8; 4] = c.array(&|| "magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                path: path.clone(),
                found: magic,
            });
        }
        let version = c.u32(&|| "version".into())?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion {
                path: path.clone(),
                version,
            });
        }
        let n_tensors = c.u64(&|| "tensor count".into())?;
        let n_kv = c.u64(&|| "metadata count".into())?;

        // ---- metadata
        c.section = Section::Metadata;
        const MIN_KV_BYTES: u64 = 8 + 4 + 1;
        // A count no file could hold (over a pebibyte of entries) is refused
        // at once; a plausible one that the file is too short for is
        // reported where the entries run out (a truncated file).
        const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
        for (what, count, min_bytes) in [("metadata", n_kv, MIN_KV_BYTES), ("tensor", n_tensors, MIN_TENSOR_INFO_BYTES)] {
            if count.checked_mul(min_bytes).is_none_or(|b| b > 1 << 50) {
                return Err(GgufError::CountTooLarge { path: path.clone(), what, count, min_bytes, file_size });
            }
        }
        let cap = n_kv.min(c.remaining() as u64 / MIN_KV_BYTES) as usize;
        let mut metadata: Vec<(String, MetadataValue)> = Vec::with_capacity(cap);
        let mut key_index: HashMap<String, usize> = HashMap::with_capacity(cap);
        for i in 0..n_kv {
            let key = c.string(&|| format!("key of metadata entry {i} of {n_kv}"))?;
            if key.is_empty() {
                return Err(GgufError::EmptyKey {
                    path: path.clone(),
                    index: i,
                });
            }
            if key_index.contains_key(&key) {
                return Err(GgufError::DuplicateKey {
                    path: path.clone(),
                    key,
                });
            }
            let type_id = c.u32(&|| format!("value type of key '{key}'"))?;
            let value = c.value(type_id, &key, 0)?;
            key_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let alignment = match key_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(MetadataValue::U32(a)) => {
                if *a == 0 || !a.is_power_of_two() {
                    return Err(GgufError::BadAlignment {
                        path: path.clone(),
                        reason: format!("{a} is not a power of two"),
                    });
                }
                *a as usize
            }
            Some(other) => {
                return Err(GgufError::BadAlignment {
                    path: path.clone(),
                    reason: format!("must be of type u32, found {}", other.type_name()),
                })
            }
        };

        // ---- tensor infos
        c.section = Section::TensorInfo;
        let cap = n_tensors.min(c.remaining() as u64 / MIN_TENSOR_INFO_BYTES) as usize;
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(cap);
        let mut tensor_index: HashMap<String, usize> = HashMap::with_capacity(cap);
        let mut rel_offsets: Vec<u64> = Vec::with_capacity(cap);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("name of tensor {i} of {n_tensors}"))?;
            if tensor_index.contains_key(&name) {
                return Err(GgufError::DuplicateTensor {
                    path: path.clone(),
                    name,
                });
            }
            let n_dims = c.u32(&|| format!("dimension count of tensor '{name}'"))?;
            if n_dims > 4 {
                return Err(GgufError::TooManyDims {
                    path: path.clone(),
                    tensor: name,
                    n_dims,
                });
            }
            if n_dims == 0 {
                return Err(GgufError::NoDims {
                    path: path.clone(),
                    tensor: name,
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(c.u64(&|| format!("dimension {d} of tensor '{name}'"))?);
            }
            if let Some(index) = dims.iter().position(|&d| d == 0) {
                return Err(GgufError::ZeroDim {
                    path: path.clone(),
                    tensor: name,
                    index,
                    dims,
                });
            }
            // ggml stores ne as int64: the product must stay <= i64::MAX.
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64);
            let Some(n_elements) = n_elements else {
                return Err(GgufError::ElementCountOverflow {
                    path: path.clone(),
                    tensor: name,
                    dims,
                });
            };
            let type_id = c.u32(&|| format!("type of tensor '{name}'"))?;
            let ggml_type = GgmlType::from_id(type_id);
            let (Some(bs), Some(ts)) = (ggml_type.block_size(), ggml_type.type_size()) else {
                return Err(GgufError::UnknownTensorType {
                    path: path.clone(),
                    tensor: name,
                    type_id,
                });
            };
            if dims[0] % bs as u64 != 0 {
                return Err(GgufError::RowNotBlockMultiple {
                    path: path.clone(),
                    tensor: name,
                    ty: ggml_type,
                    ne0: dims[0],
                    block_size: bs,
                });
            }
            let Some(n_bytes) = (n_elements / bs as u64).checked_mul(ts as u64) else {
                return Err(GgufError::ElementCountOverflow {
                    path: path.clone(),
                    tensor: name,
                    dims,
                });
            };
            let rel = c.u64(&|| format!("data offset of tensor '{name}'"))?;
            tensor_index.insert(name.clone(), tensors.len());
            rel_offsets.push(rel);
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset: 0,
                n_elements,
                n_bytes,
            });
        }

        // ---- data section: starts at the next multiple of the alignment.
        let align = alignment as u64;
        let data_offset = pad_to(c.pos as u64, align).unwrap_or(u64::MAX);
        // The size a dense layout (gguf.cpp's: each tensor padded to the
        // alignment) needs. A tensor that ends past the file but inside this
        // layout means the file was cut short; one that ends outside it has a
        // bad offset.
        let layout_len = tensors
            .iter()
            .try_fold(0u64, |acc, t| {
                pad_to(t.n_bytes, align).and_then(|p| acc.checked_add(p))
            })
            .unwrap_or(u64::MAX);
        let data_len = file_size.saturating_sub(data_offset);
        for (t, &rel) in tensors.iter_mut().zip(&rel_offsets) {
            if rel % align != 0 {
                return Err(GgufError::Misaligned {
                    path: path.clone(),
                    tensor: t.name.clone(),
                    offset: rel,
                    alignment,
                });
            }
            let end_rel = rel.checked_add(t.n_bytes);
            let abs_end = end_rel.and_then(|e| e.checked_add(data_offset));
            match abs_end {
                Some(end) if end <= file_size => {}
                Some(end) if end_rel.is_some_and(|e| e <= layout_len) => {
                    let available = file_size.saturating_sub(data_offset.saturating_add(rel));
                    return Err(GgufError::Truncated {
                        path: path.clone(),
                        section: Section::Data,
                        what: format!("data of tensor '{}' ends at {end}", t.name),
                        offset: data_offset.saturating_add(rel),
                        needed: t.n_bytes,
                        available,
                    });
                }
                _ => {
                    return Err(GgufError::DataOutOfBounds {
                        path: path.clone(),
                        tensor: t.name.clone(),
                        offset: rel,
                        n_bytes: t.n_bytes,
                        data_len,
                        file_size,
                    })
                }
            }
            t.offset = data_offset + rel;
        }
        // No two tensors share bytes (gguf.cpp itself requires each tensor
        // to start where the previous one's padded data ends).
        let mut spans: Vec<(u64, u64, &str)> = tensors.iter().filter(|t| t.n_bytes > 0).map(|t| (t.offset, t.offset + t.n_bytes, t.name.as_str())).collect();
        spans.sort_unstable();
        if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(GgufError::Overlap {
                path: path.clone(),
                first: w[0].2.to_string(),
                second: w[1].2.to_string(),
                first_end: w[0].1 - data_offset,
                second_start: w[1].0 - data_offset,
            });
        }

        Ok(GgufFile {
            path,
            mmap: Arc::new(mmap),
            file_size,
            version,
            alignment,
            data_offset,
            metadata,
            key_index,
            tensors,
            tensor_index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// `general.alignment`, or 32.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Absolute file offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All key/value pairs, in file order.
    pub fn metadata(&self) -> &[(String, MetadataValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetadataValue::as_str)
    }

    /// Any integer type, if non-negative.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(MetadataValue::as_u64)
    }

    /// Any float or integer type.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(MetadataValue::as_f64)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's bytes, straight from the map (bounds were checked at open).
    ///
    /// `info` must come from this file; one from elsewhere whose range lies
    /// outside this file yields an empty slice.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = usize::try_from(info.offset).ok();
        let end = start.and_then(|s| s.checked_add(usize::try_from(info.n_bytes).ok()?));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.mmap.len() => &self.mmap[s..e],
            _ => &[],
        }
    }

    /// The tensor's bytes as a handle that keeps the map alive (an engine
    /// that keeps weights in their GGUF encoding holds these, not copies).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> MappedBytes {
        let data = self.tensor_data(info);
        // `data` is a subslice of the map (or empty): its offset is in range.
        let start = if data.is_empty() { 0 } else { data.as_ptr() as usize - self.mmap.as_ptr() as usize };
        MappedBytes { map: Arc::clone(&self.mmap), start, len: data.len() }
    }

    /// Dequantize a whole tensor to f32 (see [`crate::dequant`]).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self.tensor(name).ok_or_else(|| GgufError::TensorNotFound {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        let n = usize::try_from(info.n_elements).map_err(|_| GgufError::ElementCountOverflow {
            path: self.path.clone(),
            tensor: name.to_string(),
            dims: info.dims.clone(),
        })?;
        crate::dequant::dequantize_named(name, info.ggml_type, self.tensor_data(info), n)
    }

    pub fn file_size(&self) -> u64 {
        self.file_size
    }
}
