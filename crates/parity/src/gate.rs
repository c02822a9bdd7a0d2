//! `parity gate`: every prompt of a set judged on one model load, for CI:
//! deterministic shards, one summary, JUnit XML a CI system shows per prompt.

use crate::diff::{DiffReport, Verdict};
use crate::prompts::Prompt;
use crate::report::{render_terminal, sci, verdict_lines};
use anyhow::{bail, Result};
use serde_json::{json, Value};

/// `--shard I/N`: the I-th of N shards (1-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn parse(s: &str) -> Result<Shard, String> {
        let bad = || format!("--shard {s:?}: expected I/N with 1 <= I <= N, e.g. 2/3");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (i.trim().parse::<usize>().map_err(|_| bad())?, n.trim().parse::<usize>().map_err(|_| bad())?);
        if count == 0 || index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// Whether the prompt at `position` (0-based, in file order) is this
    /// shard's: positions are dealt round-robin, so shards differ in size by
    /// at most one and every prompt is in exactly one.
    pub fn takes(&self, position: usize) -> bool {
        position % self.count == self.index - 1
    }
}

/// One prompt's outcome.
pub struct Judged {
    /// Position in the prompt file (0-based), kept across shards.
    pub position: usize,
    pub prompt: Prompt,
    pub report: DiffReport,
    pub seconds: f64,
}

impl Judged {
    pub fn diverged(&self) -> bool {
        self.report.verdict == Verdict::Diverged
    }

    /// "FIRST DIVERGENCE: ..." (or the KL line), or empty for a match.
    pub fn first_divergence(&self) -> String {
        if !self.diverged() {
            return String::new();
        }
        verdict_lines(&self.report).into_iter().next().unwrap_or_default()
    }

    /// The largest value / threshold over the gated stages: under 1 passes.
    pub fn worst_margin(&self) -> Option<f64> {
        self.report.rows.iter().filter_map(|r| r.ratio()).max_by(f64::total_cmp)
    }

    /// A short name for tables and test cases.
    pub fn label(&self) -> String {
        let one_line = self.prompt.text.replace('\n', "\\n");
        let short: String = one_line.chars().take(48).collect();
        let ellipsis = if one_line.chars().count() > 48 { "..." } else { "" };
        format!("#{} {}{short}{ellipsis}", self.position + 1, if self.prompt.chat { "chat: " } else { "" })
    }
}

/// The summary table: prompt, tokens, verdict, first divergence, worst margin.
pub fn summary_table(results: &[Judged]) -> String {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(["prompt", "tokens", "verdict", "first divergence", "worst margin"]);
    for r in results {
        let verdict = if r.diverged() { "DIVERGED" } else { "match" };
        let first = r.first_divergence().trim_start_matches("FIRST DIVERGENCE: ").to_string();
        let margin = r.worst_margin().map_or("-".into(), |m| format!("{}x", sci(m)));
        table.add_row([r.label(), r.report.tokens.len().to_string(), verdict.to_string(), first, margin]);
    }
    table.to_string()
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 admits tab, newline and carriage return among the controls.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// JUnit XML: one test case per prompt; a diverging prompt's failure
/// message is its first divergence with the numbers, the per-stage table
/// goes to system-out.
pub fn junit_xml(results: &[Judged], suite: &str) -> String {
    let failures = results.iter().filter(|r| r.diverged()).count();
    let total: f64 = results.iter().map(|r| r.seconds).sum();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str(&format!(
        "<testsuites name=\"parity gate\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{total:.3}\">\n",
        results.len()
    ));
    out.push_str(&format!(
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"0\" time=\"{total:.3}\">\n",
        xml_escape(suite),
        results.len()
    ));
    for r in results {
        out.push_str(&format!(
            "    <testcase classname=\"parity.gate\" name=\"{}\" time=\"{:.3}\">\n",
            xml_escape(&r.label()),
            r.seconds
        ));
        if r.diverged() {
            let lines = verdict_lines(&r.report);
            out.push_str(&format!(
                "      <failure message=\"{}\" type=\"divergence\">{}</failure>\n",
                xml_escape(&r.first_divergence()),
                xml_escape(&lines.join("\n"))
            ));
        }
        out.push_str(&format!("      <system-out>{}</system-out>\n", xml_escape(&render_terminal(&r.report, None))));
        out.push_str("    </testcase>\n");
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

/// The machine-readable summary.
pub fn summary_json(results: &[Judged], shard: Option<Shard>) -> Value {
    json!({
        "shard": shard.map(|s| format!("{}/{}", s.index, s.count)),
        "prompts": results.len(),
        "diverged": results.iter().filter(|r| r.diverged()).count(),
        "results": results.iter().map(|r| json!({
            "position": r.position,
            "prompt": r.prompt.text,
            "chat": r.prompt.chat,
            "tokens": r.report.tokens.len(),
            "verdict": if r.diverged() { "diverged" } else { "match" },
            "first_divergence": r.first_divergence(),
            "worst_margin": r.worst_margin().filter(|m| m.is_finite()),
            "seconds": r.seconds,
            "report": crate::report::render_json(&r.report),
        })).collect::<Vec<_>>(),
    })
}

/// The summary as a Markdown table.
pub fn summary_markdown(results: &[Judged]) -> String {
    let diverged = results.iter().filter(|r| r.diverged()).count();
    let mut out = format!("# parity gate: {} prompts, {diverged} diverged\n\n", results.len());
    out.push_str("| prompt | tokens | verdict | first divergence | worst margin |\n|---|---|---|---|---|\n");
    for r in results {
        let cell = |s: &str| s.replace('|', "\\|");
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            cell(&r.label()),
            r.report.tokens.len(),
            if r.diverged() { "**DIVERGED**" } else { "match" },
            cell(r.first_divergence().trim_start_matches("FIRST DIVERGENCE: ")),
            r.worst_margin().map_or("-".into(), |m| format!("{}x", sci(m)))
        ));
    }
    out
}

/// The prompts of `shard` (all without one), with their file positions.
pub fn select(prompts: Vec<Prompt>, shard: Option<Shard>) -> Result<Vec<(usize, Prompt)>> {
    let n = prompts.len();
    let picked: Vec<(usize, Prompt)> = prompts.into_iter().enumerate().filter(|(i, _)| shard.is_none_or(|s| s.takes(*i))).collect();
    if picked.is_empty() {
        let s = shard.map_or(String::new(), |s| format!(" (shard {}/{} of {n} prompts)", s.index, s.count));
        bail!("no prompts to gate{s}");
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_prompt_exactly_once() {
        for count in 1..=5 {
            for n in 0..12 {
                let owners: Vec<usize> =
                    (0..n).map(|p| (1..=count).filter(|&i| Shard { index: i, count }.takes(p)).count()).collect();
                assert!(owners.iter().all(|&k| k == 1), "{count} shards over {n} prompts: {owners:?}");
            }
        }
        assert_eq!(Shard::parse("2/3"), Ok(Shard { index: 2, count: 3 }));
        for bad in ["0/3", "4/3", "1/0", "3", "a/b", "1/3/4", ""] {
            assert!(Shard::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn xml_text_is_escaped_and_control_characters_removed() {
        assert_eq!(xml_escape("a<b & \"c\" 'd'>\u{1}\n"), "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;\\u{1}\n");
    }
}
