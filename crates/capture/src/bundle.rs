//! A whole capture in one checksummed file: what the reference cache
//! stores. One read and one checksum instead of thousands of `.npy` files,
//! and a file that is truncated, corrupt or made for another request is
//! refused before anything is trusted.
//!
//! Layout: `MAGIC`, header length (u64 LE), header JSON, the tensors' f32
//! values (LE, in header order), CRC-32 of everything before it (u32 LE).
//! Written and read as a stream: a capture is never held twice.

use crate::dump::{Capture, CaptureConfig, CapturedTensor};
use crate::stage::{Stage, StageId};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};

const MAGIC: &[u8; 8] = b"QPBNDL01";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BundleError {
    #[error("truncated: {0}")]
    Truncated(String),
    #[error("not a capture bundle (bad magic)")]
    Magic,
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("malformed header: {0}")]
    Header(String),
    #[error("made for another request (key {found:?}, expected {expected:?})")]
    Key { found: String, expected: String },
}

#[derive(Serialize, Deserialize)]
struct Entry {
    step: usize,
    layer: Option<usize>,
    stage: Stage,
    shape: Vec<usize>,
    provenance: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    /// What the bundle answers (the cache key): a reader asking another
    /// question refuses it even when the checksum holds.
    key: String,
    engine: String,
    model_sha256: String,
    prompt: String,
    chat: bool,
    tokens: Vec<i32>,
    generated: Vec<i32>,
    config: CaptureConfig,
    stages: Vec<Entry>,
    unavailable: Vec<(usize, Option<usize>, Stage)>,
}

/// Serialize `capture` under `key`.
pub fn encode_bundle(capture: &Capture, key: &str) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = write_bundle(capture, key, &mut out);
    out
}

/// Parse a bundle held in memory (see [`read_bundle`]).
pub fn decode_bundle(bytes: &[u8], key: &str) -> Result<Capture, BundleError> {
    read_bundle(&mut std::io::Cursor::new(bytes), bytes.len() as u64, key).map_err(|e| match e {
        ReadError::Bundle(b) => b,
        ReadError::Io(e) => BundleError::Truncated(e.to_string()),
    })
}

/// A writer that keeps the CRC-32 of what passes through it.
struct Crc<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Stream `capture` under `key` into `w`: no copy of the values is made.
pub fn write_bundle(capture: &Capture, key: &str, w: &mut impl Write) -> std::io::Result<()> {
    let header = Header {
        key: key.to_string(),
        engine: capture.engine.clone(),
        model_sha256: capture.model_sha256.clone(),
        prompt: capture.prompt.clone(),
        chat: capture.chat,
        tokens: capture.tokens.clone(),
        generated: capture.generated.clone(),
        config: capture.config.clone(),
        stages: capture
            .tensors
            .iter()
            .map(|(id, c)| Entry { step: id.step, layer: id.layer, stage: id.stage, shape: c.tensor.shape.clone(), provenance: c.provenance.clone() })
            .collect(),
        unavailable: capture.unavailable.iter().map(|id| (id.step, id.layer, id.stage)).collect(),
    };
    let json = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    let mut out = Crc { inner: w, hasher: crc32fast::Hasher::new() };
    out.write_all(MAGIC)?;
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(&json)?;
    let mut chunk = Vec::with_capacity(CHUNK_VALUES * 4);
    for c in capture.tensors.values() {
        for values in c.tensor.data.chunks(CHUNK_VALUES) {
            chunk.clear();
            chunk.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            out.write_all(&chunk)?;
        }
    }
    let crc = out.hasher.clone().finalize();
    out.inner.write_all(&crc.to_le_bytes())
}

