//! Prompt sets: the files `calibrate` (and every multi-prompt verb) reads.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// One prompt of a prompt set.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub text: String,
    /// Run through the model's chat template (line prefix "chat: ").
    pub chat: bool,
}

/// Read a prompt set: one prompt per line; blank lines and comment lines
/// ("# " at the start: `#include` is a prompt) skipped; "\n" is a newline;
/// a "chat: " prefix runs the prompt through the chat template (special
/// tokens bring their own, larger activations: the noise floor must see them).
pub fn read_prompts(path: &Path) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read prompt set {}", path.display()))?;
    let prompts: Vec<Prompt> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty() && l != &"#" && !l.starts_with("# "))
        .map(|l| match l.strip_prefix("chat: ") {
            Some(text) => Prompt { text: text.replace("\\n", "\n"), chat: true },
            None => Prompt { text: l.replace("\\n", "\n"), chat: false },
        })
        .collect();
    if prompts.is_empty() {
        bail!("prompt set {} has no prompts", path.display());
    }
    Ok(prompts)
}
