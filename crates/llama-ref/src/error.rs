//! Errors as values, one line each.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    #[error("llama.cpp backend initialisation failed: {0}")]
    Backend(String),
    #[error("model file not found: {0}")]
    NotFound(PathBuf),
    #[error("{path}: {msg}")]
    Load { path: PathBuf, msg: String },
    #[error("llama.cpp could not create a context: {0}")]
    Context(String),
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("prompt of {n_prompt} tokens + {n_decode} decode steps exceeds the model's context of {n_ctx_train}")]
    ContextTooLong { n_prompt: usize, n_decode: usize, n_ctx_train: usize },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("llama_decode failed at step {step} with code {code}")]
    Decode { step: usize, code: i32 },
    #[error("capture: {0}")]
    Capture(String),
    #[error("ggml type {ty} is not supported for {what}")]
    UnsupportedType { ty: String, what: &'static str },
    #[error("{ty}: {msg}")]
    BadLength { ty: String, msg: String },
    #[error("quantization failed: {0}")]
    Quantize(String),
}
