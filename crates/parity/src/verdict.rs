//! One prompt's verdict, as `run` and `gate` give it: the reference once,
//! our engine teacher-forced and free-running, both compared, the verdict's
//! comparison reported with the other's summary beside it, its drill-down
//! and the diagnosis of a divergence.

use crate::diff::{DiffReport, FreeRunningSummary};
use crate::session::{compare, resolve_thresholds, Captured, GateRequest, Pair};
use crate::thresholds::{Comparison, Thresholds};
use anyhow::Result;

/// The gates of both comparisons and which one gives the verdict.
pub struct Gates {
    pub teacher_forced: Thresholds,
    pub free_running: Thresholds,
    pub verdict: Comparison,
}

impl Gates {
    /// Both comparisons' thresholds for `req` (see `resolve_thresholds`),
    /// `verdict` the one a `--threshold X` applies to.
    pub fn resolve(req: &GateRequest, verdict: Comparison) -> Result<Gates> {
        Ok(Gates {
            teacher_forced: resolve_thresholds(req, Comparison::TeacherForced, verdict)?,
            free_running: resolve_thresholds(req, Comparison::FreeRunning, verdict)?,
            verdict,
        })
    }
}

/// Judge one prompt on `pair`. `diagnose`: name the bug behind a
/// divergence (replays our engine; costs seconds, only when it diverges).
/// A prompt whose captures would not fit whole is compared chunk by chunk
/// (`chunked`), with no drill-down or diagnosis.
pub fn judge(pair: &mut Pair, prompt: &str, chat: bool, n_decode: usize, layers: Option<Vec<usize>>, gates: &Gates, diagnose: bool) -> Result<DiffReport> {
    let (teacher_forced, free_running, reference) = match pair.capture_both_unless_chunked(prompt, chat, n_decode, layers.clone(), true)? {
        Captured::Whole(tf, fr, reference) => (tf, fr, reference),
        Captured::Chunked(tokens) => return crate::chunked::judge(pair, &tokens, prompt, chat, n_decode, layers, gates),
    };
    let tf = compare(&teacher_forced, &reference, &gates.teacher_forced, layers.as_deref());
    let fr = compare(&free_running, &reference, &gates.free_running, layers.as_deref());
    let mut report = match gates.verdict {
        Comparison::TeacherForced => {
            DiffReport { free_running: Some(FreeRunningSummary::of(&fr, free_running.config.ended_after_layer)), ..tf }
        }
        Comparison::FreeRunning => fr,
    };
    let under_test = if gates.verdict == Comparison::TeacherForced { &teacher_forced } else { &free_running };
    crate::drilldown::attach(&mut report, under_test, &reference);
    if diagnose && report.first_divergence.is_some() {
        let model = pair.open_model()?;
        let tools = crate::diagnosis::Tools { pair: Some(pair), weights: Some(&model.gguf) };
        report.diagnosis = crate::diagnosis::diagnose(tools, &reference, under_test, &report)?;
    }
    Ok(report)
}
