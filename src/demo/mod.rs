//! `miadpo demo` (issue 8): the MIA-DPO recipe in miniature on a synthetic world. So far: the world
//! (`world.rs`); initialisation, SFT, evaluation and the end-to-end run come next.
pub mod world;
