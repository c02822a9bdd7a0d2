//! Where the CUDA backend's time goes, with `QWEN2_PARITY_CUDA_PROFILE=1`.
//!
//! Each op is bracketed by two events recorded on the stream, so the pass
//! runs as it would without the profile (no synchronization per op); the
//! events are read back in batches. Per op it reports
//! - **GPU time**: from the op's first event to its last. When the host
//!   issues launches more slowly than the GPU runs them, the GPU waits
//!   inside that span, so it is an upper bound of the op's kernel time;
//! - **host time**: the wall time spent in the op's call (argument checks,
//!   allocation, the launches themselves). A pass whose host time is close
//!   to its wall time is bound by issuing launches, not by the kernels.

use anyhow::{Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

/// Event pairs held before they are read back (each read waits for its events).
const SETTLE_EVERY: usize = 4096;

#[derive(Default, Clone, Copy)]
struct OpTime {
    calls: u64,
    gpu_s: f64,
    host_s: f64,
}

/// An op being timed: its start event and when its call began.
pub(super) struct OpTimer {
    event: CudaEvent,
    began: Instant,
}

#[derive(Default)]
pub(super) struct Profile {
    table: RefCell<BTreeMap<&'static str, OpTime>>,
    /// (op, start, end) not read back yet.
    pending: RefCell<Vec<(&'static str, CudaEvent, CudaEvent)>>,
}

impl Profile {
    /// Some profile when `QWEN2_PARITY_CUDA_PROFILE=1`.
    pub(super) fn from_env() -> Option<Profile> {
        (std::env::var("QWEN2_PARITY_CUDA_PROFILE").as_deref() == Ok("1")).then(Profile::default)
    }

    pub(super) fn start(&self, stream: &CudaStream) -> Result<OpTimer> {
        let began = Instant::now();
        let event = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).context("recording a profile event")?;
        Ok(OpTimer { event, began })
    }

    pub(super) fn end(&self, op: &'static str, timer: OpTimer, stream: &CudaStream) -> Result<()> {
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).context("recording a profile event")?;
        let host = timer.began.elapsed().as_secs_f64();
        let e = &mut *self.table.borrow_mut();
        let row = e.entry(op).or_default();
        row.calls += 1;
        row.host_s += host;
        let full = {
            let mut p = self.pending.borrow_mut();
            p.push((op, timer.event, end));
            p.len() >= SETTLE_EVERY
        };
        if full {
            self.settle_into(e)?;
        }
        Ok(())
    }

    /// Read back every pending event pair (waits for them).
    fn settle_into(&self, table: &mut BTreeMap<&'static str, OpTime>) -> Result<()> {
        for (op, start, end) in self.pending.borrow_mut().drain(..) {
            let ms = start.elapsed_ms(&end).context("reading profile events")?;
            table.entry(op).or_default().gpu_s += f64::from(ms) / 1e3;
        }
        Ok(())
    }

    /// The table, largest GPU time first (waits for every pending event).
    pub(super) fn report(&self, device: &str) -> Result<String> {
        let mut table = self.table.borrow_mut();
        self.settle_into(&mut table)?;
        let gpu: f64 = table.values().map(|t| t.gpu_s).sum();
        let host: f64 = table.values().map(|t| t.host_s).sum();
        let mut rows: Vec<_> = table.iter().map(|(op, t)| (*op, *t)).collect();
        rows.sort_by(|a, b| b.1.gpu_s.total_cmp(&a.1.gpu_s));
        let mut out = format!(
            "cuda profile ({device}): {:.3} s GPU (event to event, per op), {:.3} s host in op calls\n  {:<28} {:>8} {:>11} {:>6} {:>11} {:>9}\n",
            gpu, host, "op", "calls", "GPU ms", "GPU %", "host ms", "host/call"
        );
        for (op, t) in rows {
            out += &format!(
                "  {op:<28} {:>8} {:>11.3} {:>5.1}% {:>11.3} {:>7.1} us\n",
                t.calls,
                t.gpu_s * 1e3,
                100.0 * t.gpu_s / gpu.max(1e-12),
                t.host_s * 1e3,
                1e6 * t.host_s / t.calls.max(1) as f64
            );
        }
        Ok(out)
    }
}
