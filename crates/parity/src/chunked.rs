//! A verdict in memory that grows with what is compared: a prompt whose
//! captures would be too large to hold whole (a long prompt: the logits of
//! every position, the n² attention matrices) is run chunk by chunk on both
//! engines at once. llama.cpp prefills a chunk of the prompt, our engine runs
//! the same chunk teacher-forced on llama.cpp's tensors and free-running on
//! its own (a second copy of the engine: each side has its own KV cache),
//! the chunk's stages are compared into the running metrics
//! ([`DiffBuilder`]) and dropped; then the next chunk, then each decode step.
//! The metrics are those of the whole tensors (`metrics::Placement`), so the
//! report reads like any other.
//!
//! A comparison of some layers with no decode step goes further: every pass
//! of both engines ends after the last layer asked (llama.cpp's eval
//! callback stops its graph there), so neither the layers after it nor the
//! final norm and logits are computed or compared.
//!
//! What this costs: llama.cpp's prefill runs in ubatches of [`CHUNK_TOKENS`]
//! (its chunks are its one-pass rows bit for bit, tested: its attention reads
//! the earlier chunks' keys from its cache, as a one-pass prefill does), the
//! reference cache is not used (the captures are never whole), and there is
//! no drill-down or diagnosis (both need the whole tensors): the report says
//! so.

use crate::diff::{DiffBuilder, DiffReport, FreeRunningSummary};
use crate::metrics::Placement;
use crate::ours::Mode;
use crate::progress::{Milestones, Progress, Unit};
use crate::session::{capture_bytes, check_memory, llama_working_bytes, pass_bytes, reference_bytes, reference_layers, Pair};
use crate::thresholds::Comparison;
use crate::verdict::Gates;
use anyhow::{Context, Result};
use capture::{Capture, Dims, Stage, StageId};
use std::time::Instant;

/// The configuration entries a chunked comparison adds, which every report
/// states in its header (they change what the report holds).
pub const HEADER_NOTES: [&str; 2] = [ENDED_AFTER, COMPARED_IN_CHUNKS];
const ENDED_AFTER: &str = "ended after the layers asked";
const COMPARED_IN_CHUNKS: &str = "compared in chunks";

/// Tokens per chunk of a prefill run chunk by chunk.
pub const CHUNK_TOKENS: usize = 128;

/// Above this many bytes of captures held whole (the reference's and our
/// two), a comparison runs chunk by chunk. The default 1 GiB keeps every
/// short prompt on the whole path (with its reference cache, drill-down and
/// diagnosis); `QWEN2_PARITY_CHUNK_ABOVE_MB` moves the line.
pub const CHUNK_ABOVE_BYTES: u64 = 1 << 30;

fn chunk_above_bytes() -> u64 {
    std::env::var("QWEN2_PARITY_CHUNK_ABOVE_MB").ok().and_then(|v| v.parse::<u64>().ok()).map_or(CHUNK_ABOVE_BYTES, |mb| mb << 20)
}

/// Bytes a comparison holds when its captures are held whole: llama.cpp's
/// capture (of the layers that feed the selection) and its working buffers,
/// and our two captures.
pub fn whole_bytes(d: &Dims, n_prompt: usize, n_decode: usize, layers: Option<&[usize]>) -> u64 {
    let (feeding, out_only) = reference_layers(layers, d.n_layer);
    reference_bytes(d, n_prompt, n_decode, feeding.as_deref(), &out_only)
        + llama_working_bytes(d, n_prompt, n_prompt)
        + capture_bytes(d, n_prompt, n_decode, layers, &|_| true)
        + capture_bytes(d, n_prompt, n_decode, layers, &|s| layers.is_none() || s == Stage::Embed)
}

/// What a comparison run chunk by chunk asks of llama.cpp.
struct Plan {
    /// The layers captured, and those of them captured at `layer_out` alone.
    ref_layers: Option<Vec<usize>>,
    out_only: Vec<usize>,
    /// Every pass of both engines ends after this layer: a prefill over some
    /// layers (no decode step needs the logits) computes nothing past the
    /// last of them, so neither the final norm nor the logits are compared.
    stop_after: Option<usize>,
}

