//! Tokenizer (HF `tokenizer.json` through the `tokenizers` crate) and conversation templates.
pub mod template;
pub mod tokenizer;

pub use template::Template;
pub use tokenizer::TextTokenizer;
