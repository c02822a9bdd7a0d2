//! GGUF v2/v3 reading (memory-mapped, zero-copy tensor data) and writing,
//! the typed Qwen2 config, bit-exact ggml dequantization, and a generator of
//! tiny synthetic Qwen2 models.

pub mod config;
pub mod dequant;
pub mod quant;
pub mod error;
pub mod reader;
pub mod synth;
pub mod types;
pub mod writer;

pub use config::Qwen2Config;
pub use error::{GgufError, Section};
pub use reader::{GgufFile, MappedBytes, MetadataValue, TensorInfo};
pub use types::GgmlType;
pub use writer::GgufWriter;
