//! MIA-DPO's second stage: attention-aware selection of rejected answers, and post-selection.
pub mod filters;
pub mod ratio;
pub mod run;

pub use filters::PostSelect;
pub use run::{run, SelectOptions, SelectSummary, Shard};
