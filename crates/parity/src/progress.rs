//! Progress of the long tasks (model load, capture, weights, calibrate,
//! gate, selftest, ...), always on stderr: stdout carries the reports and
//! tables that tests and scripts parse.
//!
//! When stderr is a terminal, each task is a bar (position/total, elapsed,
//! ETA, the current item) redrawn in place; the bars of nested tasks stack
//! (a gate's prompts above llama.cpp's decode steps), and [`note`] prints a
//! line above them. Elsewhere (CI logs, pipes) a task prints plain lines and
//! never a carriage return: a start line, milestones (every item, or every
//! tenth of the total) and a done line with the time.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What a task counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Things, named in the plural ("tensors", "prompts").
    Items(&'static str),
    /// Bytes of a file (shown in KiB/MiB/GiB).
    Bytes,
}

/// When a task without a terminal prints a line between its start and done lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Milestones {
    /// After every item: for tasks of a few slow items whose messages carry
    /// information (a gate's verdict per prompt).
    EveryItem,
    /// Each time another tenth of the total is done: for many quick items
    /// (tensors, bytes), where a line per item would flood a CI log.
    EveryTenth,
}

/// One long task's progress. Dropped unfinished (an error), it leaves no
/// done line: the error says what happened.
pub struct Progress {
    task: String,
    total: u64,
    position: u64,
    unit: Unit,
    started: Instant,
    out: Output,
}

enum Output {
    Bar(ProgressBar),
    Lines(Lines),
    Finished,
}

struct Lines {
    writer: Box<dyn Write + Send>,
    milestones: Milestones,
    /// No milestone before the task has run this long: a task that ends
    /// sooner (the CPU oracle's weights, mapped not copied) prints its
    /// start and done lines only.
    quiet_for: Duration,
    /// The last tenth of the total reported (`EveryTenth`).
    tenth: u64,
}

/// How long a task runs before it prints milestone lines (not on a terminal).
const QUIET_FOR: Duration = Duration::from_secs(1);

/// Every bar belongs to this one set, so that nested bars stack instead of
/// overwriting each other, and [`note`] can print above them.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// Print `line` on stderr, above any bars drawn (they are redrawn below it).
/// Messages printed while a task runs go through here; a plain `eprintln!`
/// would be overwritten by the next redraw of a bar.
pub fn note(line: &str) {
    if stderr_is_terminal() {
        bars().suspend(|| eprintln!("{line}"));
    } else {
        eprintln!("{line}");
    }
}

impl Progress {
    /// A task of `total` units on stderr: a bar on a terminal, lines elsewhere.
    /// `total` 0 means not known yet ([`Progress::set`] can give it).
    pub fn new(task: impl Into<String>, total: u64, unit: Unit, milestones: Milestones) -> Progress {
        let task = task.into();
        if !stderr_is_terminal() {
            let mut progress = Progress::lines(task, total, unit, milestones, Box::new(std::io::stderr()));
            if let Output::Lines(lines) = &mut progress.out {
                lines.quiet_for = QUIET_FOR;
            }
            return progress;
        }
        let template = match unit {
            Unit::Items(name) => format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {name} ({{elapsed}}, ETA {{eta}}) {{msg}}"),
            Unit::Bytes => "{prefix} [{bar:30}] {bytes}/{total_bytes} ({elapsed}, ETA {eta}) {msg}".to_string(),
        };
        // The template is a constant of this function: a bad one is a bug here, shown plainly.
        let style = ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ");
        let bar = bars().add(ProgressBar::new(total).with_style(style).with_prefix(task.clone()));
        // Redrawn while an item is slow (one llama.cpp forward pass), so
        // that the elapsed time keeps moving.
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress { task, total, position: 0, unit, started: Instant::now(), out: Output::Bar(bar) }
    }

    /// The plain-lines form, written to `writer` (stderr when it is not a
    /// terminal; a buffer in tests). Prints the start line. Milestones are
    /// printed from the start (`new` waits `QUIET_FOR` first).
    pub fn lines(task: impl Into<String>, total: u64, unit: Unit, milestones: Milestones, writer: Box<dyn Write + Send>) -> Progress {
        let mut progress = Progress {
            task: task.into(),
            total,
            position: 0,
            unit,
            started: Instant::now(),
            out: Output::Lines(Lines { writer, milestones, quiet_for: Duration::ZERO, tenth: 0 }),
        };
        let start = if total > 0 { format!("{}: started, {}", progress.task, progress.amount(total)) } else { format!("{}: started", progress.task) };
        progress.write_line(&start);
        progress
    }

