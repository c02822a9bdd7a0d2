//! Where the model comes from when `--model` is omitted: the copy that
//! `scripts/fetch-model` caches and verifies.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

pub const DEFAULT_MODEL_FILE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// The cache directory shared with `scripts/fetch-model`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("QWEN2_PARITY_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("qwen2-parity")
}

/// The cached reference model, if `scripts/fetch-model` has verified it.
pub fn default_model() -> Option<PathBuf> {
    let path = cache_dir().join(DEFAULT_MODEL_FILE);
    let stamp = cache_dir().join(format!("{DEFAULT_MODEL_FILE}.verified"));
    (path.is_file() && stamp.is_file()).then_some(path)
}

/// `--model` if given, else the cached reference model.
pub fn resolve(model: Option<&Path>) -> Result<PathBuf> {
    match model {
        Some(path) => Ok(path.to_path_buf()),
        None => match default_model() {
            Some(path) => Ok(path),
            None => bail!(
                "no --model given and the reference model is not cached in {}: run scripts/fetch-model",
                cache_dir().display()
            ),
        },
    }
}
