//! One module per CLI verb. Each has `Args` (clap) and `run(&Args) -> anyhow::Result<ExitCode>`:
//! `Ok` carries the verdict's exit code (0 pass, 1 gate failed); `Err` is
//! a usage or input error, printed on one line with exit code 2.

pub mod bench;
pub mod calibrate;
pub mod capture;
pub mod diff;
pub mod faults;
pub mod gate;
pub mod generate;
pub mod inspect;
pub mod run;
pub mod selftest;
pub mod variant;
pub mod weights;

use crate::cache::reference_cache;
use crate::ours::{BackendKind, EngineOptions, Kv, NumericsArg};
use crate::session::{ModelFile, Pair};
use engine::fault::FaultSpec;
use std::path::PathBuf;

/// The model and our engine's options, as the multi-prompt verbs (`gate`,
/// `generate`) take them: ggml numerics and an f16 KV cache against
/// llama.cpp on the GGUF itself.
#[derive(clap::Args, Debug)]
pub struct EngineArgs {
    /// GGUF model (default: the cached reference model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// How our engine rounds activations (as `run`).
    #[arg(long, value_enum, default_value = "ggml")]
    pub numerics: NumericsArg,
    /// KV cache element type of both engines.
    #[arg(long, value_enum, default_value = "f16")]
    pub kv: Kv,
    /// Seed a fault into our engine (`parity faults` lists them).
    #[arg(long, default_value = "none", value_parser = FaultSpec::parse)]
    pub fault: FaultSpec,
    /// Compute llama.cpp's captures afresh (no reference cache).
    #[arg(long)]
    pub no_cache: bool,
}

impl EngineArgs {
    pub fn open_model(&self) -> anyhow::Result<ModelFile> {
        ModelFile::open(&crate::model_path::resolve(self.model.as_deref())?)
    }

    /// Both engines on `model`, with the reference cache unless `--no-cache`.
    pub fn load_pair(&self, model: &ModelFile) -> anyhow::Result<Pair> {
        let eo = EngineOptions { kv: self.kv.into(), numerics: self.numerics.into(), fault: self.fault, ..EngineOptions::new(self.backend) };
        Pair::load_with_cache(model, eo, None, reference_cache(self.no_cache))
    }
}
