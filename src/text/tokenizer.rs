//! The checkpoint's `tokenizer.json` and the prompt/pair layout of DESIGN.md.
use std::path::{Path, PathBuf};

use super::Template;
use crate::error::{Error, Result};
use crate::model::config::LlavaConfig;

/// The placeholder a prompt carries once per image.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

pub struct TextTokenizer {
    tok: tokenizers::Tokenizer,
    path: PathBuf,
    pub bos: u32,
    pub eos: u32,
    pub image_token_id: u32,
    pub image_seq_length: usize,
}

/// A tokenized prompt: ids and the `[start, end)` token span of every image, in prompt order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptIds {
    pub ids: Vec<u32>,
    pub image_spans: Vec<(usize, usize)>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and checks that its `<image>` token is the config's image token.
    pub fn from_file(path: &Path, cfg: &LlavaConfig) -> Result<Self> {
        if !path.exists() {
            return Err(Error::file(path, "tokenizer.json not found in the model folder"));
        }
        let tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::file(path, format!("cannot load tokenizer: {e}")))?;
        match tok.token_to_id(IMAGE_PLACEHOLDER) {
            Some(id) if id == cfg.image_token_id => {}
            Some(id) => {
                return Err(Error::file(
                    path,
                    format!(
                        "`<image>` is token {id} but config.json says {}",
                        cfg.image_token_id
                    ),
                ))
            }
            None => return Err(Error::file(path, "the tokenizer has no `<image>` token")),
        }
        Ok(TextTokenizer {
            tok,
            path: path.to_path_buf(),
            bos: cfg.text.bos_token_id,
            eos: cfg.text.eos_token_id,
            image_token_id: cfg.image_token_id,
            image_seq_length: cfg.image_seq_length,
        })
    }

    /// Token ids of `text`, no special tokens added (as HF's `add_special_tokens=False`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| Error::file(&self.path, format!("cannot tokenize {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` with special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok
            .decode(ids, true)
            .map_err(|e| Error::file(&self.path, format!("cannot decode {ids:?}: {e}")))
    }

    /// `[BOS] + tokens(template(question))` with each `<image>` expanded to `image_seq_length` ids.
    /// `n_images` must equal the number of `<image>` placeholders; `id` names the sample in errors.
    pub fn prompt(&self, template: Template, question: &str, n_images: usize, id: &str) -> Result<PromptIds> {
        let found = question.matches(IMAGE_PLACEHOLDER).count();
        if found != n_images {
            return Err(Error::sample(
                id,
                format!("the prompt has {found} `<image>` placeholder(s) but {n_images} image(s) were given"),
            ));
        }
        let expanded = template.apply(question).replace(
            IMAGE_PLACEHOLDER,
            &IMAGE_PLACEHOLDER.repeat(self.image_seq_length),
        );
        let mut ids = vec![self.bos];
        ids.extend(self.encode(&expanded)?);
        let image_spans = image_spans(&ids, self.image_token_id, self.image_seq_length);
        if image_spans.len() != n_images {
            return Err(Error::sample(
                id,
                format!(
                    "the tokenized prompt holds {} image span(s), expected {n_images} (does the text contain the image token itself?)",
                    image_spans.len()
                ),
            ));
        }
        Ok(PromptIds { ids, image_spans })
    }

    /// `tokens(response) + [EOS]`: the response tokenized on its own (so it starts with its own '▁').
    pub fn response(&self, response: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(response)?;
        ids.push(self.eos);
        Ok(ids)
    }
}

/// Splits the runs of `image_token_id` into spans of `per_image` tokens (consecutive images form one run).
pub fn image_spans(ids: &[u32], image_token_id: u32, per_image: usize) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] == image_token_id {
            let start = i;
            while i < ids.len() && ids[i] == image_token_id {
                i += 1;
            }
            let mut s = start;
            while s < i {
                spans.push((s, (s + per_image).min(i)));
                s += per_image;
            }
        } else {
            i += 1;
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_split_adjacent_images() {
        let ids = [1, 9, 9, 9, 9, 5, 9, 9, 3];
        assert_eq!(image_spans(&ids, 9, 2), vec![(1, 3), (3, 5), (6, 8)]);
    }
}
