//! miadpo: MIA-DPO (multi-image augmented direct preference optimization) for LLaVA models on a
//! small handwritten transformer runtime. See docs/ARCHITECTURE.md for the map of the crate.
pub mod error;
pub mod model;
pub mod opbench;
pub mod vision;

pub use error::{Error, Result};
pub mod augment;
pub mod backend;
pub mod bench;
pub mod cuda;
pub mod data;
pub mod demo;
pub mod eval;
pub mod plot;
pub mod select;
pub mod text;
pub mod train;