    /// `position` of `total` units done, now at `message` (the current item;
    /// may be empty).
    pub fn set(&mut self, position: u64, total: u64, message: &str) {
        self.position = position;
        self.total = total;
        match &mut self.out {
            Output::Bar(bar) => {
                bar.set_length(total);
                bar.set_position(position);
                bar.set_message(message.to_string());
            }
            Output::Lines(lines) => {
                if self.started.elapsed() < lines.quiet_for {
                    return;
                }
                let due = match lines.milestones {
                    Milestones::EveryItem => true,
                    // The last tenth is the done line's.
                    Milestones::EveryTenth => {
                        let tenth = position.saturating_mul(10).checked_div(total).unwrap_or(0);
                        let due = tenth > lines.tenth && position < total;
                        if due {
                            lines.tenth = tenth;
                        }
                        due
                    }
                };
                if due {
                    let line = self.milestone_line(message);
                    self.write_line(&line);
                }
            }
            Output::Finished => {}
        }
    }

    /// One more unit done, now at `message`.
    pub fn advance(&mut self, message: &str) {
        self.set(self.position + 1, self.total, message);
    }

    /// Seconds since the task started.
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// End the task with the line `"<task>: <what> in <seconds> s"`, kept on
    /// a terminal too (the bar itself is cleared).
    pub fn finish(mut self, what: &str) {
        let line = format!("{}: {what} in {:.1} s", self.task, self.elapsed_s());
        match std::mem::replace(&mut self.out, Output::Finished) {
            Output::Bar(bar) => {
                bar.finish_and_clear();
                bars().remove(&bar);
                note(&line);
            }
            Output::Lines(mut lines) => {
                // Progress lines are best effort: a closed stderr must not fail the task.
                let _ = writeln!(lines.writer, "{line}");
            }
            Output::Finished => {}
        }
    }

    fn milestone_line(&self, message: &str) -> String {
        let elapsed = self.elapsed_s();
        let counts = match self.unit {
            Unit::Items(_) => format!("[{}/{}]", self.position, self.total),
            Unit::Bytes => format!("[{}/{}]", bytes(self.position), bytes(self.total)),
        };
        let percent = (self.position.saturating_mul(100)).checked_div(self.total).map_or(String::new(), |p| format!(" {p}%"));
        let eta = if self.position > 0 && self.total >= self.position {
            let left = elapsed / self.position as f64 * (self.total - self.position) as f64;
            format!(", ETA {left:.0} s")
        } else {
            String::new()
        };
        let message = if message.is_empty() { String::new() } else { format!(" {message}") };
        format!("{} {counts}{percent}{message} ({elapsed:.1} s{eta})", self.task)
    }

    fn amount(&self, n: u64) -> String {
        match self.unit {
            Unit::Items(name) => format!("{n} {name}"),
            Unit::Bytes => bytes(n),
        }
    }

    fn write_line(&mut self, line: &str) {
        if let Output::Lines(lines) = &mut self.out {
            let _ = writeln!(lines.writer, "{line}");
        }
    }
}

/// llama.cpp's prefill and decode steps (`LlamaRef::run`), with progress
/// by forward pass; its done line gives the work and the time.
pub fn llama_capture(
    llama: &llama_ref::LlamaRef,
    tokens: &[i32],
    n_decode: usize,
    opts: &llama_ref::RefOptions,
) -> Result<capture::Capture, llama_ref::LlamaError> {
    let passes = n_decode as u64 + 1;
    let mut progress = Progress::new("llama.cpp", passes, Unit::Items("forward passes"), Milestones::EveryTenth);
    let captured = llama.run_observed(tokens, n_decode, opts, &mut |done, total| progress.set(done as u64, total as u64, ""))?;
    progress.finish(&format!("{} prompt tokens + {n_decode} decode steps", tokens.len()));
    Ok(captured)
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Output::Bar(bar) = &self.out {
            bar.finish_and_clear();
            bars().remove(bar);
        }
    }
}

