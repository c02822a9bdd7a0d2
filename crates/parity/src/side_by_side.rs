//! `parity bench --side-by-side FILE`: our engine's speed next to llama.cpp's
//! own build on the same model and prompt lengths. FILE holds the JSON lines
//! `bench/llama_cuda_bench.cpp` prints (one per flash-attention setting and
//! prompt length); our times are measured here, and the two are joined into
//! one table and `bench.json`, one record per row with both times and the
//! ratio.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;

/// One line of llama.cpp's bench: medians over its timed runs.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct LlamaTiming {
    pub backend: String,
    pub flash_attn: bool,
    pub n_prompt: usize,
    pub n_decode: usize,
    pub prefill_ms_median: f64,
    pub decode_ms_per_token_median: f64,
    pub prefill_ms: Vec<f64>,
}

/// Our engine's medians for one prompt length and checkpoint setting.
#[derive(Clone, Debug, PartialEq)]
pub struct OurTiming {
    pub n_prompt: usize,
    /// Every stage of every layer captured (else only the embedding, the
    /// final norm and the last logits, which greedy decoding needs anyway).
    pub all_checkpoints: bool,
    pub prefill_ms: f64,
    pub decode_ms_per_token: f64,
}

/// What a row times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// One pass over the whole prompt, milliseconds.
    PrefillMs,
    /// One greedy decode step after the prompt, milliseconds.
    DecodeMsPerToken,
}

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Metric::PrefillMs => "prefill (ms)",
            Metric::DecodeMsPerToken => "decode (ms/token)",
        }
    }
}

/// One row of `bench.json`: both times and llama.cpp's time over ours
/// (above 1: ours is faster).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Record {
    pub n_prompt: usize,
    pub n_decode: usize,
    pub metric: Metric,
    pub flash_attn: bool,
    pub our_checkpoints: &'static str,
    pub llama_ms: f64,
    pub ours_ms: f64,
    pub speed_ratio: f64,
}

/// Read llama.cpp's JSON lines; every line must have the same decode steps
/// and a finite, positive time, and both flash-attention settings must be
/// there for every prompt length.
pub fn read_llama(path: &Path) -> Result<Vec<LlamaTiming>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_llama(&text).with_context(|| format!("{}", path.display()))
}

pub fn parse_llama(text: &str) -> Result<Vec<LlamaTiming>> {
    let mut out: Vec<LlamaTiming> = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| l.trim_start().starts_with('{')) {
        let t: LlamaTiming = serde_json::from_str(line).with_context(|| format!("line {}: not a llama_cuda_bench record", i + 1))?;
        for (what, ms) in [("prefill", t.prefill_ms_median), ("decode", t.decode_ms_per_token_median)] {
            if !(ms.is_finite() && ms > 0.0) {
                bail!("line {}: {what} time {ms} is not a positive number", i + 1);
            }
        }
        if let Some(first) = out.first().filter(|f| f.n_decode != t.n_decode) {
            bail!("line {}: {} decode steps, but an earlier line has {}", i + 1, t.n_decode, first.n_decode);
        }
        out.push(t);
    }
    if out.is_empty() {
        bail!("no llama_cuda_bench records");
    }
    for p in prompt_lengths(&out) {
        for fa in [false, true] {
            if !out.iter().any(|t| t.n_prompt == p && t.flash_attn == fa) {
                bail!("no record for a {p}-token prompt with flash attention {}", if fa { "on" } else { "off" });
            }
        }
    }
    Ok(out)
}

/// The prompt lengths llama.cpp was timed on, ascending.
pub fn prompt_lengths(llama: &[LlamaTiming]) -> Vec<usize> {
    llama.iter().map(|t| t.n_prompt).collect::<BTreeSet<_>>().into_iter().collect()
}

