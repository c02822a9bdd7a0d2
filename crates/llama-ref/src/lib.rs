//! llama.cpp in-process through FFI (llama-cpp-sys-2, with llama-cpp-2 for
//! backend init): every stage of the catalogue captured through the eval
//! callback and converted to the canonical layout, plus ggml's own
//! (de)quantization and llama.cpp's model quantizer. All `unsafe` of the
//! workspace lives in this crate.

mod backend;
mod error;
pub mod ggml;
mod hook;
mod llama;
mod quantize;

pub use error::LlamaError;

/// The llama.cpp build linked here: the FFI crate is pinned to this version
/// in the workspace Cargo.toml (`=0.1.161`); recorded in threshold files.
pub const LLAMA_CPP_BUILD: &str = "llama.cpp bundled with llama-cpp-sys-2 0.1.161";
pub use llama::{LlamaRef, RefRun};
pub use quantize::quantize_model;

/// Element type of llama.cpp's KV cache: the shared type, so both engines
/// are always configured from one value.
pub use capture::KvType;

/// How `LlamaRef::run` runs llama.cpp.
#[derive(Clone, Debug)]
pub struct RefOptions {
    pub kv_type: KvType,
    /// Flash attention: attention-internal stages become unavailable.
    pub flash_attn: bool,
    pub threads: usize,
    /// Layers to capture; `None` = all.
    pub layers: Option<Vec<usize>>,
    /// Of those, the layers of which only `layer_out` is captured (layers
    /// that only feed a compared one: the input of a teacher-forced layer,
    /// or of the final norm).
    pub layer_out_only: Vec<usize>,
    /// End every pass after this layer: the layers past it, the final norm
    /// and the logits are not computed (no greedy token either, so only for
    /// a prefill with no decode steps).
    pub stop_after_layer: Option<usize>,
    /// `false` runs without the eval callback at all (for timing).
    pub capture: bool,
}

/// Most threads llama.cpp gets by default. A captured run computes its
/// graph in small pieces (one per node the eval callback reads) and every
/// piece wakes every thread: on the 16-core H100 host a full run's capture
/// (19 tokens + 16 steps, all stages) took 7.1 s with 16 threads, 4.3 s with
/// 8, 3.6 s with 4 and 3.6 s with 2 (whole `parity run --no-cache`, medians
/// of 3). `--threads` overrides it.
pub const MAX_DEFAULT_THREADS: usize = 4;

/// The default thread count: the cores available, at most `MAX_DEFAULT_THREADS`.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_DEFAULT_THREADS)
}

impl Default for RefOptions {
    fn default() -> Self {
        RefOptions {
            kv_type: KvType::F16,
            flash_attn: false,
            threads: default_threads(),
            layers: None,
            layer_out_only: Vec::new(),
            stop_after_layer: None,
            capture: true,
        }
    }
}
