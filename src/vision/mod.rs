//! Image decoding and the CLIP image processor.
pub mod preprocess;
pub mod resample;
