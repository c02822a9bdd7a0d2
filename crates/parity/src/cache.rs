//! What is computed from a model once and reused by every later verdict:
//! llama.cpp's captures (the reference cache) and the model's sha256.
//!
//! A reference capture is decided by the model's bytes, the prompt's text
//! and template, the decode steps, the layers captured, llama.cpp's options
//! (KV type, flash attention, threads) and the llama.cpp build: all of them
//! are the key, and the entry repeats its key, so a cache entry is only ever
//! the answer to the exact question asked. Entries are single checksummed
//! files (`capture::bundle`) written under a temporary name and renamed: a
//! truncated, corrupt or foreign entry is deleted and recomputed, never
//! trusted. The cache is bounded in bytes; the least recently used entries
//! go first.

use capture::files::temporary_name;
use crate::model_path::cache_dir;
use anyhow::{Context, Result};
use capture::{read_bundle, write_bundle, Capture};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Default bound on the reference cache: a few hundred full 16-step captures
/// of the 0.5B model (about 116 MB each), or thousands of one-layer ones.
pub const DEFAULT_MAX_BYTES: u64 = 4 << 30;

/// Everything that decides llama.cpp's capture.
#[derive(Clone, Debug, Serialize)]
pub struct RefKey {
    pub model_sha256: String,
    pub prompt: String,
    pub chat: bool,
    pub n_decode: usize,
    /// Layers captured (`None`: all).
    pub layers: Option<Vec<usize>>,
    /// Of those, the layers captured at `layer_out` alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_out_only: Vec<usize>,
    pub kv_type: String,
    pub flash_attn: bool,
    pub threads: usize,
    pub llama_cpp_build: String,
}

impl RefKey {
    /// The key as stored in the entry (and compared on every read).
    pub fn canonical(&self) -> String {
        // Plain data: serialization cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    fn file_name(&self) -> String {
        let digest = Sha256::digest(self.canonical().as_bytes());
        let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("{hex}.ref")
    }
}

/// The on-disk reference cache.
#[derive(Clone, Debug)]
pub struct RefCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl RefCache {
    pub fn new(dir: PathBuf, max_bytes: u64) -> RefCache {
        RefCache { dir, max_bytes }
    }

