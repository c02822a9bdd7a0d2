//! Shared helpers for the llama-ref integration tests.
#![allow(dead_code)]

use capture::{Capture, Tensor};
use capture::stage::{Stage, StageId};

pub const PROMPT: &str = "Write a haiku about GPU computing";

/// The real model's path, or return from the test after recording the skip.
#[macro_export]
macro_rules! real_model_or_skip {
    () => {
        testkit::real_model_or_skip!()
    };
}

pub fn get(c: &Capture, step: usize, layer: Option<usize>, stage: Stage) -> &Tensor {
    let id = StageId { step, layer, stage };
    c.get(&id).unwrap_or_else(|| panic!("missing {id}"))
}

/// Shape of every stage, written out from engine::stage's table (independent of the crate under test).
pub fn expected_shape(c: &Capture, step: usize, stage: Stage) -> Vec<usize> {
    let cfg = &c.config;
    let n_t = if step == 0 { c.tokens.len() } else { 1 };
    let n_kv = if step == 0 { c.tokens.len() } else { c.tokens.len() + step };
    match stage {
        Stage::QProj | Stage::QRope | Stage::AttnCtx => vec![n_t, cfg.n_head, cfg.head_dim],
        Stage::KProj | Stage::VProj | Stage::KRope => vec![n_t, cfg.n_head_kv, cfg.head_dim],
        Stage::AttnScores | Stage::AttnProbs => vec![cfg.n_head, n_t, n_kv],
        Stage::FfnGate | Stage::FfnUp | Stage::FfnAct => vec![n_t, cfg.n_ff],
        Stage::Logits => vec![n_t, cfg.n_vocab],
        _ => vec![n_t, cfg.n_embd],
    }
}

/// RMSNorm(x) * w row by row, in f64.
pub fn rms_norm(x: &Tensor, w: &[f32], eps: f64) -> Vec<f32> {
    let n = w.len();
    x.data
        .chunks(n)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(move |(&v, &g)| (v as f64 * inv * g as f64) as f32).collect::<Vec<_>>()
        })
        .collect()
}

/// Largest |a-b| / (atol + rtol*|b|) over the two slices; <= 1 means within tolerance.
pub fn worst(a: &[f32], b: &[f32], atol: f32, rtol: f32) -> (f32, usize) {
    assert_eq!(a.len(), b.len());
    let mut w = (0f32, 0usize);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let r = (x - y).abs() / (atol + rtol * y.abs());
        if r > w.0 || r.is_nan() {
            w = (r, i);
        }
    }
    w
}

#[allow(unused_imports)]
pub use capture::argmax;
