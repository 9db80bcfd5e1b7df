//! `miadpo eval`: answer accuracy on LLaVA-format question files (single-image questions, or the
//! multi-image records of `augment`), by greedy generation and exact match after
//! [`normalise_answer`] — the demo's before/after measure.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::backend::Backend;
use crate::data::{read_json_list, resolve_image, sample_id};
use crate::demo::world::normalise_answer;
use crate::model::llava::{GenerateItem, GenerateOptions, Llava};
use crate::text::Template;
use crate::vision::preprocess::AspectMode;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub data: Vec<PathBuf>,
    pub image_roots: Vec<PathBuf>,
    pub template: Template,
    pub aspect: AspectMode,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    /// answer with the LoRA adapter when one is loaded
    pub use_adapter: bool,
}

/// Correct answers out of asked questions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Score {
    pub correct: usize,
    pub total: usize,
}

impl Score {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
    fn add(&mut self, ok: bool) {
        self.total += 1;
        self.correct += ok as usize;
    }
}

/// One answered question.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    pub id: String,
    /// the file's stem: `eval_single`, `sequence`, `grid`, `pip`, ...
    pub set: String,
    /// the record's `task` (the world's question kind), else `-`
    pub task: String,
    pub answer: String,
    pub gold: String,
    pub correct: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EvalSummary {
    pub overall: Score,
    /// per file stem
    pub sets: BTreeMap<String, Score>,
    /// per (file stem, task)
    pub tasks: BTreeMap<String, BTreeMap<String, Score>>,
    pub predictions: Vec<Prediction>,
}

struct Question {
    id: String,
    set: String,
    task: String,
    images: Vec<PathBuf>,
    question: String,
    gold: String,
}

/// The questions of one file: the first human turn (with its `<image>` placeholders) and the first
/// gpt turn of each record.
fn questions(file: &Path, roots: &[PathBuf]) -> Result<Vec<Question>> {
    let set = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bad = |id: &str, msg: &str| Error::file(file, format!("record `{id}`: {msg}"));
    let mut out = Vec::new();
    for (i, r) in read_json_list(file, "LLaVA-format records")?.iter().enumerate() {
        let id = sample_id(r)
            .map_err(|e| Error::file(file, format!("record #{i}: {e}")))?
            .unwrap_or_else(|| format!("#{i}"));
        let images: Vec<&str> = match r.get("image") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| bad(&id, "`image` entries must be strings"))
                })
                .collect::<Result<_>>()?,
            _ => return Err(bad(&id, "needs `image` (a path or a list of paths)")),
        };
        let turn = |from: &str| -> Result<String> {
            r.get("conversations")
                .and_then(Value::as_array)
                .and_then(|c| {
                    c.iter()
                        .find(|t| t.get("from").and_then(Value::as_str) == Some(from))
                })
                .and_then(|t| t.get("value").and_then(Value::as_str))
                .map(str::to_string)
                .ok_or_else(|| bad(&id, &format!("no `{from}` turn in `conversations`")))
        };
        let question = turn("human")?;
        let placeholders = question.matches("<image>").count();
        if placeholders != images.len() {
            return Err(bad(
                &id,
                &format!(
                    "the question has {placeholders} `<image>` placeholder(s) for {} image(s)",
                    images.len()
                ),
            ));
        }
        out.push(Question {
            images: images
                .iter()
                .map(|p| resolve_image(p, roots, &id))
                .collect::<Result<_>>()?,
            gold: turn("gpt")?,
            question,
            task: r.get("task").and_then(Value::as_str).unwrap_or("-").to_string(),
            set: set.clone(),
            id,
        });
    }
    Ok(out)
}

/// Answers every question of `o.data` greedily, in batches; `progress(done, total)`.
pub fn evaluate<B: Backend>(
    m: &Llava<B>,
    o: &EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalSummary> {
    if o.batch_size == 0 {
        return Err(Error::Invalid("--batch-size must be at least 1".into()));
    }
    let mut qs = Vec::new();
    for f in &o.data {
        qs.extend(questions(f, &o.image_roots)?);
    }
    let gen = GenerateOptions {
        max_new_tokens: o.max_new_tokens,
        attn_layer: None,
        use_adapter: o.use_adapter,
    };
    let mut s = EvalSummary::default();
    progress(0, qs.len());
    for (b, batch) in qs.chunks(o.batch_size).enumerate() {
        let mut prompts = Vec::with_capacity(batch.len());
        let mut feats = Vec::with_capacity(batch.len());
        for q in batch {
            prompts.push(m.prompt(o.template, &q.question, q.images.len(), &q.id)?);
            let px = q
                .images
                .iter()
                .map(|p| m.pixels(p, o.aspect))
                .collect::<Result<Vec<_>>>()
                .map_err(|e| Error::sample(&q.id, e.to_string()))?;
            feats.push(m.image_features(&px));
        }
        let items: Vec<GenerateItem<B>> = prompts
            .iter()
            .zip(&feats)
            .map(|(p, f)| GenerateItem {
                prompt: p,
                features: f,
                groups: None,
            })
            .collect();
        let gens = m.generate_batch(&items, &gen, &mut |_| {})?;
        for (q, g) in batch.iter().zip(gens) {
            let answer = g.text.trim().to_string();
            let ok = normalise_answer(&answer) == normalise_answer(&q.gold);
            s.overall.add(ok);
            s.sets.entry(q.set.clone()).or_default().add(ok);
            s.tasks
                .entry(q.set.clone())
                .or_default()
                .entry(q.task.clone())
                .or_default()
                .add(ok);
            s.predictions.push(Prediction {
                id: q.id.clone(),
                set: q.set.clone(),
                task: q.task.clone(),
                answer,
                gold: q.gold.clone(),
                correct: ok,
            });
        }
        progress(((b + 1) * o.batch_size).min(qs.len()), qs.len());
    }
    Ok(s)
}

/// The summary as a table: one line per set and task, then the total.
pub fn table(s: &EvalSummary) -> String {
    let mut out = format!(
        "{:<14} {:<10} {:>8} {:>9}\n",
        "set", "task", "correct", "accuracy"
    );
    let line = |set: &str, task: &str, sc: &Score| {
        format!(
            "{set:<14} {task:<10} {:>8} {:>8.1}%\n",
            format!("{}/{}", sc.correct, sc.total),
            100.0 * sc.accuracy()
        )
    };
    for (set, tasks) in &s.tasks {
        for (task, sc) in tasks {
            out += &line(set, task, sc);
        }
        if tasks.len() > 1 {
            out += &line(set, "all", &s.sets[set]);
        }
    }
    out += &line("all", "", &s.overall);
    out
}

/// The accuracies as JSON (no predictions): `{"overall": {"correct", "total", "accuracy"}, "sets":
/// {stem: {...}}, "tasks": {stem: {task: {...}}}}`.
pub fn summary_json(s: &EvalSummary) -> serde_json::Value {
    let score =
        |sc: &Score| serde_json::json!({"correct": sc.correct, "total": sc.total, "accuracy": sc.accuracy()});
    let sets: serde_json::Map<String, Value> = s.sets.iter().map(|(k, v)| (k.clone(), score(v))).collect();
    let tasks: serde_json::Map<String, Value> = s
        .tasks
        .iter()
        .map(|(set, t)| {
            let inner: serde_json::Map<String, Value> =
                t.iter().map(|(k, v)| (k.clone(), score(v))).collect();
            (set.clone(), Value::Object(inner))
        })
        .collect();
    serde_json::json!({"overall": score(&s.overall), "sets": sets, "tasks": tasks})
}
