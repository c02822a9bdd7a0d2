//! `parity variant --type T`: a variant of the model (F32 copy or a llama.cpp
//! quantization of it), made once and cached beside the model; prints its path last.

use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model (default: the cached reference model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// f32, f16, q8_0, q6_k, q5_k_m, q5_0 or q4_0.
    #[arg(long = "type")]
    pub ty: String,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let model = crate::model_path::resolve(args.model.as_deref())?;
    let path = crate::variants::variant(&model, &args.ty)?;
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}
