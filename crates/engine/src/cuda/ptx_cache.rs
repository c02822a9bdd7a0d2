//! Compiled kernels kept on disk between processes.
//!
//! NVRTC compiles `kernels/quant.cu` (every weight type's dequantization,
//! GEMV and lookup) in seconds, which every process would otherwise pay
//! before loading a model. The PTX is stored under
//! `$QWEN2_PARITY_CACHE/kernels` (default `~/.cache/qwen2-parity/kernels`),
//! named by the SHA-256 of the file's name, source and compile options, so
//! a changed kernel or option is compiled afresh. The cache only saves
//! time: when it cannot be read or written, the kernel is compiled as if it
//! were absent.

use cudarc::nvrtc::{CompileOptions, Ptx};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

fn cache_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("QWEN2_PARITY_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache").join("qwen2-parity"),
    };
    Some(base.join("kernels"))
}

/// The PTX of `src` (the file `name`), from the cache or compiled.
pub(super) fn compile(name: &str, src: &str, opts: CompileOptions) -> Result<Ptx, String> {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(src.as_bytes());
    h.update([0]);
    h.update(format!("{opts:?}").as_bytes());
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let path = cache_dir().map(|d| d.join(format!("{}-{key}.ptx", name.trim_end_matches(".cu"))));
    if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        if text.contains(".entry") {
            return Ok(Ptx::from_src(text));
        }
    }
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| format!("NVRTC failed to compile kernels/{name}: {e:?}"))?;
    if let Some(path) = path {
        store(&path, &ptx.to_src());
    }
    Ok(ptx)
}

/// Write `text` to `path` through a temporary file and a rename, so that a
/// concurrent reader sees the whole file or none; failures are ignored.
fn store(path: &std::path::Path, text: &str) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(".{}.{}", std::process::id(), path.file_name().and_then(|n| n.to_str()).unwrap_or("ptx")));
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}
