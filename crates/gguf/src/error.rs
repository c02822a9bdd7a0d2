//! The one error type of the crate. Every message is a single line that names
//! the file, tensor or key involved and what is wrong with it.

use crate::types::GgmlType;
use std::fmt;
use std::path::PathBuf;

/// Which part of a GGUF file a truncation was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// Magic, version, tensor count, metadata count.
    Header,
    /// Metadata key/value pairs.
    Metadata,
    /// Tensor descriptors (name, dims, type, offset).
    TensorInfo,
    /// The tensor data section.
    Data,
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Section::Header => "header",
            Section::Metadata => "metadata",
            Section::TensorInfo => "tensor infos",
            Section::Data => "tensor data",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{}: {op}: {err}", .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        err: std::io::Error,
    },

    #[error("{}: file not found", .path.display())]
    NotFound { path: PathBuf },

    #[error("{}: is a directory, not a GGUF file", .path.display())]
    IsDirectory { path: PathBuf },

    #[error("{}: bad magic {found:02x?} (expected \"GGUF\" = [47, 47, 55, 46]): not a GGUF file", .path.display())]
    BadMagic { path: PathBuf, found: [u8; 4] },

    #[error("{}: unsupported GGUF version {version} (supported: 2 and 3)", .path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },

    #[error("{}: truncated in {section} ({what}) at offset {offset}: needs {needed} bytes, {available} left", .path.display())]
    Truncated {
        path: PathBuf,
        section: Section,
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },

    #[error("{}: string length {len} of {what} at offset {offset} is beyond the end of the file ({available} bytes left)", .path.display())]
    StringTooLong {
        path: PathBuf,
        what: String,
        offset: u64,
        len: u64,
        available: u64,
    },

    #[error("{}: array length {count} of key '{key}' at offset {offset} is beyond the end of the file ({available} bytes left, items need at least {min_item_bytes} bytes each)", .path.display())]
    ArrayTooLong {
        path: PathBuf,
        key: String,
        offset: u64,
        count: u64,
        available: u64,
        min_item_bytes: u64,
    },

    #[error("{}: {what} at offset {offset} is not valid UTF-8", .path.display())]
    InvalidUtf8 {
        path: PathBuf,
        what: String,
        offset: u64,
    },

    #[error("{}: key '{key}' has invalid metadata value type {type_id} at offset {offset}", .path.display())]
    InvalidValueType {
        path: PathBuf,
        key: String,
        type_id: u32,
        offset: u64,
    },

    #[error("{}: key '{key}': arrays nested deeper than {max_depth} levels", .path.display())]
    NestingTooDeep {
        path: PathBuf,
        key: String,
        max_depth: usize,
    },

    #[error("{}: metadata key {index} is empty", .path.display())]
    EmptyKey { path: PathBuf, index: u64 },

    #[error("{}: duplicate metadata key '{key}'", .path.display())]
    DuplicateKey { path: PathBuf, key: String },

    #[error("{}: general.alignment {reason}", .path.display())]
    BadAlignment { path: PathBuf, reason: String },

    #[error("{}: duplicate tensor name '{name}'", .path.display())]
    DuplicateTensor { path: PathBuf, name: String },

    #[error("{}: tensor '{tensor}' has {n_dims} dimensions (at most 4 allowed)", .path.display())]
    TooManyDims {
        path: PathBuf,
        tensor: String,
        n_dims: u32,
    },

    #[error("{}: tensor '{tensor}' has zero dimensions", .path.display())]
    NoDims { path: PathBuf, tensor: String },

    #[error("{}: tensor '{tensor}' has dimension {index} of size 0 (dims {dims:?})", .path.display())]
    ZeroDim {
        path: PathBuf,
        tensor: String,
        index: usize,
        dims: Vec<u64>,
    },

    #[error("{}: tensor '{tensor}' element count overflows (dims {dims:?})", .path.display())]
    ElementCountOverflow {
        path: PathBuf,
        tensor: String,
        dims: Vec<u64>,
    },

    #[error("{}: tensor '{tensor}' has unknown ggml type id {type_id}", .path.display())]
    UnknownTensorType {
        path: PathBuf,
        tensor: String,
        type_id: u32,
    },

    #[error("{}: tensor '{tensor}' of type {ty} has row size {ne0}, not a multiple of the block size {block_size}", .path.display())]
    RowNotBlockMultiple {
        path: PathBuf,
        tensor: String,
        ty: GgmlType,
        ne0: u64,
        block_size: usize,
    },

    #[error("{}: tensor '{tensor}' data [{offset}, +{n_bytes}) is out of bounds: the data section is at most {data_len} bytes and the file is {file_size} bytes", .path.display())]
    DataOutOfBounds {
        path: PathBuf,
        tensor: String,
        offset: u64,
        n_bytes: u64,
        data_len: u64,
        file_size: u64,
    },

    #[error("{}: {what} count {count} cannot be right: entries of at least {min_bytes} bytes each would take over a pebibyte (the file has {file_size} bytes)", .path.display())]
    CountTooLarge {
        path: PathBuf,
        what: &'static str,
        count: u64,
        min_bytes: u64,
        file_size: u64,
    },

    #[error("{}: tensors '{first}' and '{second}' overlap: '{second}' starts at data offset {second_start}, before '{first}' ends at {first_end}", .path.display())]
    Overlap {
        path: PathBuf,
        first: String,
        second: String,
        first_end: u64,
        second_start: u64,
    },

    #[error("{}: tensor '{tensor}' data offset {offset} is not a multiple of the alignment {alignment}", .path.display())]
    Misaligned {
        path: PathBuf,
        tensor: String,
        offset: u64,
        alignment: usize,
    },

    #[error("{}: no tensor named '{name}'", .path.display())]
    TensorNotFound { path: PathBuf, name: String },

    #[error("tensor '{tensor}': cannot dequantize ggml type {ty}")]
    UnsupportedType { tensor: String, ty: GgmlType },

    #[error("tensor '{tensor}': {n_elements} elements is not a multiple of the {ty} block size {block_size}")]
    NotBlockMultiple {
        tensor: String,
        ty: GgmlType,
        n_elements: usize,
        block_size: usize,
    },

    #[error("tensor '{tensor}': {ty} data for {n_elements} elements must be {expected} bytes, got {got}")]
    DataSizeMismatch {
        tensor: String,
        ty: GgmlType,
        n_elements: usize,
        expected: usize,
        got: usize,
    },

    #[error("{}: architecture is '{arch}', expected 'qwen2'", .path.display())]
    WrongArchitecture { path: PathBuf, arch: String },

    #[error("{}: missing metadata key '{key}'", .path.display())]
    MissingKey { path: PathBuf, key: String },

    #[error("{}: metadata key '{key}' should be {expected}, found {found}", .path.display())]
    WrongKeyType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: String,
    },

    #[error("{}: invalid Qwen2 config: {reason}", .path.display())]
    BadConfig { path: PathBuf, reason: String },

    #[error("GGUF writer: {reason}")]
    Writer { reason: String },

    #[error("synthetic model spec: {reason}")]
    BadSynthSpec { reason: String },
}
