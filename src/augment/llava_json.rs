//! LLaVA-665k-style instruction data in, LLaVA conversation records (with `"mia"` metadata) out.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::{read_json_list, sample_id};
use crate::{Error, Result};

/// One conversation turn (`"from": "human" | "gpt"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub from: String,
    pub value: String,
}

/// A usable single-image sample of the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSample {
    /// position in the input list (drives the per-sample random stream)
    pub index: usize,
    pub id: String,
    /// image path as written in the input
    pub image: String,
    pub conversations: Vec<Turn>,
}

/// An input sample that was not used, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub reason: String,
}

/// Sample `index` of the list in `path`: its object, its id (`#index` when it has none) and its
/// `conversations`; anything else is an error naming the file and the sample.
pub fn sample_head<'a>(
    path: &Path,
    index: usize,
    r: &'a Value,
) -> Result<(&'a serde_json::Map<String, Value>, String, Vec<Turn>)> {
    let bad = |id: &str, msg: String| Error::file(path, format!("sample `{id}`: {msg}"));
    let obj = r
        .as_object()
        .ok_or_else(|| bad(&format!("#{index}"), "expected an object".into()))?;
    let id = sample_id(r)
        .map_err(|e| bad(&format!("#{index}"), e))?
        .unwrap_or_else(|| format!("#{index}"));
    let conversations: Vec<Turn> = match obj.get("conversations") {
        Some(c) => serde_json::from_value(c.clone()).map_err(|e| {
            bad(
                &id,
                format!("`conversations` must be a list of {{\"from\", \"value\"}}: {e}"),
            )
        })?,
        None => return Err(bad(&id, "missing `conversations`".into())),
    };
    Ok((obj, id, conversations))
}

/// Reads the input list. Samples without an image (or with several) are returned as skipped; anything
/// that is not LLaVA conversation data is an error naming the file and the sample.
pub fn load_llava_json(path: &Path) -> Result<(Vec<SourceSample>, Vec<Skipped>)> {
    let list = read_json_list(
        path,
        "LLaVA samples (`[{\"id\", \"image\", \"conversations\"}, ...]`)",
    )?;
    let (mut samples, mut skipped) = (Vec::new(), Vec::new());
    for (index, r) in list.iter().enumerate() {
        let bad = |id: &str, msg: String| Error::file(path, format!("sample `{id}`: {msg}"));
        let (obj, id, conversations) = sample_head(path, index, r)?;
        let image = match obj.get("image") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().map(str::to_string),
            Some(Value::Array(a)) if a.len() > 1 => {
                skipped.push(Skipped {
                    id,
                    image: None,
                    reason: "multi-image sample".into(),
                });
                continue;
            }
            Some(other) => {
                return Err(bad(
                    &id,
                    format!("`image` must be a path or a one-element list, found {other}"),
                ))
            }
        };
        let Some(image) = image else {
            skipped.push(Skipped {
                id,
                image: None,
                reason: "no image".into(),
            });
            continue;
        };
        let first_human = conversations.first().filter(|t| t.from == "human");
        if first_human.is_none() || !conversations.iter().any(|t| t.from == "gpt") {
            skipped.push(Skipped {
                id,
                image: Some(image),
                reason: "no human question followed by an answer".into(),
            });
            continue;
        }
        samples.push(SourceSample {
            index,
            id,
            image,
            conversations,
        });
    }
    Ok((samples, skipped))
}

/// The per-kind metadata the selection stage reads (`"mia"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Mia {
    Sequence {
        /// 1-based index of the image the question is about
        target: usize,
        n_images: usize,
        source_id: String,
    },
    Grid {
        target: usize,
        n_images: usize,
        rows: u32,
        cols: u32,
        /// image paths in cell order (row-major)
        sources: Vec<String>,
        source_id: String,
    },
    Pip {
        background: String,
        foreground: String,
        source_id: String,
    },
}

/// One output record in LLaVA conversation format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// a path (grid, pip: relative to the output folder) or a list of paths (sequence)
    pub image: Value,
    pub conversations: Vec<Turn>,
    pub mia: Mia,
}
