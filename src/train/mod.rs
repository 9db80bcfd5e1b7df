//! Training: MIA-DPO's third stage, DPO with LoRA (issue 5), and the supervised fine-tuning stage
//! (`--stage sft`, issue 8), sharing one step loop (`trainer::run_steps`).
pub mod adapter;
pub mod backward;
pub mod checkpoint;
pub mod data;
pub mod dpo;
pub mod optim;
pub mod sft;
pub mod trainer;
