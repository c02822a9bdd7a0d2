//! Recorded decode steps: a CUDA graph of one single-token pass that no
//! checkpoint observes, replayed for every later step.
//!
//! A decode step launches about 400 small kernels; issued one by one from
//! the host, each costs more host time (allocation, launch) than the GPU
//! needs to run it, so the step is bound by the host. Recorded once with
//! stream capture and replayed as one graph, the step costs one launch.
//!
//! What changes between steps reaches the recorded kernels through device
//! memory: the token id (`token`, read by the embedding lookup) and the
//! position (`pos`, added by rope, the KV store and attention to the
//! positions they were recorded with, which are stored relative to the
//! recorded step's: see `CudaBackend::position`). Every buffer of the pass
//! is allocated inside the graph (graph memory nodes) and freed inside it,
//! except the logits, which the host copies after each replay and then
//! frees, as a graph must free what it allocated before it is launched
//! again. Recording needs the fused attention at every length the cache can
//! reach (`max_ctx` at most `FUSED_ATTENTION_MAX_KV`): the recorded kernel
//! reserves shared memory for the longest row.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaGraph, CudaSlice};

/// Why a backend does not record, or what it has recorded.
pub(super) enum Recording {
    /// Never records (the reason, for `recording_status`).
    Off(String),
    /// May record the next unobserved decode step.
    Idle,
    /// Capturing the pass of the step at `pos0`, for `key`.
    Capturing { key: u64, pos0: usize },
    Ready(StepGraph),
}

/// A recorded decode step.
pub(super) struct StepGraph {
    /// The model-side settings it was recorded under (fault, numerics).
    pub key: u64,
    pub graph: CudaGraph,
    /// The graph-allocated logits, `[1, n_vocab]`: valid after a launch
    /// until freed.
    pub logits: CUdeviceptr,
}

/// The device memory the recorded kernels read what changes per step from.
pub(super) struct StepInputs {
    pub token: CudaSlice<i32>,
    pub pos: CudaSlice<i32>,
}
