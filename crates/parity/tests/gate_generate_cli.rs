//! `parity gate` and `parity generate` on the real model. gate: the holdout
//! set matches (exit 0), a seeded fault fails every prompt (exit 1) with
//! JUnit failures naming the stage, shards cover the set exactly once, bad
//! input exits 2. generate: both texts, and a parting judged near tie or bug.
//! The JUnit XML is validated against fixtures/junit/junit-10.xsd with
//! xmllint; without xmllint that check records a skip, or fails under
//! `PARITY_REQUIRE_XMLLINT=1` (CI sets it after `scripts/install-deps`).

#[macro_use]
mod common;
use common::parity;

use parity::fixtures::fixtures_dir;
use serde_json::Value;
use std::collections::BTreeSet;

fn holdout() -> String {
    fixtures_dir().unwrap().join("prompts/holdout.txt").display().to_string()
}

fn n_prompts() -> usize {
    parity::prompts::read_prompts(std::path::Path::new(&holdout())).unwrap().len()
}

/// The attribute `name` of the first element `tag` in `xml`.
fn attr(xml: &str, tag: &str, name: &str) -> String {
    let start = xml.find(&format!("<{tag} ")).unwrap_or_else(|| panic!("no <{tag}> in {xml}"));
    let rest = &xml[start..];
    let key = format!(" {name}=\"");
    let at = rest[..rest.find('>').unwrap()].find(&key).unwrap_or_else(|| panic!("<{tag}> has no {name}"));
    let value = &rest[at + key.len()..];
    value[..value.find('"').unwrap()].to_string()
}

/// xmllint's verdict on `xml` against the JUnit schema: `Some(errors)` when
/// invalid, `Some("")` when valid, `None` (a skip recorded) without xmllint.
fn junit_schema_errors(xml: &std::path::Path) -> Option<String> {
    let schema = fixtures_dir().unwrap().join("junit/junit-10.xsd");
    let out = match std::process::Command::new("xmllint").arg("--noout").arg("--schema").arg(&schema).arg(xml).output() {
        Ok(out) => out,
        Err(e) => {
            if std::env::var_os("PARITY_REQUIRE_XMLLINT").is_some_and(|v| v == "1") {
                panic!("PARITY_REQUIRE_XMLLINT=1 but xmllint cannot run ({e}): run scripts/install-deps");
            }
            testkit::skip("xmllint not installed: JUnit schema check not run");
            return None;
        }
    };
    let errors = String::from_utf8_lossy(&out.stderr).into_owned();
    Some(if out.status.success() { String::new() } else { errors })
}

/// The gate's JUnit file is valid against the schema; and the check is real:
/// the same file with a `<testcase>` stripped of its required name is not.
fn assert_valid_junit(junit: &std::path::Path) {
    let Some(errors) = junit_schema_errors(junit) else { return };
    assert_eq!(errors, "", "{} is not valid JUnit XML:\n{errors}", junit.display());
    let xml = std::fs::read_to_string(junit).unwrap();
    let nameless = junit.with_extension("nameless.xml");
    std::fs::write(&nameless, xml.replacen("<testcase classname=\"parity.gate\" name=", "<testcase classname=\"parity.gate\" title=", 1)).unwrap();
    let errors = junit_schema_errors(&nameless).unwrap();
    assert!(errors.contains("name"), "a testcase without a name passed the schema: {errors:?}");
}

#[test]
fn the_holdout_set_passes_and_writes_junit() {
    let model = real_model_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("gate.xml");
    let o = parity(&["gate", "--model", model.to_str().unwrap(), "--prompts", &holdout(), "--layers", "0", "--junit", junit.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains(&format!("MATCH: {} prompts within their gates", n_prompts())), "{out}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites "), "{xml}");
    assert_eq!(attr(&xml, "testsuite", "tests"), n_prompts().to_string());
    assert_eq!(attr(&xml, "testsuite", "failures"), "0");
    assert_eq!(xml.matches("<testcase ").count(), n_prompts());
    assert_eq!(xml.matches("</testcase>").count(), n_prompts());
    assert!(!xml.contains("<failure"));
    assert_valid_junit(&junit);
}

