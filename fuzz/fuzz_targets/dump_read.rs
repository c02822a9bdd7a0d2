//! The dump reader on arbitrary bytes: the input is split into a manifest
//! and one `.npy` (its first two bytes give the manifest's length), written
//! as a dump directory, and read back with `read_dump`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

fn scratch() -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    dir.join(format!("parity-fuzz-dump-{}", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (manifest, npy) = data[2..].split_at(split);
    let dir = scratch();
    let layer = dir.join("step0").join("layer00");
    if std::fs::create_dir_all(&layer).is_err() {
        return;
    }
    let _ = std::fs::write(dir.join("manifest.json"), manifest);
    let _ = std::fs::write(layer.join("attn_norm.npy"), npy);
    let _ = capture::read_dump(&dir);
});
