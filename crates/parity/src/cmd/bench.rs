//! `parity bench`: how fast our engine runs the model, with every checkpoint
//! captured and with none. Prints medians; not a test.

use crate::ours::{BackendKind, EngineOptions, Mode, NumericsArg, OurEngine};
use engine::numerics::Numerics;
use crate::session::{check_context, ModelFile};
use anyhow::{bail, Context, Result};
use crate::progress::{Milestones, Progress, Unit};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use crate::side_by_side as sbs;
use crate::verdict_bench::{self as vb, median, Case};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model (default: the cached reference model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// How our engine rounds activations (ggml numerics add the rounding kernels).
    #[arg(long, value_enum, default_value = "ggml")]
    pub numerics: NumericsArg,
    /// Prompt length in tokens (synthetic ids, deterministic).
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Decode steps after the prefill.
    #[arg(long, default_value_t = 0)]
    pub decode: usize,
    /// Which checkpoint sets to time: none (no checkpoint at all), globals
    /// (embedding, final norm and all-position logits captured), all (every
    /// stage of every layer).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none,globals,all")]
    pub checkpoints: Vec<CheckpointSet>,
    /// Timed repetitions per mode (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Time whole `parity run` verdicts instead (each a fresh process, cold
    /// and warm reference cache): a full run and `--layer 0` on `--prompt`
    /// with `--decode` (default 16) steps, and `--layer 0` on a long prompt.
    #[arg(long)]
    pub verdict: bool,
    /// The prompt of the verdict runs.
    #[arg(long, default_value = "Write a Rust function that returns the nth Fibonacci number, iteratively, with a doc comment.")]
    pub prompt: String,
    /// Words of the long prompt of the verdict runs (0: skip that case).
    #[arg(long, default_value_t = 3000)]
    pub long_words: usize,
    /// llama.cpp's timings (the JSON lines of bench/llama_cuda_bench.cpp,
    /// see scripts/llama-cuda-bench): time our engine on the same prompt
    /// lengths and decode steps, and print both side by side.
    #[arg(long, value_name = "FILE")]
    pub side_by_side: Option<PathBuf>,
    /// With --side-by-side: write the joined records here (bench.json).
    #[arg(long, value_name = "FILE", requires = "side_by_side")]
    pub json: Option<PathBuf>,
}