/// Values converted per write or read: bounds the scratch buffer.
const CHUNK_VALUES: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Bundle(#[from] BundleError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Read a bundle of `len` bytes from `r`, checking (before any allocation
/// sized by the file) its length, magic, header and that it answers `key`;
/// the values are read straight into their tensors and the checksum is
/// verified at the end: a capture is returned only if every byte matched.
pub fn read_bundle(r: &mut impl Read, len: u64, key: &str) -> Result<Capture, ReadError> {
    let fixed = (MAGIC.len() + 8 + 4) as u64;
    if len < fixed {
        return Err(BundleError::Truncated(format!("{len} bytes, a bundle has at least {fixed}")).into());
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut head = [0u8; 16];
    r.read_exact(&mut head)?;
    hasher.update(&head);
    if &head[..8] != MAGIC {
        return Err(BundleError::Magic.into());
    }
    let header_len = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    let rest = len - fixed;
    if header_len > rest {
        return Err(BundleError::Truncated(format!("header of {header_len} bytes in {rest} remaining")).into());
    }
    let mut json = vec![0u8; header_len as usize];
    r.read_exact(&mut json)?;
    hasher.update(&json);
    let header: Header = serde_json::from_slice(&json).map_err(|e| BundleError::Header(e.to_string()))?;
    if header.key != key {
        return Err(BundleError::Key { found: header.key, expected: key.to_string() }.into());
    }
    // Every tensor's size, checked against the bytes present before any is read.
    let mut total = 0u64;
    for e in &header.stages {
        let n = e.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        total = n
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| BundleError::Header(format!("shape {:?} overflows", e.shape)))?;
    }
    let data_len = rest - header_len;
    if total.checked_mul(4) != Some(data_len) {
        return Err(BundleError::Truncated(format!("{data_len} data bytes for {total} values")).into());
    }
    let mut tensors = BTreeMap::new();
    let mut chunk = vec![0u8; CHUNK_VALUES * 4];
    for e in header.stages {
        let n: usize = e.shape.iter().product();
        let mut data = Vec::with_capacity(n);
        while data.len() < n {
            let take = (n - data.len()).min(CHUNK_VALUES) * 4;
            r.read_exact(&mut chunk[..take])?;
            hasher.update(&chunk[..take]);
            data.extend(chunk[..take].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        }
        let id = StageId { step: e.step, layer: e.layer, stage: e.stage };
        if tensors.insert(id, CapturedTensor { tensor: Tensor::new(e.shape, data), provenance: e.provenance }).is_some() {
            return Err(BundleError::Header(format!("{id} listed twice")).into());
        }
    }
    let mut stored = [0u8; 4];
    r.read_exact(&mut stored)?;
    let (stored, computed) = (u32::from_le_bytes(stored), hasher.finalize());
    if stored != computed {
        return Err(BundleError::Checksum { stored, computed }.into());
    }
    Ok(Capture {
        engine: header.engine,
        model_sha256: header.model_sha256,
        prompt: header.prompt,
        chat: header.chat,
        tokens: header.tokens,
        generated: header.generated,
        config: header.config,
        tensors,
        unavailable: header.unavailable.into_iter().map(|(step, layer, stage)| StageId { step, layer, stage }).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Capture {
        let mut tensors = BTreeMap::new();
        tensors.insert(
            StageId::layer(0, 1, Stage::AttnNorm),
            CapturedTensor { tensor: Tensor::new(vec![2, 3], vec![1.0, -2.5, 3.0, f32::MIN_POSITIVE, 0.0, -0.0]), provenance: "p".into() },
        );
        tensors.insert(StageId::global(1, Stage::Logits), CapturedTensor { tensor: Tensor::new(vec![1, 2], vec![7.0, 8.0]), provenance: "q".into() });
        Capture {
            engine: "llama.cpp".into(),
            prompt: "hi".into(),
            tokens: vec![1, 2],
            generated: vec![3, 4],
            tensors,
            unavailable: vec![StageId::layer(0, 1, Stage::AttnProbs)],
            ..Capture::default()
        }
    }

    #[test]
    fn round_trip_is_exact() {
        let c = sample();
        let back = decode_bundle(&encode_bundle(&c, "k"), "k").unwrap();
        assert_eq!(back.tokens, c.tokens);
        assert_eq!(back.generated, c.generated);
        assert_eq!(back.unavailable, c.unavailable);
        assert_eq!(back.tensors.len(), 2);
        for (id, t) in &c.tensors {
            let b = &back.tensors[id];
            assert_eq!(b.tensor.shape, t.tensor.shape);
            assert_eq!(b.provenance, t.provenance);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&b.tensor.data), bits(&t.tensor.data));
        }
    }

    #[test]
    fn every_damage_is_refused() {
        let bytes = encode_bundle(&sample(), "k");
        assert_eq!(decode_bundle(&bytes, "other").unwrap_err(), BundleError::Key { found: "k".into(), expected: "other".into() });
        for cut in [0, 5, 20, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode_bundle(&bytes[..cut], "k").is_err(), "truncated at {cut} accepted");
        }
        // a flipped bit anywhere is caught by the checksum (or the magic)
        for pos in (0..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x10;
            assert!(decode_bundle(&bad, "k").is_err(), "flip at byte {pos} accepted");
        }
    }
}
