//! The Qwen2 engine: one forward pass over a backend interface, a checkpoint
//! at every stage of the catalogue, a CPU oracle backend and a CUDA backend.

pub mod arch;
pub mod backend;
pub mod checkpoint;
pub mod cpu;
pub mod cuda;
pub mod fault;
pub mod forward;
pub mod numerics;
pub mod stored;
