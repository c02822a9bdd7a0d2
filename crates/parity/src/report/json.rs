//! Machine-readable report. Non-finite numbers are written as the strings
//! "inf", "-inf" and "nan" (JSON has no such numbers); step 0 is the prefill.

use super::verdict_lines;
use crate::diff::{DiffReport, FirstProblem, StageRow, Verdict};
use crate::drilldown::{Drilldown, GroupError};
use capture::stage::StageId;
use serde_json::{json, Value};

fn num(x: f64) -> Value {
    if x.is_nan() {
        Value::from("nan")
    } else if x == f64::INFINITY {
        Value::from("inf")
    } else if x == f64::NEG_INFINITY {
        Value::from("-inf")
    } else {
        json!(x)
    }
}

fn opt_num(x: Option<f64>) -> Value {
    x.map_or(Value::Null, num)
}

fn id_fields(id: &StageId) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("step".into(), json!(id.step));
    m.insert("layer".into(), id.layer.map_or(Value::Null, |l| json!(l)));
    m.insert("stage".into(), json!(id.stage.name()));
    m
}

fn stage_json(row: &StageRow) -> Value {
    let m = &row.metrics;
    let mut o = id_fields(&row.id);
    o.insert("max_abs".into(), num(m.max_abs));
    o.insert("mean_abs".into(), num(m.mean_abs));
    o.insert("rel_l2".into(), num(m.rel_l2));
    o.insert("row_rel_l2_max".into(), num(m.row_rel_l2_max));
    o.insert("row_rel_l2_median".into(), num(m.row_rel_l2_median));
    o.insert("worst_row".into(), json!(m.worst_row));
    o.insert("cosine".into(), num(m.cosine));
    o.insert("nmse".into(), num(m.nmse));
    o.insert("ref_max_abs".into(), num(m.ref_max_abs));
    o.insert("non_finite".into(), json!(m.non_finite));
    o.insert("n".into(), json!(m.n));
    o.insert("shape".into(), json!(m.shape));
    o.insert("threshold".into(), opt_num(row.threshold));
    o.insert("gated_on".into(), json!(row.metric.field()));
    o.insert("margin".into(), opt_num(row.ratio()));
    o.insert("pass".into(), json!(row.pass));
    o.insert("jump".into(), opt_num(row.jump));
    o.insert(
        "worst".into(),
        m.worst.as_ref().map_or(Value::Null, |w| {
            json!({
                "flat_index": w.flat_index,
                "index": w.index,
                "coords": w.coords,
                "ours": num(w.ours as f64),
                "reference": num(w.reference as f64),
            })
        }),
    );
    o.insert("ours_provenance".into(), json!(row.ours_provenance));
    o.insert("ref_provenance".into(), json!(row.ref_provenance));
    Value::Object(o)
}

fn group_json(g: &GroupError) -> Value {
    json!({
        "index": g.index, "position": g.position, "token_id": g.token_id,
        "max_abs": num(g.max_abs), "rel_l2": num(g.rel_l2), "non_finite": g.non_finite,
    })
}

fn drilldown_json(d: &Drilldown) -> Value {
    let mut o = id_fields(&d.id);
    o.insert("why".into(), json!(d.why));
    o.insert("shape".into(), json!(d.shape));
    o.insert("axes".into(), json!(d.axes));
    o.insert("compared".into(), json!(d.compared));
    o.insert(
        "worst".into(),
        d.worst
            .iter()
            .map(|e| {
                json!({
                    "index": e.index, "coords": e.coords, "token": e.token, "position": e.position,
                    "token_id": e.token_id, "ours": num(e.ours as f64), "reference": num(e.reference as f64),
                    "abs_diff": num(e.abs_diff),
                })
            })
            .collect(),
    );
    o.insert("histogram".into(), d.histogram.iter().map(|b| json!({ "abs_diff": b.label, "count": b.count })).collect());
    o.insert("per_token".into(), d.per_token.iter().map(group_json).collect());
    o.insert("per_head".into(), d.per_head.iter().map(group_json).collect());
    Value::Object(o)
}

