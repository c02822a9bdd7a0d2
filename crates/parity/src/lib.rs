//! The parity library: model resolution, metrics, alignment, localization,
//! thresholds and reports. The `parity` binary is a thin CLI over it: `cmd/`
//! only parses arguments and prints.

pub mod cache;
pub mod chunked;
pub mod calibration;
pub mod cmd;
pub mod diagnosis;
pub mod diff;
pub mod drilldown;
pub mod fixtures;
pub mod gate;
pub mod generate;
pub mod layers;
pub mod metrics;
pub mod model_path;
pub mod ours;
pub mod progress;
pub mod prompts;
pub mod report;
pub mod selftest;
pub mod session;
pub mod side_by_side;
pub mod thresholds;
pub mod variants;
pub mod verdict;
pub mod verdict_bench;
pub mod weights;