fn plan(layers: Option<&[usize]>, n_layer: usize, n_decode: usize) -> Plan {
    match layers {
        Some(sel) if n_decode == 0 && !sel.is_empty() => {
            // Each selected layer and the one before it (its input).
            let mut feeding: Vec<usize> = sel.iter().flat_map(|&l| [l.saturating_sub(1), l]).collect();
            feeding.sort_unstable();
            feeding.dedup();
            let out_only = feeding.iter().copied().filter(|l| !sel.contains(l)).collect();
            Plan { ref_layers: Some(feeding), out_only, stop_after: sel.iter().max().copied() }
        }
        _ => {
            let (ref_layers, out_only) = reference_layers(layers, n_layer);
            Plan { ref_layers, out_only, stop_after: None }
        }
    }
}

/// Bytes a comparison run chunk by chunk holds at most: one chunk's
/// captures on the three sides (the last chunk, over all the positions),
/// llama.cpp's working buffers for a chunk, and a copy of one side's
/// chunk made while comparing.
pub fn chunked_bytes(d: &Dims, n_prompt: usize, n_decode: usize, layers: Option<&[usize]>) -> u64 {
    let n_t = n_prompt.min(CHUNK_TOKENS);
    let n_kv = n_prompt + n_decode;
    let p = plan(layers, d.n_layer, n_decode);
    let full: Option<Vec<usize>> = p.ref_layers.map(|ls| ls.into_iter().filter(|l| !p.out_only.contains(l)).collect());
    let stopped = p.stop_after.is_some();
    let globals = |s: Stage| !stopped || s == Stage::Embed;
    let reference = pass_bytes(d, n_t, n_kv, full.as_deref(), &globals) + (p.out_only.len() * n_t * d.n_embd * 4) as u64;
    let teacher_forced = pass_bytes(d, n_t, n_kv, layers, &globals);
    let free_running = pass_bytes(d, n_t, n_kv, layers, &|s| layers.is_none() || s == Stage::Embed);
    reference + teacher_forced + free_running + llama_working_bytes(d, n_t, n_kv) + teacher_forced
}

/// Whether a comparison of `n_prompt` tokens, `n_decode` steps over `layers`
/// runs chunk by chunk: its captures held whole would exceed the line
/// (`CHUNK_ABOVE_BYTES`), and there is more than one chunk to run.
pub fn runs_in_chunks(d: &Dims, n_prompt: usize, n_decode: usize, layers: Option<&[usize]>) -> bool {
    n_prompt > CHUNK_TOKENS && whole_bytes(d, n_prompt, n_decode, layers) > chunk_above_bytes()
}

/// The two comparisons of one prompt run chunk by chunk: (teacher-forced,
/// free-running), and the layer the free-running passes ended after.
pub struct ChunkedComparisons {
    pub teacher_forced: DiffReport,
    pub free_running: DiffReport,
    pub free_running_ended_after: Option<usize>,
    /// Both engines' passes (and llama.cpp's) ended after this layer: no
    /// final norm or logits compared.
    pub ended_after: Option<usize>,
}