    /// `$QWEN2_PARITY_REF_CACHE` or `refs/` under the model cache, bounded by
    /// `$QWEN2_PARITY_REF_CACHE_MB` (default 4096).
    pub fn from_env() -> RefCache {
        let dir = std::env::var_os("QWEN2_PARITY_REF_CACHE").map(PathBuf::from).unwrap_or_else(|| cache_dir().join("refs"));
        let max_bytes = std::env::var("QWEN2_PARITY_REF_CACHE_MB")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map_or(DEFAULT_MAX_BYTES, |mb| mb << 20);
        RefCache::new(dir, max_bytes)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_of(&self, key: &RefKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    /// The entry for `key`, if one is stored and intact. A damaged or
    /// foreign entry is removed (with one line on stderr) and `None`
    /// returned, so the caller recomputes it.
    pub fn load(&self, key: &RefKey) -> Option<Capture> {
        let path = self.path_of(key);
        let file = fs::File::open(&path).ok()?;
        let len = file.metadata().ok()?.len();
        match read_bundle(&mut std::io::BufReader::new(file), len, &key.canonical()) {
            Ok(capture) => {
                // Mark it used: eviction goes by modification time.
                if let Ok(f) = fs::File::options().append(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some(capture)
            }
            Err(e) => {
                crate::progress::note(&format!("reference cache: {}: {e}; recomputing", path.display()));
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Store `capture` as the answer to `key` (temporary file, then rename),
    /// then evict least recently used entries down to the bound. An entry
    /// larger than the whole bound is not stored.
    pub fn store(&self, key: &RefKey, capture: &Capture) -> Result<()> {
        if bundle_size(capture) > self.max_bytes {
            return Ok(());
        }
        fs::create_dir_all(&self.dir).with_context(|| format!("cannot create the reference cache {}", self.dir.display()))?;
        let path = self.path_of(key);
        let tmp = temporary_name(&path);
        let written = fs::File::create(&tmp).and_then(|f| {
            let mut w = std::io::BufWriter::new(f);
            write_bundle(capture, &key.canonical(), &mut w)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
        }
        fs::rename(&tmp, &path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        self.evict(&path)
    }

    /// Remove the least recently used entries (never `keep`) until the
    /// cache fits its bound; leftover temporary files of dead runs go too.
    fn evict(&self, keep: &Path) -> Result<()> {
        let mut entries = Vec::new();
        for entry in fs::read_dir(&self.dir).with_context(|| format!("cannot list {}", self.dir.display()))?.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            let is_ref = path.extension().is_some_and(|e| e == "ref");
            let stale_tmp = path.extension().is_some_and(|e| e.to_string_lossy().starts_with("tmp"))
                && meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age.as_secs() > 3600);
            if stale_tmp {
                let _ = fs::remove_file(&path);
            } else if is_ref {
                entries.push((meta.modified().unwrap_or(UNIX_EPOCH), meta.len(), path));
            }
        }
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort();
        for (_, len, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            if path != keep && fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
        Ok(())
    }
}

/// The values' share of a bundle (the header and framing are small).
fn bundle_size(capture: &Capture) -> u64 {
    capture.tensors.values().map(|c| c.tensor.data.len() as u64 * 4).sum()
}

/// The cache a verb uses: the environment's, or none under `--no-cache`.
pub fn reference_cache(no_cache: bool) -> Option<RefCache> {
    (!no_cache).then(RefCache::from_env)
}

#[derive(Serialize, Deserialize, PartialEq)]
struct DigestStamp {
    path: PathBuf,
    size: u64,
    modified_ns: u128,
    sha256: String,
}

fn stamp_of(path: &Path) -> Option<(u64, u128)> {
    let meta = fs::metadata(path).ok()?;
    let modified = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?.as_nanos();
    Some((meta.len(), modified))
}

/// The model's sha256, remembered per (absolute path, size, modification
/// time) under the model cache so a verdict does not hash 500 MB each time;
/// `fresh` hashes regardless (`--no-cache`).
pub fn model_sha256(path: &Path, fresh: bool) -> Result<String> {
    let abs = fs::canonicalize(path).with_context(|| format!("cannot open {}", path.display()))?;
    let stamp_file = {
        let digest = Sha256::digest(abs.to_string_lossy().as_bytes());
        let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        cache_dir().join("digests").join(format!("{hex}.json"))
    };
    let now = stamp_of(&abs);
    if !fresh {
        let known = fs::read(&stamp_file).ok().and_then(|b| serde_json::from_slice::<DigestStamp>(&b).ok());
        if let (Some(k), Some((size, modified_ns))) = (known, now) {
            if k.path == abs && k.size == size && k.modified_ns == modified_ns && k.sha256.len() == 64 {
                return Ok(k.sha256);
            }
        }
    }
    let sha256 = crate::session::sha256_file(&abs)?;
    if let Some((size, modified_ns)) = now {
        let stamp = DigestStamp { path: abs, size, modified_ns, sha256: sha256.clone() };
        // Remembering is an optimisation: a read-only cache only costs time.
        if let (Some(dir), Ok(json)) = (stamp_file.parent(), serde_json::to_vec(&stamp)) {
            let tmp = temporary_name(&stamp_file);
            if fs::create_dir_all(dir).is_ok() && fs::write(&tmp, json).is_ok() {
                let _ = fs::rename(&tmp, &stamp_file);
            }
        }
    }
    Ok(sha256)
}

#[cfg(test)]
mod tests {
    use super::*;
    use capture::{CapturedTensor, Stage, StageId, Tensor};

    fn key(prompt: &str) -> RefKey {
        RefKey {
            model_sha256: "ab".into(),
            prompt: prompt.into(),
            chat: false,
            n_decode: 2,
            layers: Some(vec![0, 23]),
            layer_out_only: vec![23],
            kv_type: "f16".into(),
            flash_attn: false,
            threads: 2,
            llama_cpp_build: "b1".into(),
        }
    }

    fn capture(values: usize) -> Capture {
        let mut c = Capture { engine: "llama.cpp".into(), tokens: vec![1, 2, 3], generated: vec![4, 5, 6], ..Capture::default() };
        c.tensors.insert(
            StageId::global(0, Stage::Logits),
            CapturedTensor { tensor: Tensor::new(vec![1, values], (0..values).map(|i| i as f32).collect()), provenance: "x".into() },
        );
        c
    }

    #[test]
    fn a_stored_entry_answers_its_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RefCache::new(dir.path().to_path_buf(), 1 << 20);
        assert!(cache.load(&key("a")).is_none());
        cache.store(&key("a"), &capture(10)).unwrap();
        assert_eq!(cache.load(&key("a")).unwrap().generated, vec![4, 5, 6]);
        assert!(cache.load(&key("b")).is_none());
        let mut other_build = key("a");
        other_build.llama_cpp_build = "b2".into();
        assert!(cache.load(&other_build).is_none());
    }

    #[test]
    fn truncated_corrupt_or_swapped_entries_are_removed_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RefCache::new(dir.path().to_path_buf(), 1 << 20);
        let (a, b) = (key("a"), key("b"));
        cache.store(&a, &capture(10)).unwrap();
        cache.store(&b, &capture(12)).unwrap();
        let path = cache.path_of(&a);
        let bytes = fs::read(&path).unwrap();
        // truncated
        fs::write(&path, &bytes[..bytes.len() - 9]).unwrap();
        assert!(cache.load(&a).is_none());
        assert!(!path.exists(), "a damaged entry is deleted");
        // one flipped bit in the data
        let mut flipped = bytes.clone();
        let mid = flipped.len() - 12;
        flipped[mid] ^= 1;
        fs::write(&path, &flipped).unwrap();
        assert!(cache.load(&a).is_none());
        // another key's intact entry under this key's name
        fs::copy(cache.path_of(&b), &path).unwrap();
        assert!(cache.load(&a).is_none());
        assert!(cache.load(&b).is_some(), "the genuine entry is untouched");
    }

    #[test]
    fn eviction_keeps_the_most_recently_used_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        // a bound that holds two entries and not three
        let entry = capture::encode_bundle(&capture(1000), &key("a").canonical()).len() as u64;
        let cache = RefCache::new(dir.path().to_path_buf(), entry * 5 / 2);
        let old = SystemTime::now() - std::time::Duration::from_secs(100);
        cache.store(&key("a"), &capture(1000)).unwrap();
        cache.store(&key("b"), &capture(1000)).unwrap();
        for k in ["a", "b"] {
            fs::File::options().append(true).open(cache.path_of(&key(k))).unwrap().set_modified(old).unwrap();
        }
        assert!(cache.load(&key("a")).is_some(), "a is now the most recently used");
        cache.store(&key("c"), &capture(1000)).unwrap();
        assert!(cache.path_of(&key("a")).exists());
        assert!(!cache.path_of(&key("b")).exists(), "the least recently used entry goes");
        assert!(cache.path_of(&key("c")).exists());
        // an entry larger than the whole bound is not stored
        cache.store(&key("d"), &capture(10_000)).unwrap();
        assert!(!cache.path_of(&key("d")).exists());
    }
}