/// Join: for every prompt length, metric, flash-attention setting of
/// llama.cpp and checkpoint setting of ours, one record.
pub fn join(llama: &[LlamaTiming], ours: &[OurTiming]) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for p in prompt_lengths(llama) {
        for metric in [Metric::PrefillMs, Metric::DecodeMsPerToken] {
            for all_checkpoints in [false, true] {
                let o = ours
                    .iter()
                    .find(|o| o.n_prompt == p && o.all_checkpoints == all_checkpoints)
                    .with_context(|| format!("our engine was not timed on a {p}-token prompt"))?;
                for flash_attn in [false, true] {
                    let l = llama.iter().find(|t| t.n_prompt == p && t.flash_attn == flash_attn).expect("checked by parse_llama");
                    let (llama_ms, ours_ms) = match metric {
                        Metric::PrefillMs => (l.prefill_ms_median, o.prefill_ms),
                        Metric::DecodeMsPerToken => (l.decode_ms_per_token_median, o.decode_ms_per_token),
                    };
                    out.push(Record {
                        n_prompt: p,
                        n_decode: l.n_decode,
                        metric,
                        flash_attn,
                        our_checkpoints: if all_checkpoints { "all" } else { "none" },
                        llama_ms,
                        ours_ms,
                        speed_ratio: llama_ms / ours_ms,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// The table: one line per prompt length, metric and our checkpoint
/// setting, llama.cpp with flash attention off and on side by side.
pub fn table(records: &[Record]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_header(["prompt", "metric", "our checkpoints", "ours", "llama.cpp FA off", "ratio", "llama.cpp FA on", "ratio"]);
    for pair in records.chunks(2) {
        let [off, on] = pair else { continue };
        t.add_row([
            format!("{} tokens", off.n_prompt),
            off.metric.label().to_string(),
            off.our_checkpoints.to_string(),
            format!("{:.3}", off.ours_ms),
            format!("{:.3}", off.llama_ms),
            format!("{:.2}x", off.speed_ratio),
            format!("{:.3}", on.llama_ms),
            format!("{:.2}x", on.speed_ratio),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(fa: bool, p: usize, prefill: f64, decode: f64) -> String {
        format!(
            r#"{{"engine":"llama.cpp","backend":"cuda","flash_attn":{fa},"n_prompt":{p},"n_decode":128,"prefill_ms":[{prefill}],"decode_ms_per_token":[{decode}],"prefill_ms_median":{prefill},"decode_ms_per_token_median":{decode}}}"#
        )
    }

    #[test]
    fn joins_every_prompt_metric_and_setting_with_the_ratio() {
        let text = [line(false, 32, 4.0, 1.5), line(false, 512, 13.0, 1.6), line(true, 32, 3.0, 1.2), line(true, 512, 12.0, 1.3)].join("\n");
        let llama = parse_llama(&format!("model loading...\n{text}\n")).unwrap();
        assert_eq!(prompt_lengths(&llama), vec![32, 512]);
        let ours: Vec<OurTiming> = [32, 512]
            .iter()
            .flat_map(|&p| {
                [false, true].map(|all| OurTiming { n_prompt: p, all_checkpoints: all, prefill_ms: if all { 40.0 } else { 8.0 }, decode_ms_per_token: 2.0 })
            })
            .collect();
        let records = join(&llama, &ours).unwrap();
        assert_eq!(records.len(), 16);
        let r = records
            .iter()
            .find(|r| r.n_prompt == 512 && r.metric == Metric::PrefillMs && r.flash_attn && r.our_checkpoints == "none")
            .unwrap();
        assert_eq!((r.llama_ms, r.ours_ms, r.speed_ratio), (12.0, 8.0, 1.5));
        let r = records.iter().find(|r| r.n_prompt == 32 && r.metric == Metric::DecodeMsPerToken && !r.flash_attn && r.our_checkpoints == "all").unwrap();
        assert_eq!(r.speed_ratio, 0.75);
        let rendered = table(&records).to_string();
        assert!(rendered.contains("1.50x") && rendered.contains("512 tokens"), "{rendered}");
        let json = serde_json::to_value(&records).unwrap();
        assert_eq!(json[0]["metric"], "prefill_ms");
        assert_eq!(json[0]["our_checkpoints"], "none");
    }

    #[test]
    fn refuses_incomplete_or_broken_input() {
        let only_off = line(false, 32, 4.0, 1.5);
        assert!(parse_llama(&only_off).unwrap_err().to_string().contains("flash attention on"));
        let mixed = [line(false, 32, 4.0, 1.5), line(true, 32, 3.0, 1.2).replace("\"n_decode\":128", "\"n_decode\":64")].join("\n");
        assert!(parse_llama(&mixed).unwrap_err().to_string().contains("decode steps"));
        let nan = [line(false, 32, 4.0, 1.5), line(true, 32, 3.0, 1.2).replace("\"decode_ms_per_token_median\":1.2", "\"decode_ms_per_token_median\":0")].join("\n");
        assert!(parse_llama(&nan).unwrap_err().to_string().contains("not a positive number"));
        assert!(parse_llama("").unwrap_err().to_string().contains("no llama_cuda_bench records"));
        let llama = parse_llama(&[line(false, 32, 4.0, 1.5), line(true, 32, 3.0, 1.2)].join("\n")).unwrap();
        assert!(join(&llama, &[]).unwrap_err().to_string().contains("32-token prompt"));
    }
}