/// Judge one prompt chunk by chunk (see the module's documentation):
/// the verdict's comparison, the other's summary beside it.
pub fn judge(pair: &mut Pair, tokens: &[i32], prompt: &str, chat: bool, n_decode: usize, layers: Option<Vec<usize>>, gates: &Gates) -> Result<DiffReport> {
    let both = compare(pair, tokens, prompt, chat, n_decode, layers, gates)?;
    let mut report = match gates.verdict {
        Comparison::TeacherForced => DiffReport {
            free_running: Some(FreeRunningSummary::of(&both.free_running, both.free_running_ended_after)),
            ..both.teacher_forced
        },
        Comparison::FreeRunning => both.free_running,
    };
    let n_chunks = tokens.len().div_ceil(CHUNK_TOKENS);
    // The provenance recorded is the first chunk's node (its shapes are a chunk's).
    for row in report.rows.iter_mut().filter(|r| r.id.step == 0) {
        row.ref_provenance.push_str(&format!(" (first of {n_chunks} chunks)"));
    }
    if let Some(last) = both.ended_after {
        report.configuration.push((
            ENDED_AFTER.into(),
            format!("every pass of both engines (llama.cpp too) ended after layer {last}, the last asked for: final_norm and logits were neither computed nor compared (a long prompt's --layer comparison runs only the layers it needs; run without --layer/--layers, or with --decode, to compare them)"),
        ));
    }
    report.configuration.push((
        COMPARED_IN_CHUNKS.into(),
        format!(
            "the prefill in {n_chunks} chunks of up to {CHUNK_TOKENS} tokens, each compared and dropped (held whole, its captures would pass the memory line); no drill-down or diagnosis, which need the whole tensors"
        ),
    ));
    Ok(report)
}

