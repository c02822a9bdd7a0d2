//! `cargo run --release -p gguf --example dump -- FILE`: print a GGUF's
//! metadata summary and tensor list (the library's view, without the CLI).
use gguf::{GgufFile, Qwen2Config};
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: dump FILE.gguf");
        return ExitCode::from(2);
    };
    let f = match GgufFile::open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "version {} alignment {} size {} tensors {}",
        f.version(),
        f.alignment(),
        f.file_size(),
        f.tensors().len()
    );
    for (k, v) in f.metadata() {
        println!("{k:50} {:10} {}", v.type_name(), v.summary());
    }
    for t in f.tensors() {
        println!(
            "{:40} {:6} {:?} {} bytes @ {}",
            t.name,
            t.ggml_type.name(),
            t.dims,
            t.n_bytes,
            t.offset
        );
    }
    match Qwen2Config::from_gguf(&f) {
        Ok(c) => println!("{c:?}"),
        Err(e) => println!("config: {e}"),
    }
    ExitCode::SUCCESS
}
