//! Where the fixtures (prompt sets, calibrated thresholds) are: found next to
//! the checkout or the installed binary at run time, never at a path fixed
//! when the binary was compiled.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The fixtures directory: `$PARITY_FIXTURES` when set; else the first
/// `fixtures/` (holding `prompts/`) found walking up from the running
/// binary's directory (a checkout's `target/release/parity`), then
/// `<prefix>/share/qwen2-parity/fixtures` for an installed binary, then
/// walking up from the current directory.
pub fn fixtures_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PARITY_FIXTURES").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if !dir.is_dir() {
            bail!("PARITY_FIXTURES={} is not a directory", dir.display());
        }
        return Ok(dir);
    }
    let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
    let mut candidates = Vec::new();
    if let Some(dir) = &exe_dir {
        candidates.extend(dir.ancestors().map(|a| a.join("fixtures")));
        if let Some(prefix) = dir.parent() {
            candidates.push(prefix.join("share/qwen2-parity/fixtures"));
        }
    }
    if let Ok(cwd) = std::env::current_dir() {
        candidates.extend(cwd.ancestors().map(|a| a.join("fixtures")));
    }
    match candidates.into_iter().find(|c| c.join("prompts").is_dir()) {
        Some(dir) => Ok(dir),
        None => bail!(
            "cannot find the fixtures directory (fixtures/prompts) next to the binary or the current directory: set PARITY_FIXTURES"
        ),
    }
}