/// A set of checkpoints `parity bench` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckpointSet {
    None,
    Globals,
    All,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if args.tokens == 0 || args.repeat == 0 {
        bail!("--tokens and --repeat must be at least 1");
    }
    if args.verdict {
        return verdicts(args);
    }
    if let Some(path) = &args.side_by_side {
        return side_by_side(args, path);
    }
    let model_file = ModelFile::open(&crate::model_path::resolve(args.model.as_deref())?)?;
    let (model, gguf, cfg) = (&model_file.path, &model_file.gguf, &model_file.cfg);
    check_context(args.tokens, args.decode, cfg.n_ctx_train)?;
    let started = Instant::now();
    let eo = EngineOptions { numerics: args.numerics.into(), max_ctx: args.tokens + args.decode, ..EngineOptions::new(args.backend) };
    let mut engine = OurEngine::load(gguf, cfg, eo)?;
    let load_s = started.elapsed().as_secs_f64();
    let tokens = synthetic_tokens(args.tokens, cfg.n_vocab);
    println!("model {} on {}: weights loaded in {load_s:.2} s", model.display(), args.backend.name());
    if let Some(bytes) = engine.device_weight_bytes() {
        println!("weights held on the GPU: {:.1} MiB (file: {:.1} MiB)", bytes as f64 / 1048576.0, model_file.gguf.file_size() as f64 / 1048576.0);
        if let Some(phases) = engine.load_phases() {
            println!("load phases: {}", load_phases_line(&phases, bytes, load_s));
        }
    }
    println!("{}; decode steps with no checkpoint: {}", engine.matmul_arithmetic(), engine.recording_status());
    for set in &args.checkpoints {
        let (label, layers) = match set {
            CheckpointSet::None => ("no checkpoint", None),
            CheckpointSet::Globals => ("global stages only", Some(Some(vec![]))),
            CheckpointSet::All => ("all stages captured", Some(None)),
        };
        let (times, checkpoints) = match layers {
            None => (time_unobserved(&mut engine, &tokens, args.decode, args.repeat)?, 0),
            Some(layers) => time_runs(&mut engine, &tokens, args.decode, layers, args.repeat)?,
        };
        println!(
            "{label:>20}: {} tokens + {} decode steps: median {:.3} s over {} runs ({checkpoints} checkpoints)",
            args.tokens,
            args.decode,
            median(times),
            args.repeat,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The load's phases on one line, the weights' phase with its rate, then
/// what the whole load took outside them (the numerics' tables, the model
/// around the backend; the file was opened before the load's clock
/// started): `libcuda 0.01 s, cuInit 0.10 s, cuBLAS and NVRTC libraries
/// (...) 0.00 s, CUDA context 0.09 s, ..., weights
/// 0.12 s (463.0 MiB, 4.0 GB/s), the rest 0.01 s`.
fn load_phases_line(phases: &[(&str, f64)], weight_bytes: usize, total_s: f64) -> String {
    let part = |&(name, s): &(&str, f64)| match name {
        "weights" if s > 0.0 => format!("{name} {s:.3} s ({:.1} MiB, {:.1} GB/s)", weight_bytes as f64 / 1048576.0, weight_bytes as f64 / s / 1e9),
        _ => format!("{name} {s:.3} s"),
    };
    let rest = total_s - phases.iter().map(|&(_, s)| s).sum::<f64>();
    phases.iter().map(part).chain(std::iter::once(format!("the rest {:.3} s", rest.max(0.0)))).collect::<Vec<_>>().join(", ")
}

/// Token ids spread over the vocabulary; fixed, so runs are comparable (and
/// the same as bench/llama_cuda_bench.cpp feeds llama.cpp).
fn synthetic_tokens(n: usize, n_vocab: usize) -> Vec<i32> {
    (0..n).map(|i| ((i * 7919 + 13) % n_vocab) as i32).collect()
}

/// Seconds of `repeat` runs with no checkpoint at all, after one warm-up.
fn time_unobserved(engine: &mut OurEngine, tokens: &[i32], decode: usize, repeat: usize) -> Result<Vec<f64>> {
    let mut times = Vec::new();
    for i in 0..=repeat {
        let t = Instant::now();
        engine.generate_unobserved(tokens, decode)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

/// Seconds of `repeat` runs after one warm-up, and the checkpoints a run took.
fn time_runs(engine: &mut OurEngine, tokens: &[i32], decode: usize, layers: Option<Vec<usize>>, repeat: usize) -> Result<(Vec<f64>, usize)> {
    let mut times = Vec::new();
    let mut checkpoints = 0;
    for i in 0..=repeat {
        let t = Instant::now();
        let capture = engine.run(tokens, decode, None, layers.clone(), Mode::Observe)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        checkpoints = capture.tensors.len();
    }
    Ok((times, checkpoints))
}

/// `--side-by-side`: our engine on llama.cpp's prompt lengths and decode
/// steps, with no layer checkpoint and with all; one joined table.
fn side_by_side(args: &Args, llama_path: &std::path::Path) -> Result<ExitCode> {
    let llama = sbs::read_llama(llama_path)?;
    let prompts = sbs::prompt_lengths(&llama);
    let n_decode = llama[0].n_decode;
    let model_file = ModelFile::open(&crate::model_path::resolve(args.model.as_deref())?)?;
    let (gguf, cfg) = (&model_file.gguf, &model_file.cfg);
    let longest = *prompts.last().expect("parse_llama: at least one record");
    check_context(longest, n_decode, cfg.n_ctx_train)?;
    let eo = EngineOptions { numerics: args.numerics.into(), max_ctx: longest + n_decode, ..EngineOptions::new(args.backend) };
    let mut engine = OurEngine::load(gguf, cfg, eo)?;
    let total = (prompts.len() * 2 * 2 * (args.repeat + 1)) as u64;
    let mut progress = Progress::new("side by side", total, Unit::Items("runs"), Milestones::EveryTenth);
    let mut done = 0;
    let mut ours = Vec::new();
    for &p in &prompts {
        let tokens = synthetic_tokens(p, cfg.n_vocab);
        // "none": no checkpoint at all, as llama.cpp runs; "all": every stage captured.
        for (all_checkpoints, layers) in [(false, None), (true, Some(None))] {
            let timed = |engine: &mut OurEngine, decode| match &layers {
                None => time_unobserved(engine, &tokens, decode, args.repeat),
                Some(layers) => time_runs(engine, &tokens, decode, layers.clone(), args.repeat).map(|(t, _)| t),
            };
            let prefill = timed(&mut engine, 0)?;
            done += args.repeat as u64 + 1;
            progress.set(done, total, &format!("{p} tokens"));
            let whole = timed(&mut engine, n_decode)?;
            done += args.repeat as u64 + 1;
            progress.set(done, total, &format!("{p} tokens + {n_decode} steps"));
            let prefill_s = median(prefill);
            // Decode is timed as the whole run less the prefill: our engine
            // runs prompt and steps in one call.
            let decode_s = (median(whole) - prefill_s) / n_decode.max(1) as f64;
            ours.push(sbs::OurTiming { n_prompt: p, all_checkpoints, prefill_ms: prefill_s * 1e3, decode_ms_per_token: decode_s * 1e3 });
        }
    }
    progress.finish(&format!("{done} runs"));
    let records = sbs::join(&llama, &ours)?;
    println!(
        "our engine ({} backend, {} numerics) and llama.cpp ({} build), model {}: medians of {} runs, {n_decode} greedy decode steps",
        args.backend.name(),
        Numerics::from(args.numerics).name(),
        llama[0].backend,
        model_file.path.display(),
        args.repeat
    );
    println!("ratio: llama.cpp's time over ours (above 1: ours is faster); ours' decode step = (prefill + {n_decode} steps - prefill) / {n_decode}");
    println!("our checkpoints: none = no checkpoint at all (the last logits only, as llama.cpp); all = every stage of every layer");
    println!("our arithmetic: {}; decode steps with no checkpoint: {}", engine.matmul_arithmetic(), engine.recording_status());
    println!("{}", sbs::table(&records));
    if let Some(out) = &args.json {
        let json = serde_json::to_string_pretty(&records)?;
        std::fs::write(out, json + "\n").with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `--verdict`: whole runs, cold and warm; medians and peak RSS.
fn verdicts(args: &Args) -> Result<ExitCode> {
    let model = crate::model_path::resolve(args.model.as_deref())?;
    let model = std::fs::canonicalize(&model).with_context(|| format!("cannot open {}", model.display()))?;
    let exe = vb::current_exe()?;
    let decode = if args.decode == 0 { 16 } else { args.decode };
    let backend = args.backend.name();
    let mut cases = vec![
        Case { name: format!("full run, {decode} decode steps"), args: vb::run_args(&model, &args.prompt, decode, None, backend) },
        Case { name: format!("--layer 0, {decode} decode steps"), args: vb::run_args(&model, &args.prompt, decode, Some(0), backend) },
    ];
    if args.long_words > 0 {
        let prompt = vb::long_prompt(args.long_words);
        cases.push(Case { name: format!("--layer 0, {}-word prompt", args.long_words), args: vb::run_args(&model, &prompt, 0, Some(0), backend) });
    }
    // vb::measure names each run (cold runs, the cache fill, warm runs) as it starts it.
    let runs = cases.len() * (2 * args.repeat + 1);
    let mut progress = Progress::new("bench", runs as u64, Unit::Items("runs"), Milestones::EveryItem);
    let mut runs_done = 0;
    let mut results = Vec::new();
    for case in &cases {
        results.push(vb::measure(&exe, case, args.repeat, &mut |starting: &str| {
            progress.set(runs_done, runs as u64, starting);
            runs_done += 1;
        })?);
    }
    progress.finish(&format!("{runs} runs"));
    println!("parity run verdicts on {} ({backend} backend), model {}", vb::machine(), model.display());
    println!("medians of {} runs each; cold: empty caches (model hashed, llama.cpp captures); warm: reference cache filled", args.repeat);
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(["case", "cold median s", "warm median s", "peak RSS cold (max)", "peak RSS warm (max)"]);
    let mib = |s: &[vb::Sample]| format!("{} MiB", s.iter().map(|x| x.peak_rss_kib).max().unwrap_or(0) / 1024);
    for r in &results {
        let secs = |s: &[vb::Sample]| format!("{:.2}", median(s.iter().map(|x| x.seconds).collect()));
        table.add_row([r.name.clone(), secs(&r.cold), secs(&r.warm), mib(&r.cold), mib(&r.warm)]);
    }
    println!("{table}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_line_names_every_phase_in_order_and_rates_the_weights() {
        let line = load_phases_line(&[("CUDA context", 0.2104), ("kernels", 0.05), ("weights", 0.5)], 500_000_000, 0.9);
        assert_eq!(line, "CUDA context 0.210 s, kernels 0.050 s, weights 0.500 s (476.8 MiB, 1.0 GB/s), the rest 0.140 s");
        // A phase of no measurable time gets no rate (no division by zero),
        // and phases timed a little past the whole leave no negative rest.
        assert_eq!(load_phases_line(&[("weights", 0.0)], 10, 0.0), "weights 0.000 s, the rest 0.000 s");
        assert_eq!(load_phases_line(&[("kernels", 0.0106)], 10, 0.01), "kernels 0.011 s, the rest 0.000 s");
    }
}
