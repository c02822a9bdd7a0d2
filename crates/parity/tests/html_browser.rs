//! The HTML report in a real browser (headless Debian `chromium`): it loads
//! with no console message (no script error, no SVG attribute the browser
//! rejects), its heatmap has one cell per (layer, stage) and global stage
//! per step, and only a divergence marks a cell as the first divergence,
//! the one the verdict links to.
//!
//! The page is loaded inside a probe page whose script counts with
//! `querySelectorAll` what the browser parsed; `--dump-dom` returns the
//! count. Console messages of both pages come on stderr as `CONSOLE` lines
//! (`--enable-logging=stderr --v=0`). Without chromium the tests record a
//! skip, unless `PARITY_REQUIRE_BROWSER=1` (CI) makes that a failure.

#[macro_use]
mod common;
use common::parity;

use capture::Stage;
use std::path::{Path, PathBuf};
use std::process::Command;

const HAIKU: &str = "Write a haiku about GPU computing";

/// The browser, or `None` after recording the skip.
fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser"].iter().find_map(|name| {
        let ok = Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success());
        ok.then(|| PathBuf::from(name))
    });
    if found.is_none() {
        if std::env::var_os("PARITY_REQUIRE_BROWSER").is_some_and(|v| v == "1") {
            panic!("PARITY_REQUIRE_BROWSER=1 but chromium is not installed (scripts/install-deps installs it)");
        }
        testkit::skip("chromium not installed (apt-get install chromium)");
    }
    found
}

/// Headless, offline, and a fresh profile per load.
fn browser(chromium: &Path, profile: &Path) -> Command {
    let mut c = Command::new(chromium);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ]);
    c.arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// What the browser saw in one report.
#[derive(Debug)]
struct Loaded {
    /// `CONSOLE` lines from stderr: every console message of either page.
    console: Vec<String>,
    /// Counted by the probe's script in the report's DOM.
    probe: serde_json::Value,
}

const PROBE: &str = r##"<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="report" src="REPORT" width="1400" height="900"></iframe>
<script>
window.addEventListener("load", function () {
  var out = {};
  try {
    var d = document.getElementById("report").contentDocument;
    out.cells = d.querySelectorAll("svg rect.cell").length;
    out.first = Array.prototype.map.call(d.querySelectorAll("[data-first-divergence]"), function (e) {
      return [e.id, e.getAttribute("data-step"), e.getAttribute("data-layer"), e.getAttribute("data-stage")];
    });
    out.links_to_first = d.querySelectorAll('a[href="#first-divergence-cell"]').length;
    out.drilldowns = d.querySelectorAll("details.drill").length;
    out.configuration = !!d.getElementById("configuration");
    out.contents = d.querySelectorAll("nav.toc").length;
    out.external = d.querySelectorAll("script, link, img, iframe, [src]").length;
  } catch (e) {
    out.error = String(e);
  }
  document.getElementById("result").textContent = JSON.stringify(out);
});
</script></body></html>"##;

/// Load `report` (an HTML file) in chromium through the probe page.
fn load(chromium: &Path, report: &Path) -> Loaded {
    let dir = report.parent().expect("report in a directory");
    let name = report.file_name().and_then(|n| n.to_str()).expect("report name");
    let probe = dir.join(format!("probe-{name}"));
    std::fs::write(&probe, PROBE.replace("REPORT", name)).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let out = browser(chromium, profile.path())
        // The probe reads the report's DOM: both are file:// pages.
        .args(["--allow-file-access-from-files", "--enable-logging=stderr", "--v=0", "--dump-dom"])
        .arg(format!("file://{}", probe.display()))
        .output()
        .expect("run chromium");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {stderr}");
    let console = stderr.lines().filter(|l| l.contains(":CONSOLE")).map(str::to_string).collect();
    let result = stdout
        .split("<pre id=\"result\">")
        .nth(1)
        .and_then(|rest| rest.split("</pre>").next())
        .unwrap_or_else(|| panic!("no probe result in the dumped DOM:\n{stdout}\n{stderr}"));
    let probe: serde_json::Value =
        serde_json::from_str(&result.replace("&amp;", "&")).unwrap_or_else(|e| panic!("probe result {result:?}: {e}"));
    assert!(probe.get("error").is_none(), "probe script: {probe}");
    Loaded { console, probe }
}