/// Run both engines chunk by chunk over `tokens` and `n_decode` greedy steps,
/// comparing each pass as it comes.
pub fn compare(pair: &mut Pair, tokens: &[i32], prompt: &str, chat: bool, n_decode: usize, layers: Option<Vec<usize>>, gates: &Gates) -> Result<ChunkedComparisons> {
    let d = pair.dims();
    let n_prompt = tokens.len();
    let needed = chunked_bytes(&d, n_prompt, n_decode, layers.as_deref());
    check_memory("a comparison run chunk by chunk", needed, n_prompt, n_decode)?;
    let sel = layers.as_deref();
    let plan = plan(sel, d.n_layer, n_decode);
    let mut opts = pair.ref_options(plan.ref_layers, plan.out_only);
    opts.stop_after_layer = plan.stop_after;
    let model_sha256 = pair.model_sha256.clone();
    let (llama, teacher_forced, free_running) = pair.chunk_engines()?;
    let mut run = llama.start(n_prompt + n_decode, CHUNK_TOKENS, &opts)?;
    teacher_forced.reset()?;
    free_running.reset()?;
    // Free-running over some layers: nothing after the last of them is run.
    let free_mode = || if sel.is_some() { Mode::ObserveSelected } else { Mode::Observe };
    let ended_after = sel.and_then(|ls| ls.iter().max().copied());
    // As `session::compare`: global stages kept, except those after the
    // layers when a pass ended there.
    let filter_for = |ended: bool| {
        move |id: &StageId| match (sel, id.layer) {
            (Some(sel), Some(l)) => sel.contains(&l),
            (_, None) => !ended || id.stage == Stage::Embed,
            (None, Some(_)) => true,
        }
    };
    let (tf_filter, fr_filter) = (filter_for(plan.stop_after.is_some()), filter_for(ended_after.is_some()));
    let stops = plan.stop_after.is_some();
    let ref_config = run.config(n_decode);
    let part = |tensors| Capture { config: ref_config.clone(), tensors, ..Capture::default() };
    let (mut tf_diff, mut fr_diff) = (DiffBuilder::default(), DiffBuilder::default());
    let n_passes = n_prompt.div_ceil(CHUNK_TOKENS) + n_decode;
    let mut progress = Progress::new("chunked comparison", n_passes as u64, Unit::Items("passes"), Milestones::EveryTenth);
    let mut generated: Vec<i32> = Vec::with_capacity(n_decode + 1);
    let mut done = 0u64;
    let mut row0 = 0;
    // Where the time goes: llama.cpp, ours teacher-forced, ours free-running, the comparison.
    let mut seconds = [0f64; 4];
    let mut timed = |i: usize, t: Instant| seconds[i] += t.elapsed().as_secs_f64();
    for step in 0..=n_decode {
        // Owned: a decode step's input is the token the step before pushed.
        let passes: Vec<Vec<i32>> =
            if step == 0 { tokens.chunks(CHUNK_TOKENS).map(<[i32]>::to_vec).collect() } else { vec![vec![generated[step - 1]]] };
        for input in passes {
            let t = Instant::now();
            let picked = run.pass(&input, step).with_context(|| format!("llama.cpp, step {step}"))?;
            // A pass that ends after a layer has no greedy token: only with no decode step.
            let picked = picked.unwrap_or_default();
            let reference = part(run.take_tensors());
            timed(0, t);
            let t = Instant::now();
            let tf_mode = if stops { Mode::IsolateSelected(&reference) } else { Mode::Isolate(&reference) };
            let ours_tf = teacher_forced.pass(&input, step, sel, tf_mode)?;
            timed(1, t);
            let t = Instant::now();
            let ours_fr = free_running.pass(&input, step, sel, free_mode())?;
            timed(2, t);
            let t = Instant::now();
            let placement = (step == 0).then_some(Placement { row0, rows: n_prompt });
            let ours = |tensors| Capture { tensors, ..Capture::default() };
            tf_diff.add(&ours(ours_tf.tensors), &reference, Some(&tf_filter), placement);
            fr_diff.add(&ours(ours_fr.tensors), &reference, Some(&fr_filter), placement);
            timed(3, t);
            if step == 0 {
                row0 += input.len();
                if row0 == n_prompt && plan.stop_after.is_none() {
                    generated.push(picked);
                }
            } else {
                generated.push(picked);
            }
            done += 1;
            progress.set(done, n_passes as u64, "");
        }
    }
    progress.finish("compared");
    crate::progress::note(&format!(
        "chunked comparison: llama.cpp {:.1} s, ours teacher-forced {:.1} s, ours free-running {:.1} s, comparing {:.1} s",
        seconds[0], seconds[1], seconds[2], seconds[3]
    ));
    let unavailable = std::mem::take(&mut run.unavailable);
    drop(run);

    // The headers of the reports: what each side ran, without tensors.
    let mut reference = Capture {
        engine: "llama.cpp".into(),
        tokens: tokens.to_vec(),
        generated: generated.clone(),
        config: ref_config,
        unavailable,
        ..Capture::default()
    };
    let ours_header = |engine: &crate::ours::OurEngine, teacher: bool, ended: Option<usize>| Capture {
        engine: engine.name(),
        tokens: tokens.to_vec(),
        generated: generated.clone(),
        config: engine.capture_config(sel, n_decode, teacher, ended),
        ..Capture::default()
    };
    let mut tf_header = ours_header(teacher_forced, true, plan.stop_after);
    let mut fr_header = ours_header(free_running, false, ended_after);
    for c in [&mut reference, &mut tf_header, &mut fr_header] {
        c.prompt = prompt.to_string();
        c.chat = chat;
        c.model_sha256 = model_sha256.clone();
    }
    Ok(ChunkedComparisons {
        teacher_forced: tf_diff.finish(&tf_header, &reference, &gates.teacher_forced),
        free_running: fr_diff.finish(&fr_header, &reference, &gates.free_running),
        free_running_ended_after: ended_after,
        ended_after: plan.stop_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen05() -> Dims {
        Dims { n_layer: 24, n_embd: 896, n_head: 14, n_head_kv: 2, head_dim: 64, n_ff: 4864, n_vocab: 151_936 }
    }

    #[test]
    fn short_prompts_stay_whole_long_ones_run_in_chunks() {
        let d = qwen05();
        assert!(!runs_in_chunks(&d, 21, 16, None));
        assert!(!runs_in_chunks(&d, 21, 16, Some(&[0])));
        // The 3,000-word case: 4,079 tokens, layer 0.
        assert!(runs_in_chunks(&d, 4079, 0, Some(&[0])));
        // Held whole it needs many GiB; in chunks a few hundred MiB.
        assert!(whole_bytes(&d, 4079, 0, Some(&[0])) > 10 << 30);
        assert!(chunked_bytes(&d, 4079, 0, Some(&[0])) < 1 << 30);
    }
}
