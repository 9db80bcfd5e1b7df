//! MIA-DPO's third stage: DPO with LoRA (issue 5). So far: the losses and their gradients.
pub mod adapter;
pub mod backward;
pub mod checkpoint;
pub mod data;
pub mod dpo;
pub mod optim;
pub mod trainer;