/// The check that the reports pass must fail on a broken page: a console
/// error, a script error, an SVG attribute the browser rejects.
#[test]
fn a_page_with_console_errors_is_caught() {
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("broken.html");
    std::fs::write(
        &page,
        r#"<!DOCTYPE html><html><body><svg><rect class="cell" x="NaN" width="1" height="1"/></svg>
<script>console.error("deliberate console error"); no_such_function();</script></body></html>"#,
    )
    .unwrap();
    let loaded = load(&chromium, &page);
    let all = loaded.console.join("\n");
    assert!(all.contains("deliberate console error"), "{all}");
    assert!(all.contains("no_such_function"), "{all}");
    assert!(all.contains("attribute x"), "{all}");
    assert_eq!(loaded.probe["cells"], 1);
    assert_eq!(loaded.probe["external"], 1, "the script counts as external content");
}

fn run_report(model: &Path, dir: &Path, name: &str, extra: &[&str]) -> (PathBuf, Option<i32>, String) {
    let html = dir.join(name);
    let mut args = vec!["run", "--model", model.to_str().unwrap(), "--prompt", HAIKU, "--layer", "0", "--html", html.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = parity(&args);
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    (html, o.status.code(), text)
}

/// Cells of `steps` steps of one layer: its stages and the global ones.
fn cells(steps: usize) -> u64 {
    (steps * (Stage::PER_LAYER.len() + Stage::GLOBAL.len())) as u64
}

#[test]
fn match_report_loads_clean_with_no_divergence_marked() {
    let Some(chromium) = chromium() else { return };
    let model = real_model_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let (html, code, text) = run_report(&model, dir.path(), "match.html", &["--decode", "2"]);
    assert_eq!(code, Some(0), "{text}");
    let loaded = load(&chromium, &html);
    assert!(loaded.console.is_empty(), "console messages: {:?}", loaded.console);
    let p = &loaded.probe;
    assert_eq!(p["cells"], cells(3), "{p}");
    assert_eq!(p["first"], serde_json::json!([]), "{p}");
    assert_eq!(p["links_to_first"], 0, "{p}");
    assert!(p["drilldowns"].as_u64().unwrap() >= 1, "the stages nearest their gates: {p}");
    assert_eq!(p["configuration"], true, "{p}");
    assert_eq!(p["contents"], 1, "three steps have a table of contents: {p}");
    assert_eq!(p["external"], 0, "self-contained: {p}");
}

#[test]
fn divergence_report_marks_the_first_divergent_cell() {
    let Some(chromium) = chromium() else { return };
    let model = real_model_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let (html, code, text) = run_report(&model, dir.path(), "divergence.html", &["--fault", "rope-adjacent@0"]);
    assert_eq!(code, Some(1), "{text}");
    let loaded = load(&chromium, &html);
    assert!(loaded.console.is_empty(), "console messages: {:?}", loaded.console);
    let p = &loaded.probe;
    assert_eq!(p["cells"], cells(1), "{p}");
    assert_eq!(p["first"], serde_json::json!([["first-divergence-cell", "0", "0", "q_rope"]]), "{p}");
    assert!(p["links_to_first"].as_u64().unwrap() >= 1, "the verdict links to the cell: {p}");
    assert!(p["drilldowns"].as_u64().unwrap() >= 2, "q_rope and its input q_proj: {p}");
    assert_eq!(p["contents"], 0, "one step: no table of contents: {p}");
    assert_eq!(p["external"], 0, "self-contained: {p}");
}
