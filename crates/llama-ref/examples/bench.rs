//! Wall time and peak memory of a llama.cpp run with full capture vs none.
//!
//!     cargo run --release -p llama-ref --example bench -- [capture|capture-fa|nocapture] [MODEL] [N_PROMPT] [N_DECODE]
//!
//! One mode per process so the peak RSS (VmHWM) belongs to that mode alone.
//! PARITY_LLAMA_NODES=1 also lists every graph node the callback sees.

use llama_ref::{LlamaRef, RefOptions};
use std::path::PathBuf;
use std::time::Instant;

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (capture, flash_attn) = match args.get(1).map(String::as_str) {
        None | Some("capture") => (true, false),
        Some("capture-fa") => (true, true),
        Some("nocapture") => (false, false),
        Some(other) => return Err(format!("mode {other:?}: expected capture, capture-fa or nocapture").into()),
    };
    let model = match args.get(2) {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("QWEN2_PARITY_CACHE").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/qwen2-parity")
            });
            cache.join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
        }
    };
    let n_prompt: usize = args.get(3).map_or(Ok(32), |s| s.parse())?;
    let n_decode: usize = args.get(4).map_or(Ok(16), |s| s.parse())?;

    let t0 = Instant::now();
    let llama = LlamaRef::load(&model)?;
    let load_s = t0.elapsed().as_secs_f64();
    // a prompt of exactly n_prompt tokens: repeat a sentence, keep the first n_prompt tokens
    let text = "The quick brown fox jumps over the lazy dog while the GPU computes. ".repeat(n_prompt);
    let tokens: Vec<i32> = llama.tokenize(&text, false)?.into_iter().take(n_prompt).collect();
    let opts = RefOptions { capture, flash_attn, ..RefOptions::default() };
    let t1 = Instant::now();
    let cap = llama.run(&tokens, n_decode, &opts)?;
    let run_s = t1.elapsed().as_secs_f64();
    let values: usize = cap.tensors.values().map(|t| t.tensor.len()).sum();
    println!(
        "mode={} threads={} prompt={} decode={} load_s={load_s:.2} run_s={run_s:.2} stages={} captured_mib={:.1} peak_rss_mib={:.0} generated={:?}",
        args.get(1).map_or("capture", String::as_str),
        opts.threads,
        tokens.len(),
        n_decode,
        cap.tensors.len(),
        values as f64 * 4.0 / (1024.0 * 1024.0),
        peak_rss_mib().unwrap_or(f64::NAN),
        cap.generated,
    );
    Ok(())
}
