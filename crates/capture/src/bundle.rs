//! A whole capture in one checksummed file: what the reference cache
//! stores. One read and one checksum instead of thousands of `.npy` files,
//! and a file that is truncated, corrupt or made for another request is
//! refused before anything is trusted.
//!
//! Layout: `MAGIC`, header length (u64 LE), header JSON, the tensors' f32
//! values (LE, in header order), CRC-32 of everything before it (u32 LE).

use crate::dump::{Capture, CaptureConfig, CapturedTensor};
use crate::stage::{Stage, StageId};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    // A header of plain data always serializes.
    let json = serde_json::to_vec(&header).unwrap_or_default();
    let n_values: usize = capture.tensors.values().map(|c| c.tensor.data.len()).sum();
    let mut out = Vec::with_capacity(MAGIC.len() + 8 + json.len() + 4 * n_values + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for c in capture.tensors.values() {
        for v in &c.tensor.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Parse a bundle, checking (in this order, before any allocation sized by
/// the file) its length, magic, checksum, header and that it answers `key`.
pub fn decode_bundle(bytes: &[u8], key: &str) -> Result<Capture, BundleError> {
    let fixed = MAGIC.len() + 8 + 4;
    if bytes.len() < fixed {
        return Err(BundleError::Truncated(format!("{} bytes, a bundle has at least {fixed}", bytes.len())));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(BundleError::Magic);
    }
    let (body, crc_bytes) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(BundleError::Checksum { stored, computed });
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&body[MAGIC.len()..MAGIC.len() + 8]);
    let header_len = u64::from_le_bytes(len8);
    let rest = &body[MAGIC.len() + 8..];
    let header_len = usize::try_from(header_len).ok().filter(|&n| n <= rest.len()).ok_or_else(|| {
        BundleError::Truncated(format!("header of {header_len} bytes in {} remaining", rest.len()))
    })?;
    let (json, data) = rest.split_at(header_len);
    let header: Header = serde_json::from_slice(json).map_err(|e| BundleError::Header(e.to_string()))?;
    if header.key != key {
        return Err(BundleError::Key { found: header.key, expected: key.to_string() });
    }
    // Every tensor's size, checked against the bytes present before any is read.
    let mut total = 0usize;
    for e in &header.stages {
        let n = e.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        total = n
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| BundleError::Header(format!("shape {:?} overflows", e.shape)))?;
    }
    if total.checked_mul(4) != Some(data.len()) {
        return Err(BundleError::Truncated(format!("{} data bytes for {total} values", data.len())));
    }
    let mut tensors = BTreeMap::new();
    let mut values = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    for e in header.stages {
        let n = e.shape.iter().product();
        let tensor = Tensor::new(e.shape, values.by_ref().take(n).collect());
        let id = StageId { step: e.step, layer: e.layer, stage: e.stage };
        if tensors.insert(id, CapturedTensor { tensor, provenance: e.provenance }).is_some() {
            return Err(BundleError::Header(format!("{id} listed twice")));
        }
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
