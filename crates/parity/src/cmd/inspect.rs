//! `parity inspect`: a GGUF's header, Qwen2 config, metadata and tensors.

use anyhow::Result;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use gguf::{GgufFile, MetadataValue, Qwen2Config};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model (default: the cached reference model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Arrays longer than this are shown as `[N x type]` only.
const MAX_ARRAY_ITEMS_SHOWN: usize = 64;

fn short_value(v: &MetadataValue) -> String {
    match v {
        MetadataValue::Array(items) if items.len() > MAX_ARRAY_ITEMS_SHOWN => {
            let elem = items
                .first()
                .map(|i| i.type_name())
                .unwrap_or_else(|| "?".into());
            format!("[{} x {}]", items.len(), elem)
        }
        other => other.summary(),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn shape(dims: &[u64]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

#[derive(Default)]
struct TypeTotal {
    tensors: usize,
    elements: u64,
    bytes: u64,
}

fn totals(f: &GgufFile) -> BTreeMap<&'static str, TypeTotal> {
    let mut by_type: BTreeMap<&'static str, TypeTotal> = BTreeMap::new();
    for t in f.tensors() {
        let e = by_type.entry(t.ggml_type.name()).or_default();
        e.tensors += 1;
        e.elements += t.n_elements;
        e.bytes += t.n_bytes;
    }
    by_type
}

fn config_json(c: &Qwen2Config) -> serde_json::Value {
    serde_json::json!({
        "n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "n_head_kv": c.n_head_kv,
        "head_dim": c.head_dim, "n_ff": c.n_ff, "n_vocab": c.n_vocab, "rope_freq_base": c.rope_freq_base,
        "rms_eps": c.rms_eps, "n_ctx_train": c.n_ctx_train, "tied_output": c.tied_output,
    })
}

fn render_json(
    f: &GgufFile,
    config: &std::result::Result<Qwen2Config, gguf::GgufError>,
) -> Result<String> {
    let metadata: Vec<_> = f
        .metadata()
        .iter()
        .map(|(k, v)| serde_json::json!({ "key": k, "type": v.type_name(), "value": short_value(v) }))
        .collect();
    let tensors: Vec<_> = f
        .tensors()
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name, "type": t.ggml_type.name(), "dims": t.dims,
                "elements": t.n_elements, "bytes": t.n_bytes, "offset": t.offset,
            })
        })
        .collect();
    let by_type: serde_json::Map<String, serde_json::Value> = totals(f)
        .into_iter()
        .map(|(k, v)| {
            (k.to_string(), serde_json::json!({ "tensors": v.tensors, "elements": v.elements, "bytes": v.bytes }))
        })
        .collect();
    let (cfg, cfg_err) = match config {
        Ok(c) => (config_json(c), serde_json::Value::Null),
        Err(e) => (
            serde_json::Value::Null,
            serde_json::Value::String(e.to_string()),
        ),
    };
    let doc = serde_json::json!({
        "file": f.path().display().to_string(),
        "size": f.file_size(),
        "version": f.version(),
        "alignment": f.alignment(),
        "architecture": f.architecture(),
        "config": cfg,
        "config_error": cfg_err,
        "metadata": metadata,
        "tensors": tensors,
        "totals_by_type": by_type,
    });
    Ok(serde_json::to_string_pretty(&doc)? + "\n")
}

fn render_text(f: &GgufFile, config: &std::result::Result<Qwen2Config, gguf::GgufError>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "file:         {}", f.path().display());
    let _ = writeln!(
        out,
        "size:         {} ({})",
        f.file_size(),
        human_bytes(f.file_size())
    );
    let _ = writeln!(out, "GGUF version: {}", f.version());
    let _ = writeln!(out, "alignment:    {}", f.alignment());
    let _ = writeln!(
        out,
        "architecture: {}",
        f.architecture().unwrap_or("(none)")
    );
    out.push('\n');
    match config {
        Ok(c) => {
            let _ = writeln!(out, "Qwen2 config:");
            let _ = writeln!(
                out,
                "  layers {}, hidden {}, heads {} (kv {}), head_dim {}, ffn {}",
                c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff
            );
            let _ = writeln!(
                out,
                "  vocab {}, context (train) {}, rope base {}, rms eps {:e}",
                c.n_vocab, c.n_ctx_train, c.rope_freq_base, c.rms_eps
            );
            let _ = writeln!(
                out,
                "  output: {}",
                if c.tied_output {
                    "tied to token_embd.weight"
                } else {
                    "separate output.weight"
                }
            );
        }
        Err(e) => {
            let _ = writeln!(out, "Qwen2 config: error: {e}");
        }
    }
    out.push('\n');

    let mut meta = Table::new();
    meta.load_preset(UTF8_FULL_CONDENSED);
    meta.set_header(vec!["key", "type", "value"]);
    for (k, v) in f.metadata() {
        meta.add_row(vec![
            Cell::new(k),
            Cell::new(v.type_name()),
            Cell::new(short_value(v)),
        ]);
    }
    let _ = writeln!(out, "metadata ({} keys):", f.metadata().len());
    let _ = writeln!(out, "{meta}");
    out.push('\n');

    let mut tensors = Table::new();
    tensors.load_preset(UTF8_FULL_CONDENSED);
    tensors.set_header(vec!["name", "type", "shape (ne0 first)", "bytes"]);
    for t in f.tensors() {
        tensors.add_row(vec![
            Cell::new(&t.name),
            Cell::new(t.ggml_type.name()),
            Cell::new(shape(&t.dims)),
            Cell::new(t.n_bytes).set_alignment(CellAlignment::Right),
        ]);
    }
    let _ = writeln!(out, "tensors ({}):", f.tensors().len());
    let _ = writeln!(out, "{tensors}");
    out.push('\n');

    let by_type = totals(f);
    let all_bytes: u64 = by_type.values().map(|t| t.bytes).sum();
    let mut tot = Table::new();
    tot.load_preset(UTF8_FULL_CONDENSED);
    tot.set_header(vec!["type", "tensors", "elements", "bytes", "share"]);
    let right = |s: String| Cell::new(s).set_alignment(CellAlignment::Right);
    for (ty, t) in &by_type {
        let share = if all_bytes == 0 {
            0.0
        } else {
            100.0 * t.bytes as f64 / all_bytes as f64
        };
        tot.add_row(vec![
            Cell::new(ty),
            right(t.tensors.to_string()),
            right(t.elements.to_string()),
            right(format!("{} ({})", t.bytes, human_bytes(t.bytes))),
            right(format!("{share:.1}%")),
        ]);
    }
    let n: usize = by_type.values().map(|t| t.tensors).sum();
    let e: u64 = by_type.values().map(|t| t.elements).sum();
    tot.add_row(vec![
        Cell::new("total"),
        right(n.to_string()),
        right(e.to_string()),
        right(format!("{all_bytes} ({})", human_bytes(all_bytes))),
        right("100.0%".into()),
    ]);
    let _ = writeln!(out, "totals by type:");
    let _ = writeln!(out, "{tot}");
    out
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let path = crate::model_path::resolve(args.model.as_deref())?;
    // GgufError messages already name the file.
    let f = GgufFile::open(&path)?;
    let config = Qwen2Config::from_gguf(&f);
    let text = if args.json {
        render_json(&f, &config)?
    } else {
        render_text(&f, &config)
    };
    // A closed pipe (`parity inspect | head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    match config {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(2))
        }
    }
}
