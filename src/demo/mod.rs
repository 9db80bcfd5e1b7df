//! `miadpo demo` (issue 8): the MIA-DPO recipe in miniature on a synthetic world: the world
//! (`world.rs`) and the end-to-end run (`run.rs`: world, init, SFT, evaluation, augment, select, DPO,
//! evaluation, report).
pub mod run;
pub mod world;