pub fn render_json(r: &DiffReport) -> Value {
    let first_divergence = match r.first_problem() {
        None => Value::Null,
        Some(FirstProblem::Row(i)) => {
            let row = &r.rows[i];
            let mut o = id_fields(&row.id);
            o.insert("kind".into(), json!("threshold"));
            o.insert("max_abs".into(), num(row.metrics.max_abs));
            o.insert("row_rel_l2_max".into(), num(row.metrics.row_rel_l2_max));
            o.insert("gated_on".into(), json!(row.metric.field()));
            o.insert("threshold".into(), opt_num(row.threshold));
            o.insert("margin".into(), opt_num(row.ratio()));
            o.insert("what_to_check".into(), json!(row.id.stage.what_to_check()));
            Value::Object(o)
        }
        Some(FirstProblem::Missing(id, side)) => {
            let mut o = id_fields(&id);
            o.insert("kind".into(), json!("missing"));
            o.insert("missing_in".into(), json!(side));
            o.insert("max_abs".into(), Value::Null);
            o.insert("threshold".into(), Value::Null);
            Value::Object(o)
        }
        Some(FirstProblem::ShapeMismatch(id, msg)) => {
            let mut o = id_fields(&id);
            o.insert("kind".into(), json!("shape_mismatch"));
            o.insert("message".into(), json!(msg));
            o.insert("max_abs".into(), Value::Null);
            o.insert("threshold".into(), Value::Null);
            Value::Object(o)
        }
        Some(FirstProblem::LogitsKl(step, kl)) => json!({
            "kind": "logits_kl", "step": step, "layer": null, "stage": "logits",
            "kl_max": num(kl), "threshold": opt_num(r.logits_kl_max), "max_abs": null,
        }),
    };
    let largest_jump = r.largest_jump.map_or(Value::Null, |i| {
        let row = &r.rows[i];
        let mut o = id_fields(&row.id);
        o.insert("ratio".into(), opt_num(row.jump));
        o.insert("rel_l2".into(), num(row.metrics.rel_l2));
        o.insert(
            "from".into(),
            row.jump_from.map_or(Value::Null, |f| Value::Object(id_fields(&f))),
        );
        Value::Object(o)
    });
    json!({
        "verdict": match r.verdict { Verdict::Match => "match", Verdict::Diverged => "diverged" },
        "verdict_lines": verdict_lines(r),
        "first_divergence": first_divergence,
        "largest_jump": largest_jump,
        "engines": { "ours": r.ours_engine, "reference": r.reference_engine },
        "prompt": r.prompt,
        "tokens": r.tokens,
        "model_sha256": r.model_sha256,
        "kv_type": r.kv_type,
        "thresholds_source": r.thresholds_source,
        "comparison": r.comparison,
        "diagnosis": r.diagnosis.as_ref().map_or(Value::Null, |d| json!({
            "at": Value::Object(id_fields(&d.at)),
            "names": d.named(),
            "evidence": d.evidence,
            "attribution": d.attribution,
            "hypotheses": d.hypotheses.iter().map(|h| json!({
                "claim": h.claim, "test": h.test, "figure": num(h.figure), "holds": h.holds,
                "kind": h.kind, "explains": h.explains,
            })).collect::<Vec<_>>(),
        })),
        "numerics": r.numerics,
        "configuration": r.configuration.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "drilldowns": r.drilldowns.iter().map(drilldown_json).collect::<Vec<_>>(),
        "free_running": r.free_running.as_ref().map_or(Value::Null, |fr| json!({
            "thresholds_source": fr.thresholds_source,
            "ended_after_layer": fr.ended_after_layer,
            "verdict": match fr.verdict { Verdict::Match => "match", Verdict::Diverged => "diverged" },
            "first_over_gate": fr.first_over_gate.map_or(Value::Null, |(id, v, t)| {
                let mut o = id_fields(&id);
                o.insert("row_rel_l2_max".into(), num(v));
                o.insert("threshold".into(), num(t));
                Value::Object(o)
            }),
            "per_layer": fr.per_layer.iter().map(|(l, v, s)| json!({
                "layer": l, "row_rel_l2_max": num(*v), "stage": s.name(),
            })).collect::<Vec<_>>(),
            "logits": fr.logits.iter().map(|(step, m)| json!({
                "step": step, "top1_agree": m.top1_agree, "rows": m.rows,
                "kl_mean": num(m.kl_mean), "kl_max": num(m.kl_max),
            })).collect::<Vec<_>>(),
            "logits_kl_max": opt_num(fr.logits_kl_max),
        })),
        "n_layer": r.n_layer,
        "stages": r.rows.iter().map(stage_json).collect::<Vec<_>>(),
        "logits": r.logits.iter().map(|(step, m)| json!({
            "step": step, "top1_agree": m.top1_agree, "rows": m.rows,
            "kl_mean": num(m.kl_mean), "kl_max": num(m.kl_max),
        })).collect::<Vec<_>>(),
        "logits_kl_max": opt_num(r.logits_kl_max),
        "missing": r.missing.iter().map(|(id, side)| {
            let mut o = id_fields(id);
            o.insert("missing_in".into(), json!(side));
            Value::Object(o)
        }).collect::<Vec<_>>(),
        "shape_mismatch": r.shape_mismatch.iter().map(|(id, msg)| {
            let mut o = id_fields(id);
            o.insert("message".into(), json!(msg));
            Value::Object(o)
        }).collect::<Vec<_>>(),
        "unavailable": r.unavailable.iter().map(|id| Value::Object(id_fields(id))).collect::<Vec<_>>(),
    })
}
