//! The what-if replay: the fault catalogue's bug models run by our engine
//! on the reference's input at the divergent stage, and the attribution of
//! the divergence to ggml's rounding.

use super::{Hypothesis, Kind};
use capture::{StageId, Tensor};

/// The what-if replay at `at`: every bug model of the fault catalogue that
/// acts at that stage, run as our engine with that fault at that layer,
/// teacher-forced on `reference`; its tensor at `at` compared with `eut`,
/// the engine under test's. Holds when it reproduces `eut` within `criterion`
/// (worst-row rel-L2). Our engine is left with the fault it had.
pub(super) fn replay(
    pair: &mut crate::session::Pair,
    reference: &capture::Capture,
    at: StageId,
    eut: &Tensor,
    criterion: f64,
) -> anyhow::Result<Vec<Hypothesis>> {
    use engine::fault::{FaultSpec, Scope, FAULTS};
    let candidates = FAULTS.iter().filter(|f| f.fault.changes().contains(&at.stage) && (f.scope == Scope::Global) == at.layer.is_none());
    let mut out = Vec::new();
    let under_test = pair.fault();
    for info in candidates {
        pair.set_fault(FaultSpec { fault: info.fault, layer: at.layer })?;
        let layers = at.layer.map(|l| vec![l]);
        let replayed = pair.ours(reference, layers, true);
        let replayed = replayed?;
        let Some(model_out) = replayed.get(&at) else { continue };
        let figure = match crate::metrics::compare(at.stage, eut, model_out) {
            Ok(m) => m.row_rel_l2_max,
            Err(_) => f64::INFINITY,
        };
        out.push(Hypothesis {
            claim: format!("{}: {}", info.name, info.models),
            test: "worst-row rel-L2 of yours against the replay of this bug".into(),
            figure,
            holds: figure <= criterion,
            kind: Kind::Replay,
            explains: vec![info.name],
        });
    }
    pair.set_fault(under_test)?;
    Ok(out)
}

/// Attribution: the stage recomputed by our engine (with the fault it
/// carries) in exact numerics, teacher-forced, against the same in ggml
/// numerics: how far ggml's rounding alone moves this stage, set beside the
/// divergence (`observed`, worst-row rel-L2). `None` in exact numerics.
/// `under_test` is reused as the ggml side when it is that very pass (our
/// engine, teacher-forced, ggml numerics): no need to run it again.
pub(super) fn attribute(
    pair: &mut crate::session::Pair,
    reference: &capture::Capture,
    under_test: &capture::Capture,
    at: StageId,
    observed: f64,
) -> anyhow::Result<Option<String>> {
    use engine::numerics::Numerics;
    if pair.ours.numerics() != Numerics::Ggml {
        return Ok(None);
    }
    let layers = at.layer.map(|l| vec![l]);
    let same_pass = under_test.engine.starts_with("ours-")
        && under_test.config.fed == "teacher-forced"
        && under_test.config.numerics == Numerics::Ggml.name();
    let rerun;
    let ggml = if same_pass {
        under_test
    } else {
        rerun = pair.ours(reference, layers.clone(), true)?;
        &rerun
    };
    pair.ours.set_numerics(Numerics::Exact);
    let exact = pair.ours(reference, layers, true);
    pair.ours.set_numerics(Numerics::Ggml);
    let exact = exact?;
    let (Some(g), Some(e)) = (ggml.get(&at), exact.get(&at)) else { return Ok(None) };
    let rounding = crate::metrics::compare(at.stage, e, g).map(|m| m.row_rel_l2_max).unwrap_or(f64::NAN);
    Ok(Some(format!(
        "attribution: ggml's rounding moves {at} by {rounding:.1e} (worst-row rel-L2, our engine exact vs ggml numerics); the divergence is {observed:.1e}, {} what rounding explains",
        if rounding > 0.0 { format!("{:.1e}x", observed / rounding) } else { "beyond".to_string() }
    )))
}
