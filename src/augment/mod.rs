//! MIA-DPO's first stage: single-image LLaVA instruction data -> multi-image prompts (sequence, grid
//! collage, pic-in-pic) with the metadata the selection stage reads.
pub mod compose;
pub mod llava_json;
pub mod plan;
pub mod prompt;
pub mod run;

pub use plan::{Companions, Kind};
pub use run::{run, AugmentOptions, Summary};
