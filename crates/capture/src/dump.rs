//! Captured checkpoints and the dump format any engine can write.
//!
//! A dump is a directory: `manifest.json` plus one `.npy` (little-endian f32,
//! C order, numpy format 1.0) per (step, layer, stage), at
//! `step{S}/layer{LL}/{stage}.npy` or `step{S}/{stage}.npy` for global stages.

use crate::stage::{Dims, Stage, StageId};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One captured checkpoint and where it came from (for llama.cpp: the ggml
/// node name, op and shape; for our engine: the backend).
#[derive(Clone, Debug)]
pub struct CapturedTensor {
    pub tensor: Tensor,
    pub provenance: String,
}

/// What a capture ran with; kept in the manifest so any two dumps can be
/// compared knowing how each was made.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CaptureConfig {
    /// KV cache element type: "f16" or "f32".
    pub kv_type: String,
    pub flash_attn: bool,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    /// Layers captured (all when the capture asked for all).
    pub layers: Vec<usize>,
    pub n_decode: usize,
    pub threads: usize,
    /// Our engine's numerics mode ("ggml" or "exact"); empty for llama.cpp
    /// and for dumps written before the field existed.
    #[serde(default)]
    pub numerics: String,
    /// "teacher-forced" when each op was fed the reference's input; empty
    /// (free-running) otherwise.
    #[serde(default)]
    pub fed: String,
    /// The pass ended after this layer (the last one asked for): the final
    /// norm and logits were not computed. None: the whole pass ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_after_layer: Option<usize>,
}

impl CaptureConfig {
    /// A configuration with the model dimensions `d`, the rest default.
    pub fn with_dims(d: Dims) -> CaptureConfig {
        CaptureConfig {
            n_layer: d.n_layer,
            n_embd: d.n_embd,
            n_head: d.n_head,
            n_head_kv: d.n_head_kv,
            head_dim: d.head_dim,
            n_ff: d.n_ff,
            n_vocab: d.n_vocab,
            ..CaptureConfig::default()
        }
    }

    pub fn dims(&self) -> Dims {
        Dims {
            n_layer: self.n_layer,
            n_embd: self.n_embd,
            n_head: self.n_head,
            n_head_kv: self.n_head_kv,
            head_dim: self.head_dim,
            n_ff: self.n_ff,
            n_vocab: self.n_vocab,
        }
    }
}

/// Everything one engine produced for one prompt: prefill (step 0) and the
/// greedy decode steps.
#[derive(Clone, Debug, Default)]
pub struct Capture {
    /// "llama.cpp", "ours-cpu" or "ours-cuda".
    pub engine: String,
    pub model_sha256: String,
    pub prompt: String,
    pub chat: bool,
    /// The prompt's tokens (fed in the prefill).
    pub tokens: Vec<i32>,
    /// Tokens chosen by greedy decode, one per step: `generated[k]` is the
    /// argmax of step k's last logits row and is the input of step k + 1.
    pub generated: Vec<i32>,
    pub config: CaptureConfig,
    pub tensors: BTreeMap<StageId, CapturedTensor>,
    /// Checkpoints that this engine cannot observe in this configuration
    /// (attention internals under flash attention): reported, never zeros.
    pub unavailable: Vec<StageId>,
}

impl Capture {
    pub fn get(&self, id: &StageId) -> Option<&Tensor> {
        self.tensors.get(id).map(|c| &c.tensor)
    }

    pub fn n_steps(&self) -> usize {
        self.tensors.keys().map(|id| id.step + 1).max().unwrap_or(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DumpError + '_ {
    move |err| DumpError::Io { path: path.to_path_buf(), err }
}

#[derive(Serialize, Deserialize)]
struct ManifestEntry {
    step: usize,
    layer: Option<usize>,
    stage: Stage,
    shape: Vec<usize>,
    file: String,
    provenance: String,
    /// The file's size and CRC-32 as written (optional for other writers;
    /// when present, a reader refuses a file that does not match them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crc32: Option<u32>,
}

#[derive(Serialize, Deserialize)]
struct StageRef {
    step: usize,
    layer: Option<usize>,
    stage: Stage,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    engine: String,
    model_sha256: String,
    prompt: String,
    chat: bool,
    tokens: Vec<i32>,
    generated: Vec<i32>,
    n_steps: usize,
    config: CaptureConfig,
    stages: Vec<ManifestEntry>,
    unavailable: Vec<StageRef>,
}

const FORMAT: &str = "qwen2-parity-capture/1";

fn relative_file(id: &StageId) -> String {
    match id.layer {
        Some(l) => format!("step{}/layer{:02}/{}.npy", id.step, l, id.stage.name()),
        None => format!("step{}/{}.npy", id.step, id.stage.name()),
    }
}

/// Make `dir` (created if missing) no longer a dump: its manifest, if any,
/// is removed. A capture calls this before it starts, so that one stopped
/// part-way (an error, SIGINT) leaves nothing a reader takes for a dump,
/// neither its own files nor the old dump they were replacing.
pub fn retire_dump(dir: &Path) -> Result<(), DumpError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let manifest_path = dir.join("manifest.json");
    match fs::remove_file(&manifest_path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DumpError::Io { path: manifest_path, err: e }),
    }
}

