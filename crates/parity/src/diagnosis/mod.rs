//! Name the bug, not only the op: at the first divergence, pattern tests on
//! the two tensors (`patterns`: scales, offsets, rotations, head maps, the
//! causal mask, the decode path, another stage's values, layouts) and a
//! what-if replay (`replay`): the stage's op run again on the reference's
//! input under each bug model of the fault catalogue that acts there,
//! compared with the engine under test's output. A bug model that
//! reproduces it is named; the patterns that hold say why.

mod patterns;
mod replay;

pub use patterns::NAMED_BY_PATTERNS;

use capture::{Capture, StageId};
use gguf::GgufFile;
use serde::Serialize;

/// Where a hypothesis comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A bug model of the fault catalogue run on the reference's input.
    Replay,
    /// A test on the tensors alone (and the model's weights).
    Pattern,
}

/// One hypothesis about the divergence, with the test and its figure.
#[derive(Clone, Debug, Serialize)]
pub struct Hypothesis {
    /// What it claims, in one line.
    pub claim: String,
    /// How it was tested.
    pub test: String,
    /// The figure the test produced (see `test`; for fits, smaller is better).
    pub figure: f64,
    pub holds: bool,
    pub kind: Kind,
    /// The fault-catalogue bugs this hypothesis, when it holds, points at
    /// (empty: a fact about the divergence that names no bug).
    pub explains: Vec<&'static str>,
}

/// The ranked hypotheses at one divergent stage (see `Diagnosis::sort`).
#[derive(Clone, Debug, Serialize)]
pub struct Diagnosis {
    pub at: StageId,
    pub hypotheses: Vec<Hypothesis>,
    /// Where the error sits: which tokens, heads and channels carry it.
    pub evidence: String,
    /// How much of the difference ggml's rounding could explain: our engine
    /// in exact vs ggml numerics at this stage, against the divergence.
    pub attribution: Option<String>,
}

impl Diagnosis {
    /// The top hypothesis, when it holds.
    pub fn best(&self) -> Option<&Hypothesis> {
        self.hypotheses.first().filter(|h| h.holds)
    }

    /// The catalogue bugs the diagnosis names: those of the top hypothesis
    /// and of every other that holds with the same kind and figure (two bug
    /// models can reproduce a stage exactly alike: kv-offset and
    /// kv-len-short leave the same hole in decode's scores).
    pub fn named(&self) -> Vec<&'static str> {
        let Some(best) = self.best() else { return Vec::new() };
        let mut out: Vec<&'static str> = Vec::new();
        for h in self.hypotheses.iter().filter(|h| h.holds && h.kind == best.kind && h.figure == best.figure) {
            for name in &h.explains {
                if !out.contains(name) {
                    out.push(name);
                }
            }
        }
        out
    }

    /// One line for the verdict.
    pub fn headline(&self) -> String {
        let Some(best) = self.best() else {
            return format!("diagnosis: no bug model or pattern explains it; {}", self.evidence);
        };
        let tied: Vec<&str> =
            self.hypotheses.iter().skip(1).filter(|x| x.holds && x.kind == best.kind && x.figure == best.figure).map(|x| x.claim.as_str()).collect();
        let tie = if tied.is_empty() { String::new() } else { format!("; equally: {}", tied.join("; ")) };
        let supporting: Vec<&str> =
            self.hypotheses.iter().skip(1 + tied.len()).filter(|x| x.holds && x.kind == Kind::Pattern).map(|x| x.claim.as_str()).collect();
        let support = if supporting.is_empty() {
            String::new()
        } else {
            format!("; patterns: {}", supporting.join("; "))
        };
        format!("diagnosis: {} ({}: {:.1e}{tie}){support}", best.claim, best.test, best.figure)
    }

    /// Holding hypotheses first; among them replays (a bug reproduced)
    /// before patterns (a bug class seen), patterns that name catalogue bugs
    /// before those that name none, fewer names (more specific) first, then
    /// by figure.
    pub fn sort(&mut self) {
        let specificity = |h: &Hypothesis| if h.explains.is_empty() { usize::MAX } else { h.explains.len() };
        self.hypotheses.sort_by(|a, b| {
            b.holds.cmp(&a.holds).then(a.kind.cmp(&b.kind)).then(specificity(a).cmp(&specificity(b))).then(a.figure.total_cmp(&b.figure))
        });
    }
}

/// What the diagnosis may use beyond the two captures.
#[derive(Default)]
pub struct Tools<'a> {
    /// Our engine, for the what-if replay and the attribution (`None`: the
    /// pattern tests alone, as for dumps without `--model`).
    pub pair: Option<&'a mut crate::session::Pair>,
    /// The model's weights, for naming the tensor a pattern equals (a bias,
    /// a norm weight).
    pub weights: Option<&'a GgufFile>,
}

/// The diagnosis at a report's first failing stage: pattern tests on the
/// two tensors, plus the what-if replay and the attribution when our engine
/// is at hand. `None` when nothing diverged.
pub fn diagnose(tools: Tools, reference: &Capture, ours: &Capture, report: &crate::diff::DiffReport) -> anyhow::Result<Option<Diagnosis>> {
    let Some(i) = report.first_divergence else { return Ok(None) };
    let row = &report.rows[i];
    let (Some(r), Some(o)) = (reference.get(&row.id), ours.get(&row.id)) else { return Ok(None) };
    let gate = match row.metric {
        crate::thresholds::GateMetric::RowRelL2 => row.threshold.unwrap_or(1e-4),
        // A max-abs gate says nothing relative: use the built-in teacher-forced one.
        crate::thresholds::GateMetric::MaxAbs => 1e-4,
    };
    let observed = row.metrics.row_rel_l2_max;
    let subject = patterns::Subject {
        at: row.id,
        ours: o,
        reference: r,
        reference_capture: reference,
        report,
        gate,
        observed,
        dims: reference.config.dims(),
        weights: tools.weights,
    };
    let mut hypotheses = patterns::run_all(&subject);
    let evidence = patterns::evidence(&subject);
    let mut attribution = None;
    if let Some(pair) = tools.pair {
        // A replay reproduces the stage: within the gate teacher-forced; a
        // free-running dump also carries its own drift, so there a twentieth
        // of the divergence will do.
        let teacher_forced = ours.config.fed == "teacher-forced";
        let criterion = if teacher_forced { gate } else { gate.max(0.05 * observed) };
        hypotheses.extend(replay::replay(pair, reference, row.id, o, criterion)?);
        attribution = replay::attribute(pair, reference, ours, row.id, observed)?;
    }
    let mut d = Diagnosis { at: row.id, hypotheses, evidence, attribution };
    d.sort();
    Ok(Some(d))
}

#[cfg(test)]
mod tests;