#[test]
fn a_seeded_fault_fails_every_prompt_with_its_stage_in_junit() {
    let model = real_model_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("gate.xml");
    let o = parity(&[
        "gate", "--model", model.to_str().unwrap(), "--prompts", &holdout(), "--layers", "0", "--fault", "rope-adjacent",
        "--junit", junit.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains(&format!("DIVERGED: {n} of {n} prompts", n = n_prompts())), "{out}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert_eq!(attr(&xml, "testsuite", "failures"), n_prompts().to_string());
    assert_eq!(xml.matches("<failure ").count(), n_prompts());
    assert!(attr(&xml, "failure", "message").contains("prefill, layer 0, q_rope"), "{xml}");
    assert_valid_junit(&junit);

    // --fail-fast stops at the first
    let o = parity(&["gate", "--model", model.to_str().unwrap(), "--prompts", &holdout(), "--layers", "0", "--fault", "rope-adjacent", "--fail-fast"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("DIVERGED: 1 of 1 prompts, stopped after 1 of {}", n_prompts())));
}

#[test]
fn shards_cover_the_set_exactly_once() {
    let model = real_model_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for i in 1..=3 {
        let json = dir.path().join(format!("shard{i}.json"));
        let o = parity(&[
            "gate", "--model", model.to_str().unwrap(), "--prompts", &holdout(), "--layers", "0", "--shard", &format!("{i}/3"),
            "--json", json.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(v["shard"], format!("{i}/3"));
        for r in v["results"].as_array().unwrap() {
            seen.push(r["position"].as_u64().unwrap() as usize);
        }
    }
    let unique: BTreeSet<usize> = seen.iter().copied().collect();
    assert_eq!(seen.len(), n_prompts(), "every prompt gated once: {seen:?}");
    assert_eq!(unique, (0..n_prompts()).collect());
}

#[test]
fn bad_gate_input_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "# nothing\n").unwrap();
    for (args, needle) in [
        (vec!["gate", "--prompts", "/nonexistent/prompts.txt"], "cannot read prompt set"),
        (vec!["gate", "--prompts", empty.to_str().unwrap()], "has no prompts"),
        (vec!["gate", "--prompts", empty.to_str().unwrap(), "--shard", "4/3"], "expected I/N"),
    ] {
        let o = parity(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        // clap adds a "For more information" line after its own one-line error.
        assert!(err.lines().next().unwrap_or("").contains(needle), "{args:?}: the first line names it: {err}");
    }
}

#[test]
fn generate_shows_both_texts_and_judges_where_they_part() {
    let model = real_model_or_skip!();
    let m = model.to_str().unwrap();
    let haiku = "Write a haiku about GPU computing";
    // Clean: the same text, or a parting that the teacher-forced comparison calls a near tie.
    let o = parity(&["generate", "--model", m, "--prompt", haiku, "--chat", "-n", "12"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("--- llama.cpp (12 tokens) ---") && out.contains("--- ours (cpu, 12 tokens) ---"), "{out}");
    assert!(out.contains("SAME: both engines generated the same 12 tokens") || out.contains("NEAR TIE"), "{out}");
    // A bug: the parting is a real divergence, its op named, exit 1.
    let o = parity(&["generate", "--model", m, "--prompt", haiku, "--chat", "-n", "8", "--fault", "rope-adjacent@3"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("first difference: generated token"), "{out}");
    assert!(out.contains("FIRST DIVERGENCE: prefill, layer 3, q_rope"), "{out}");
    assert!(out.contains("reproduce: parity run --prompt"), "{out}");
    assert!(out.lines().filter(|l| l.contains("top-5:")).count() == 2, "both sides' top-5: {out}");
}