/// A byte count for people: "469.4 MiB".
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer whose bytes the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            assert!(!text.contains('\r'), "a carriage return in plain lines: {text:?}");
            text.lines().map(str::to_string).collect()
        }
    }

    #[test]
    fn a_counted_task_prints_start_tenths_and_done() {
        let out = Captured::default();
        let mut p = Progress::lines("weights", 20, Unit::Items("tensors"), Milestones::EveryTenth, Box::new(out.clone()));
        for i in 0..20 {
            p.advance(&format!("t{i}"));
        }
        p.finish("20 tensors checked");
        let lines = out.lines();
        assert_eq!(lines[0], "weights: started, 20 tensors");
        // tenths 1..=9 of 20 items: after items 2, 4, ..., 18; the 10th tenth is the done line
        let milestones = &lines[1..lines.len() - 1];
        assert_eq!(milestones.len(), 9, "{lines:#?}");
        assert!(milestones[0].starts_with("weights [2/20] 10% t1 ("), "{}", milestones[0]);
        assert!(milestones[8].starts_with("weights [18/20] 90% t17 ("), "{}", milestones[8]);
        assert!(milestones[8].contains(" s, ETA "), "{}", milestones[8]);
        let done = lines.last().unwrap();
        assert!(done.starts_with("weights: 20 tensors checked in ") && done.ends_with(" s"), "{done}");
    }

    #[test]
    fn an_item_task_prints_every_item_with_its_message() {
        let out = Captured::default();
        let mut p = Progress::lines("gate", 3, Unit::Items("prompts"), Milestones::EveryItem, Box::new(out.clone()));
        for verdict in ["match", "DIVERGED", "match"] {
            p.advance(verdict);
        }
        p.finish("3 prompts judged");
        let lines = out.lines();
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert_eq!(lines[0], "gate: started, 3 prompts");
        assert!(lines[1].starts_with("gate [1/3] 33% match ("), "{}", lines[1]);
        assert!(lines[2].starts_with("gate [2/3] 66% DIVERGED ("), "{}", lines[2]);
        assert!(lines[3].starts_with("gate [3/3] 100% match ("), "{}", lines[3]);
        assert!(lines[4].starts_with("gate: 3 prompts judged in "), "{}", lines[4]);
    }

    #[test]
    fn a_byte_task_prints_sizes_and_a_task_of_unknown_total_still_starts_and_ends() {
        let out = Captured::default();
        let mut p = Progress::lines("sha256 m.gguf", 10 << 20, Unit::Bytes, Milestones::EveryTenth, Box::new(out.clone()));
        p.set(5 << 20, 10 << 20, "");
        p.finish("hashed");
        let lines = out.lines();
        assert_eq!(lines[0], "sha256 m.gguf: started, 10.0 MiB");
        assert!(lines[1].starts_with("sha256 m.gguf [5.0 MiB/10.0 MiB] 50% ("), "{}", lines[1]);
        assert_eq!(lines.len(), 3);

        let out = Captured::default();
        let mut p = Progress::lines("load", 0, Unit::Items("weights"), Milestones::EveryTenth, Box::new(out.clone()));
        p.set(0, 0, "");
        drop(p);
        assert_eq!(out.lines(), ["load: started"], "an unfinished task has no done line");
    }

    #[test]
    fn a_task_shorter_than_its_quiet_period_prints_start_and_done_only() {
        let out = Captured::default();
        let mut p = Progress::lines("ours-cpu", 0, Unit::Items("weights"), Milestones::EveryTenth, Box::new(out.clone()));
        if let Output::Lines(lines) = &mut p.out {
            lines.quiet_for = Duration::from_secs(3600);
        }
        for i in 1..=10 {
            p.set(i, 10, "");
        }
        p.finish("weights loaded");
        let lines = out.lines();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert_eq!(lines[0], "ours-cpu: started");
        assert!(lines[1].starts_with("ours-cpu: weights loaded in "), "{}", lines[1]);
    }

    #[test]
    fn byte_counts_read_as_people_write_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(491_400_064), "468.6 MiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}
