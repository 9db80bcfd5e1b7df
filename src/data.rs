//! MIA-DPO preference data (`{"id", "image", "prompt", "chosen", "rejected"}`) as a JSON list or
//! JSONL, and image-path resolution against `--image-root` folders.
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    pub id: String,
    /// image paths as written in the file (resolve with [`resolve_image`])
    pub images: Vec<String>,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// Reads a JSON list or a JSONL file of preference pairs; errors name the file and the sample.
pub fn load_pairs(path: &Path) -> Result<Vec<PreferencePair>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let trimmed = text.trim();
    if trimmed.starts_with('{') && trimmed.lines().count() > 1 {
        if let Ok(Value::Object(_)) = serde_json::from_str::<Value>(trimmed) {
            return Err(Error::file(
                path,
                "expected a JSON list of samples (or JSONL, one sample per line), found one JSON object",
            ));
        }
    }
    let records: Vec<(String, Value)> = if trimmed.starts_with('[') {
        let v: Value =
            serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
        let list = v
            .as_array()
            .ok_or_else(|| Error::file(path, "expected a JSON list of samples"))?;
        list.iter()
            .enumerate()
            .map(|(i, r)| (format!("#{i}"), r.clone()))
            .collect()
    } else {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .map_err(|e| Error::file(path, format!("line {}: not valid JSON: {e}", i + 1)))?;
            out.push((format!("line {}", i + 1), v));
        }
        out
    };
    if records.is_empty() {
        return Err(Error::file(path, "holds no samples"));
    }
    records
        .into_iter()
        .map(|(pos, r)| parse_pair(&r, &pos).map_err(|e| in_file(path, e)))
        .collect()
}

/// Prefixes a sample error with the file it came from.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Sample { id, msg } => Error::file(path, format!("sample `{id}`: {msg}")),
        other => other,
    }
}

/// A JSON file holding a list: its elements, or an error naming the file (`what`: what the list holds).
pub fn read_json_list(path: &Path, what: &str) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))? {
        Value::Array(list) => Ok(list),
        _ => Err(Error::file(path, format!("expected a JSON list of {what}"))),
    }
}

/// A sample's `"id"` as text (numbers allowed): None when absent, Err for another type.
pub fn sample_id(r: &Value) -> std::result::Result<Option<String>, String> {
    match r.get("id") {
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        None => Ok(None),
        Some(v) => Err(format!("`id` must be a string or number, found {}", kind(v))),
    }
}

fn parse_pair(r: &Value, pos: &str) -> Result<PreferencePair> {
    let obj = r
        .as_object()
        .ok_or_else(|| Error::sample(pos, format!("expected an object, found {}", kind(r))))?;
    let id = sample_id(r)
        .map_err(|e| Error::sample(pos, e))?
        .unwrap_or_else(|| pos.to_string());
    let text = |key: &str| -> Result<String> {
        match obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            None => Err(Error::sample(&id, format!("missing `{key}`"))),
            Some(v) => Err(Error::sample(
                &id,
                format!("`{key}` must be a string, found {}", kind(v)),
            )),
        }
    };
    let images = match obj.get("image") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    Error::sample(&id, format!("`image` entries must be strings, found {}", kind(v)))
                })
            })
            .collect::<Result<_>>()?,
        Some(v) => {
            return Err(Error::sample(
                &id,
                format!("`image` must be a path or a list of paths, found {}", kind(v)),
            ))
        }
    };
    Ok(PreferencePair {
        prompt: text("prompt")?,
        chosen: text("chosen")?,
        rejected: text("rejected")?,
        images,
        id,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// An image path from a data file: absolute paths as they are, relative ones tried against each root in
/// order (the current folder when there is none). The error names the sample and every place tried.
pub fn resolve_image(path: &str, roots: &[PathBuf], id: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if p.is_absolute() {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(Error::sample(id, format!("image `{path}` does not exist")))
        };
    }
    let cands: Vec<PathBuf> = if roots.is_empty() {
        vec![p.to_path_buf()]
    } else {
        roots.iter().map(|r| r.join(p)).collect()
    };
    cands.iter().find(|c| c.is_file()).cloned().ok_or_else(|| {
        let tried: Vec<String> = cands.iter().map(|c| c.display().to_string()).collect();
        Error::sample(
            id,
            format!("image `{path}` not found (tried {})", tried.join(", ")),
        )
    })
}

/// A preference pair ready for a model: its prompt (image tokens expanded), both answers tokenized
/// (EOS included) and the image features of the prompt.
pub struct PairInputs<B: crate::backend::Backend> {
    pub prompt: crate::text::tokenizer::PromptIds,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// (images · image_seq_length, hidden)
    pub features: B::Buf,
}

/// Resolves a pair's images against `roots`, tokenizes prompt and answers with `template`, and runs
/// the vision tower and projector: what `score` and `train` both start from. Errors name the pair.
pub fn pair_inputs<B: crate::backend::Backend>(
    m: &crate::model::llava::Llava<B>,
    p: &PreferencePair,
    roots: &[PathBuf],
    template: crate::text::Template,
    aspect: crate::vision::preprocess::AspectMode,
) -> Result<PairInputs<B>> {
    let paths = p
        .images
        .iter()
        .map(|im| resolve_image(im, roots, &p.id))
        .collect::<Result<Vec<_>>>()?;
    let prompt = m.prompt(template, &p.prompt, paths.len(), &p.id)?;
    let pixels = paths
        .iter()
        .map(|path| m.pixels(path, aspect))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| Error::sample(&p.id, e.to_string()))?;
    Ok(PairInputs {
        chosen: m.tokenizer.response(&p.chosen)?,
        rejected: m.tokenizer.response(&p.rejected)?,
        features: m.image_features(&pixels),
        prompt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_field_takes_string_or_list() {
        let r: Value =
            serde_json::from_str(r#"{"id":7,"image":"a.png","prompt":"p","chosen":"c","rejected":"r"}"#)
                .unwrap();
        assert_eq!(parse_pair(&r, "#0").unwrap().images, vec!["a.png"]);
        let r: Value =
            serde_json::from_str(r#"{"id":"x","image":["a","b"],"prompt":"p","chosen":"c","rejected":"r"}"#)
                .unwrap();
        let p = parse_pair(&r, "#0").unwrap();
        assert_eq!((p.id.as_str(), p.images.len()), ("x", 2));
    }
}
