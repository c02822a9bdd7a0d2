//! `parity bench --verdict`: how long a whole `parity run` takes and how
//! much memory it peaks at, cold (nothing cached: the model is hashed and
//! llama.cpp captures) and warm (the reference cache answers), each run a
//! fresh process as a user would start it. Prints medians; not a test.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Set in a child `parity` process: print its peak RSS on stderr at exit.
pub const PEAK_RSS_ENV: &str = "PARITY_PRINT_PEAK_RSS";
const PEAK_RSS_PREFIX: &str = "peak RSS (VmHWM): ";

/// The kernel's peak resident set of this process (`VmHWM`), in KiB.
pub fn own_peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Called by `main` after a verb when `PEAK_RSS_ENV` is set.
pub fn print_peak_rss_if_asked() {
    if std::env::var_os(PEAK_RSS_ENV).is_some() {
        if let Some(kib) = own_peak_rss_kib() {
            eprintln!("{PEAK_RSS_PREFIX}{kib} KiB");
        }
    }
}

/// One `parity run` command line to time.
pub struct Case {
    pub name: String,
    pub args: Vec<String>,
}

/// One timed run of a case.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub seconds: f64,
    pub peak_rss_kib: u64,
}

/// Run `parity <args>` as a fresh process with the caches under `cache_dir`.
fn run_once(exe: &Path, args: &[String], cache_dir: &Path) -> Result<Sample> {
    let started = Instant::now();
    let out = Command::new(exe)
        .args(args)
        .env("QWEN2_PARITY_CACHE", cache_dir)
        .env_remove("QWEN2_PARITY_REF_CACHE")
        .env(PEAK_RSS_ENV, "1")
        .output()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 0 match and 1 diverged are both verdicts; anything else is a failure of the run.
    if !matches!(out.status.code(), Some(0 | 1)) {
        let last = stderr.lines().last().unwrap_or("");
        bail!("parity {} failed ({}): {last}", args.join(" "), out.status);
    }
    let peak_rss_kib = stderr
        .lines()
        .find_map(|l| l.strip_prefix(PEAK_RSS_PREFIX))
        .and_then(|v| v.trim_end_matches(" KiB").parse().ok())
        .context("the run did not report its peak RSS (no /proc/self/status?)")?;
    Ok(Sample { seconds, peak_rss_kib })
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Cold and warm samples of one case.
pub struct CaseResult {
    pub name: String,
    pub cold: Vec<Sample>,
    pub warm: Vec<Sample>,
}

/// Time `case` `repeat` times cold (each in an empty cache) and `repeat`
/// times warm (after one untimed run that fills the cache).
pub fn measure(exe: &Path, case: &Case, repeat: usize, progress: &mut dyn FnMut(&str)) -> Result<CaseResult> {
    let mut cold = Vec::with_capacity(repeat);
    for i in 0..repeat {
        progress(&format!("{}: cold {}/{repeat}", case.name, i + 1));
        let dir = tempfile::tempdir().context("cannot create a temporary cache")?;
        cold.push(run_once(exe, &case.args, dir.path())?);
    }
    let dir = tempfile::tempdir().context("cannot create a temporary cache")?;
    progress(&format!("{}: filling the cache", case.name));
    run_once(exe, &case.args, dir.path())?;
    let mut warm = Vec::with_capacity(repeat);
    for i in 0..repeat {
        progress(&format!("{}: warm {}/{repeat}", case.name, i + 1));
        warm.push(run_once(exe, &case.args, dir.path())?);
    }
    Ok(CaseResult { name: case.name.clone(), cold, warm })
}

/// A prompt of about `words` words of varied English and code (fixed, so
/// runs are comparable).
pub fn long_prompt(words: usize) -> String {
    const TEXT: &str = "The scheduler splits the graph into pieces that run on one backend each, \
        copying tensors between them where needed. fn fibonacci(n: u64) -> u64 { let (mut a, mut b) = (0, 1); \
        for _ in 0..n { let t = a + b; a = b; b = t; } a } A cache line holds sixty-four bytes; \
        reading one value brings its neighbours along, which is why row-major loops run faster. \
        Attention compares every query with every key before it, scales, masks and normalizes. ";
    let pool: Vec<&str> = TEXT.split_whitespace().collect();
    (0..words).map(|i| pool[(i * 7 + i / pool.len()) % pool.len()]).collect::<Vec<_>>().join(" ")
}

/// What the machine is, for the figures' caption.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()))
        .map_or(String::from("?"), |kib| format!("{:.0}", kib as f64 / (1u64 << 20) as f64));
    format!("{cpu}, {cores} cores, {mem_gib} GiB")
}

/// The `run` command line of a case on `model`.
pub fn run_args(model: &Path, prompt: &str, decode: usize, layer: Option<usize>, backend: &str) -> Vec<String> {
    let mut args = vec!["run".into(), "--model".into(), model.display().to_string(), "--prompt".into(), prompt.into()];
    args.extend(["--decode".into(), decode.to_string(), "--backend".into(), backend.into()]);
    if let Some(l) = layer {
        args.extend(["--layer".into(), l.to_string()]);
    }
    args
}

/// This executable (the children are the same build as the bench).
pub fn current_exe() -> Result<PathBuf> {
    std::env::current_exe().context("cannot find the parity executable")
}
