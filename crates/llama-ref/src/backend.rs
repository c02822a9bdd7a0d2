//! One llama.cpp backend per process, initialised on first use, logs quiet.

use crate::LlamaError;
use llama_cpp_2::llama_backend::LlamaBackend;
use std::sync::OnceLock;

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// Initialise llama.cpp once (llama-cpp-2's `LlamaBackend`), routing its logs
/// (and ggml's) to nothing unless `PARITY_LLAMA_LOG` is set, in which case
/// llama.cpp keeps its default logger on stderr.
pub(crate) fn ensure() -> Result<&'static LlamaBackend, LlamaError> {
    let result = BACKEND.get_or_init(|| {
        let mut backend = LlamaBackend::init().map_err(|e| e.to_string())?;
        if std::env::var_os("PARITY_LLAMA_LOG").is_none() {
            backend.void_logs();
        }
        Ok(backend)
    });
    result.as_ref().map_err(|e| LlamaError::Backend(e.clone()))
}
