//! A comparison session: the model opened once, llama.cpp and our engine
//! loaded once, and both run on the same tokens for as many prompts as asked.

use crate::diff::{diff_captures, DiffReport};
use crate::ours::{BackendKind, EngineOptions, Mode, OurEngine};
use crate::thresholds::Thresholds;
use anyhow::{bail, Context, Result};
use capture::{Capture, KvType, StageId};
use gguf::{GgufFile, Qwen2Config};
use llama_ref::{LlamaRef, RefOptions};
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

/// A GGUF opened once and checked as a Qwen2 model.
pub struct ModelFile {
    pub path: PathBuf,
    pub gguf: GgufFile,
    pub cfg: Qwen2Config,
}

impl ModelFile {
    pub fn open(path: &Path) -> Result<ModelFile> {
        let gguf = GgufFile::open(path)?;
        let cfg = Qwen2Config::from_gguf(&gguf)?;
        Ok(ModelFile { path: path.to_path_buf(), gguf, cfg })
    }
}

/// The prompt plus the decode steps must fit in the model's training context.
pub fn check_context(n_prompt: usize, n_decode: usize, n_ctx_train: usize) -> Result<()> {
    if n_prompt == 0 {
        bail!("the prompt has no tokens");
    }
    if n_prompt + n_decode > n_ctx_train {
        bail!("prompt of {n_prompt} tokens + {n_decode} decode steps exceeds the model's context of {n_ctx_train}");
    }
    Ok(())
}

/// sha256 of a file, streamed; progress on stderr when it is a terminal.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let tty = std::io::stderr().is_terminal();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut done, mut last_pct) = (0u64, u64::MAX);
    loop {
        let n = file.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        if tty && total > 0 {
            let pct = done * 100 / total;
            if pct != last_pct {
                eprint!("\rsha256 {}: {pct}%", path.display());
                let _ = std::io::stderr().flush();
                last_pct = pct;
            }
        }
    }
    if tty {
        eprintln!();
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The thresholds a comparison gates on: `--threshold X` for every stage,
/// else `--thresholds FILE`, else the file `parity calibrate` wrote for this
/// model and backend under fixtures/thresholds/.
pub fn resolve_thresholds(
    threshold: Option<f64>,
    file: Option<&Path>,
    model_sha256: &str,
    backend: &str,
) -> Result<crate::thresholds::Thresholds> {
    use crate::thresholds::Thresholds;
    if let Some(x) = threshold {
        if !(x.is_finite() && x > 0.0) {
            bail!("--threshold {x}: must be a positive number");
        }
        return Ok(Thresholds::uniform(x));
    }
    if let Some(path) = file {
        return Thresholds::load(path).context("reading --thresholds");
    }
    let path = Thresholds::default_path(&crate::fixtures::fixtures_dir()?, model_sha256, backend);
    if !path.exists() {
        bail!(
            "no thresholds for this model and backend: {} does not exist (run `parity calibrate --backend {backend}`, or pass --thresholds FILE or --threshold X)",
            path.display()
        );
    }
    Thresholds::load(&path).context("reading the calibrated thresholds")
}


/// "ours-cpu" -> "cpu", "ours-cuda" -> "cuda"; other names unchanged.
pub fn backend_of(engine: &str) -> &str {
    engine.strip_prefix("ours-").unwrap_or(engine)
}

/// Everything both engines need for a series of prompts on one model.
pub struct Pair {
    pub llama: LlamaRef,
    pub ours: OurEngine,
    pub model_sha256: String,
    pub n_layer: usize,
    pub n_ctx_train: usize,
    pub kv: KvType,
    pub threads: Option<usize>,
}

impl Pair {
    pub fn load(model: &ModelFile, eo: EngineOptions, threads: Option<usize>) -> Result<Pair> {
        let backend = eo.backend;
        if threads == Some(0) {
            bail!("--threads must be at least 1");
        }
        if backend == BackendKind::Cuda {
            crate::ours::cuda_available().map_err(anyhow::Error::msg)?;
        }
        let cfg = &model.cfg;
        let model_sha256 = sha256_file(&model.path)?;
        let llama = LlamaRef::load(&model.path)?;
        let ours = OurEngine::load(&model.gguf, cfg, eo)?;
        Ok(Pair { llama, ours, model_sha256, n_layer: cfg.n_layer, n_ctx_train: cfg.n_ctx_train, kv: eo.kv, threads })
    }

    /// Both engines on one prompt: (ours, llama.cpp).
    pub fn capture(&mut self, prompt: &str, chat: bool, n_decode: usize, layers: Option<Vec<usize>>, isolate: bool) -> Result<(Capture, Capture)> {
        let tokens = self.llama.tokenize(prompt, chat)?;
        check_context(tokens.len(), n_decode, self.n_ctx_train)?;
        let mut opts = RefOptions { kv_type: self.kv.into(), layers: layers.clone(), ..RefOptions::default() };
        if let Some(t) = self.threads {
            opts.threads = t;
        }
        let mut reference = self.llama.run(&tokens, n_decode, &opts)?;
        // Our engine decodes llama.cpp's tokens, so both see the same inputs.
        let forced = &reference.generated[..n_decode];
        let mode = if isolate { Mode::Isolate(&reference) } else { Mode::Observe };
        let mut ours = self.ours.run(&tokens, n_decode, Some(forced), layers, mode)?;
        for c in [&mut ours, &mut reference] {
            c.prompt = prompt.to_string();
            c.chat = chat;
            c.model_sha256 = self.model_sha256.clone();
        }
        Ok((ours, reference))
    }
}

/// Compare with `layers` selected (global stages always kept).
pub fn compare(ours: &Capture, reference: &Capture, thresholds: &Thresholds, layers: Option<&[usize]>) -> DiffReport {
    let filter = |id: &StageId| match (layers, id.layer) {
        (Some(sel), Some(l)) => sel.contains(&l),
        _ => true,
    };
    diff_captures(ours, reference, thresholds, Some(&filter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_check() {
        assert!(check_context(7, 4, 32768).is_ok());
        assert!(check_context(0, 4, 32768).is_err());
        assert_eq!(
            check_context(10, 32760, 32768).unwrap_err().to_string(),
            "prompt of 10 tokens + 32760 decode steps exceeds the model's context of 32768"
        );
    }

    #[test]
    fn sha256_of_a_known_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
