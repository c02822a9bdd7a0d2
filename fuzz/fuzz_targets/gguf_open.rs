//! The GGUF reader on arbitrary bytes: open (header, metadata, tensor
//! table, bounds), then read the config and dequantize the first tensor.
//! Any outcome but a panic, a hang or an allocation the file cannot back is fine.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

fn scratch() -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    dir.join(format!("parity-fuzz-{}.gguf", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(f) = gguf::GgufFile::open(&path) {
        let _ = gguf::Qwen2Config::from_gguf(&f);
        if let Some(info) = f.tensors().first() {
            let _ = f.dequantize(&info.name);
        }
    }
});
