//! The vocabulary both engines and the diff share, at the bottom of the
//! dependency graph: the stage catalogue, [`Tensor`], the KV cache type and
//! the dump format. The engine and llama.cpp's side depend on this crate and
//! not on each other.

pub mod bundle;
pub mod dump;
pub mod files;
pub mod kv;
pub mod stage;
pub mod tensor;

pub use bundle::{decode_bundle, encode_bundle, read_bundle, write_bundle, BundleError};
pub use dump::{read_dump, read_npy, retire_dump, write_dump, write_npy, Capture, CaptureConfig, CapturedTensor, DumpError};
pub use kv::KvType;
pub use stage::{causal_keys, Dims, Family, Input, Layout, Stage, StageId, StageInfo, CATALOGUE};
pub use tensor::{argmax, Tensor};
