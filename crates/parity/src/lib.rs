//! The parity library: model resolution, metrics, alignment, localization,
//! thresholds and reports. The `parity` binary is a thin CLI over it.

pub mod cmd;
pub mod diff;
pub mod metrics;
pub mod model_path;
pub mod report;
pub mod thresholds;
pub mod ours;