/// Write `capture` under `dir` (created if missing). Nothing half-written
/// is ever read as a dump: an old manifest is removed before any file is
/// written, each file is written under a temporary name and renamed, and
/// the manifest (with each file's size and CRC-32) is written last, the same
/// way.
pub fn write_dump(capture: &Capture, dir: &Path) -> Result<(), DumpError> {
    retire_dump(dir)?;
    let manifest_path = dir.join("manifest.json");
    let mut stages = Vec::with_capacity(capture.tensors.len());
    for (id, captured) in &capture.tensors {
        let file = relative_file(id);
        let path = dir.join(&file);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let bytes = npy_bytes(&captured.tensor);
        write_atomically(&path, &bytes)?;
        stages.push(ManifestEntry {
            step: id.step,
            layer: id.layer,
            stage: id.stage,
            shape: captured.tensor.shape.clone(),
            file,
            provenance: captured.provenance.clone(),
            bytes: Some(bytes.len() as u64),
            crc32: Some(crc32fast::hash(&bytes)),
        });
    }
    let manifest = Manifest {
        format: FORMAT.to_string(),
        engine: capture.engine.clone(),
        model_sha256: capture.model_sha256.clone(),
        prompt: capture.prompt.clone(),
        chat: capture.chat,
        tokens: capture.tokens.clone(),
        generated: capture.generated.clone(),
        n_steps: capture.n_steps(),
        config: capture.config.clone(),
        stages,
        unavailable: capture
            .unavailable
            .iter()
            .map(|id| StageRef { step: id.step, layer: id.layer, stage: id.stage })
            .collect(),
    };
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| DumpError::Format { path: manifest_path.clone(), msg: e.to_string() })?;
    write_atomically(&manifest_path, json.as_bytes())
}

/// `files::write_atomically`, its error naming the path.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DumpError> {
    crate::files::write_atomically(path, bytes).map_err(io_err(path))
}
/// Read a dump written by [`write_dump`] (or by any engine following the format).
pub fn read_dump(dir: &Path) -> Result<Capture, DumpError> {
    let path = dir.join("manifest.json");
    if !path.exists() && dir.is_dir() {
        return Err(DumpError::Format {
            path,
            msg: "missing: not a dump, or a capture that did not finish (the manifest is written last); capture again".into(),
        });
    }
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| DumpError::Format { path: path.clone(), msg: e.to_string() })?;
    if manifest.format != FORMAT {
        return Err(DumpError::Format { path, msg: format!("format {:?}, expected {FORMAT:?}", manifest.format) });
    }
    let mut tensors = BTreeMap::new();
    for entry in manifest.stages {
        let file = dir.join(&entry.file);
        let mut bytes = Vec::new();
        fs::File::open(&file).map_err(io_err(&file))?.read_to_end(&mut bytes).map_err(io_err(&file))?;
        let refuse = |msg: String| DumpError::Format { path: file.clone(), msg };
        if let Some(n) = entry.bytes.filter(|&n| n != bytes.len() as u64) {
            return Err(refuse(format!("{} bytes, the manifest records {n}: written by another or an interrupted capture", bytes.len())));
        }
        if let Some(crc) = entry.crc32.filter(|&c| c != crc32fast::hash(&bytes)) {
            return Err(refuse(format!("CRC-32 {:08x}, the manifest records {crc:08x}: the file changed after the capture", crc32fast::hash(&bytes))));
        }
        let tensor = parse_npy(&bytes, &file)?;
        if tensor.shape != entry.shape {
            return Err(DumpError::Format {
                path: file,
                msg: format!("shape {:?} but the manifest says {:?}", tensor.shape, entry.shape),
            });
        }
        let id = StageId { step: entry.step, layer: entry.layer, stage: entry.stage };
        tensors.insert(id, CapturedTensor { tensor, provenance: entry.provenance });
    }
    Ok(Capture {
        engine: manifest.engine,
        model_sha256: manifest.model_sha256,
        prompt: manifest.prompt,
        chat: manifest.chat,
        tokens: manifest.tokens,
        generated: manifest.generated,
        config: manifest.config,
        tensors,
        unavailable: manifest
            .unavailable
            .into_iter()
            .map(|r| StageId { step: r.step, layer: r.layer, stage: r.stage })
            .collect(),
    })
}

/// numpy format 1.0, dtype `<f4`, C order (written atomically).
pub fn write_npy(path: &Path, tensor: &Tensor) -> Result<(), DumpError> {
    write_atomically(path, &npy_bytes(tensor))
}

