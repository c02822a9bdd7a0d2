//! Small pieces shared by the verbs that run engines (`capture`, `run`).

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Read, Write};
use std::path::Path;

/// `--layer N | --layers A..B` (both ends included; `A..=B` also accepted)
/// validated against the model's `n_layer`. `None` means every layer.
pub fn parse_layers(layer: Option<usize>, layers: Option<&str>, n_layer: usize) -> Result<Option<Vec<usize>>> {
    let check = |l: usize| -> Result<usize> {
        if l >= n_layer {
            bail!("layer {l} out of range: the model has {n_layer} layers (0..{})", n_layer.saturating_sub(1));
        }
        Ok(l)
    };
    match (layer, layers) {
        (Some(_), Some(_)) => bail!("give --layer or --layers, not both"),
        (Some(l), None) => Ok(Some(vec![check(l)?])),
        (None, Some(spec)) => {
            let (a, b) = spec
                .split_once("..=")
                .or_else(|| spec.split_once(".."))
                .with_context(|| format!("--layers {spec:?}: expected A..B, e.g. 0..23"))?;
            let parse = |s: &str| -> Result<usize> {
                s.trim().parse().with_context(|| format!("--layers {spec:?}: {s:?} is not a layer number"))
            };
            let (a, b) = (check(parse(a)?)?, check(parse(b)?)?);
            if a > b {
                bail!("--layers {spec:?}: the range is empty ({a} > {b})");
            }
            Ok(Some((a..=b).collect()))
        }
        (None, None) => Ok(None),
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
    let path = Thresholds::default_path(&crate::cmd::diff::fixtures_dir(), model_sha256, backend);
    if !path.exists() {
        bail!(
            "no thresholds for this model and backend: {} does not exist (run `parity calibrate --backend {backend}`, or pass --thresholds FILE or --threshold X)",
            path.display()
        );
    }
    Thresholds::load(&path).context("reading the calibrated thresholds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_selection() {
        assert_eq!(parse_layers(None, None, 24).unwrap(), None);
        assert_eq!(parse_layers(Some(3), None, 24).unwrap(), Some(vec![3]));
        assert_eq!(parse_layers(None, Some("2..4"), 24).unwrap(), Some(vec![2, 3, 4]));
        assert_eq!(parse_layers(None, Some("0..=1"), 24).unwrap(), Some(vec![0, 1]));
        assert_eq!(
            parse_layers(Some(30), None, 24).unwrap_err().to_string(),
            "layer 30 out of range: the model has 24 layers (0..23)"
        );
        assert!(parse_layers(None, Some("0..24"), 24).is_err());
        assert!(parse_layers(None, Some("5..2"), 24).is_err());
        assert!(parse_layers(None, Some("x"), 24).is_err());
        assert!(parse_layers(Some(1), Some("1..2"), 24).is_err());
    }

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