/// The `.npy` encoding of `tensor`: numpy format 1.0, dtype `<f4`, C order.
fn npy_bytes(tensor: &Tensor) -> Vec<u8> {
    let shape = match tensor.shape.len() {
        1 => format!("({},)", tensor.shape[0]),
        _ => format!("({})", tensor.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // magic (6) + version (2) + header length (2) + header, padded with
    // spaces and a final newline to a multiple of 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + 4 * tensor.data.len());
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in &tensor.data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes
}

/// Read a `<f4` C-order `.npy` (version 1.0 or 2.0).
pub fn read_npy(path: &Path) -> Result<Tensor, DumpError> {
    let mut bytes = Vec::new();
    fs::File::open(path).map_err(io_err(path))?.read_to_end(&mut bytes).map_err(io_err(path))?;
    parse_npy(&bytes, path)
}

/// Parse the bytes of a `.npy` read from `path` (named in errors).
fn parse_npy(bytes: &[u8], path: &Path) -> Result<Tensor, DumpError> {
    let bad = |msg: &str| DumpError::Format { path: path.to_path_buf(), msg: msg.to_string() };
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        _ => return Err(bad("unsupported .npy version")),
    };
    let header_end = header_start.checked_add(header_len).filter(|&e| e <= bytes.len()).ok_or_else(|| bad("truncated header"))?;
    let header = std::str::from_utf8(&bytes[header_start..header_end]).map_err(|_| bad("header is not UTF-8"))?;
    if !header.contains("'descr': '<f4'") || !header.contains("'fortran_order': False") {
        return Err(bad("only little-endian f32 in C order is supported"));
    }
    let shape_text = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape in header"))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("bad shape")))
        .collect::<Result<Vec<_>, _>>()?;
    let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| bad("shape overflows"))?;
    let body = &bytes[header_end..];
    if Some(body.len()) != n.checked_mul(4) {
        return Err(bad(&format!("data is {} bytes, shape {shape:?} needs {}", body.len(), n.saturating_mul(4))));
    }
    let data = body.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok(Tensor { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip_and_header_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.npy");
        let t = Tensor::new(vec![2, 3], vec![1.0, -2.5, 3.0, f32::MIN_POSITIVE, 0.0, 7.25]);
        write_npy(&path, &t).unwrap();
        let bytes = fs::read(&path).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        assert_eq!(read_npy(&path).unwrap(), t);
    }

    fn two_stage_capture(value: f32) -> Capture {
        let mut capture = Capture { engine: "test".into(), tokens: vec![1, 2], generated: vec![5], ..Default::default() };
        for (i, id) in [StageId::global(0, Stage::Embed), StageId::layer(0, 0, Stage::AttnNorm)].iter().enumerate() {
            capture.tensors.insert(*id, CapturedTensor { tensor: Tensor::new(vec![1, 2], vec![value + i as f32, 0.5]), provenance: "p".into() });
        }
        capture
    }

    #[test]
    fn a_file_changed_or_cut_after_the_capture_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_dump(&two_stage_capture(1.0), dir.path()).unwrap();
        let file = dir.path().join("step0/layer00/attn_norm.npy");
        let good = fs::read(&file).unwrap();
        fs::write(&file, &good[..good.len() - 4]).unwrap();
        let err = read_dump(dir.path()).unwrap_err().to_string();
        assert!(err.contains("the manifest records"), "{err}");
        let mut changed = good.clone();
        let last = changed.len() - 1;
        changed[last] ^= 0x40;
        fs::write(&file, &changed).unwrap();
        let err = read_dump(dir.path()).unwrap_err().to_string();
        assert!(err.contains("CRC-32"), "{err}");
    }

    #[test]
    fn an_interrupted_capture_over_an_old_dump_leaves_no_manifest() {
        let dir = tempfile::tempdir().unwrap();
        write_dump(&two_stage_capture(1.0), dir.path()).unwrap();
        assert!(read_dump(dir.path()).is_ok());
        // The second capture fails part-way: one of its files cannot be written.
        let blocker = dir.path().join("step0/layer00/attn_norm.npy");
        fs::remove_file(&blocker).unwrap();
        fs::create_dir(&blocker).unwrap();
        assert!(write_dump(&two_stage_capture(2.0), dir.path()).is_err());
        assert!(!dir.path().join("manifest.json").exists(), "the old manifest must not describe the new files");
        assert!(read_dump(dir.path()).is_err());
    }

    #[test]
    fn dump_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut capture = Capture { engine: "test".into(), tokens: vec![1, 2], generated: vec![5], ..Default::default() };
        let ids = [StageId::global(0, Stage::Embed), StageId::layer(1, 3, Stage::QRope)];
        for (i, id) in ids.iter().enumerate() {
            capture.tensors.insert(
                *id,
                CapturedTensor { tensor: Tensor::new(vec![1, 2], vec![i as f32, 0.5]), provenance: format!("p{i}") },
            );
        }
        capture.unavailable.push(StageId::layer(0, 0, Stage::AttnProbs));
        write_dump(&capture, dir.path()).unwrap();
        assert!(dir.path().join("step1/layer03/q_rope.npy").exists());
        let back = read_dump(dir.path()).unwrap();
        assert_eq!(back.tokens, capture.tokens);
        assert_eq!(back.generated, capture.generated);
        assert_eq!(back.unavailable, capture.unavailable);
        assert_eq!(back.tensors.len(), 2);
        assert_eq!(back.get(&ids[1]).unwrap().data, vec![1.0, 0.5]);
        assert_eq!(back.tensors[&ids[1]].provenance, "p1");
    }
}
