//! The demo's synthetic world: pictures of 1–3 coloured shapes (circle, square, triangle; 7 colours)
//! on a plain background, each with a scene description from which every question has one
//! deterministic answer. Training data is single-image LLaVA instruction data; the held-out sets are
//! single-image questions on other scenes and, built from those by `augment`, multi-image questions
//! whose answer is that of the referred image.
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_circle_mut, draw_filled_rect_mut, draw_polygon_mut};
use imageproc::point::Point;
use imageproc::rect::Rect;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::augment::run::write_atomic;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
}

impl ShapeKind {
    pub const ALL: [ShapeKind; 3] = [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle];
    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
        }
    }
}

/// Shape colours: names and RGB, far apart from each other and from the backgrounds.
pub const COLOURS: [(&str, [u8; 3]); 7] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 60]),
    ("blue", [40, 70, 220]),
    ("yellow", [240, 210, 30]),
    ("purple", [140, 50, 170]),
    ("orange", [245, 135, 20]),
    ("black", [20, 20, 20]),
];

/// Backgrounds: light, so every shape colour stands out.
const BACKGROUNDS: [[u8; 3]; 4] = [[245, 245, 245], [225, 230, 235], [240, 235, 220], [215, 225, 215]];

const NUMBERS: [&str; 4] = ["zero", "one", "two", "three"];

/// One shape: kind, colour (index into COLOURS), centre and half-size as fractions of the side.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Item {
    pub kind: ShapeKind,
    pub colour: usize,
    pub cx: f32,
    pub cy: f32,
    pub r: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub items: Vec<Item>,
    pub background: [u8; 3],
}

/// A question about a scene and its one right answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qa {
    /// colour, shape, count, presence or caption
    pub kind: &'static str,
    pub question: String,
    pub answer: String,
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map_or_else(String::new, |f| f.to_uppercase().chain(c).collect())
}

impl Scene {
    /// 1–3 shapes with distinct kinds and distinct colours (so "the circle" and "the red shape" each
    /// name one shape), placed in separate thirds of the picture so they do not overlap.
    pub fn random(rng: &mut ChaCha8Rng) -> Scene {
        let n = rng.random_range(1..=3usize);
        let mut kinds = ShapeKind::ALL.to_vec();
        let mut colours: Vec<usize> = (0..COLOURS.len()).collect();
        let mut slots = vec![0usize, 1, 2];
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            let kind = kinds.swap_remove(rng.random_range(0..kinds.len()));
            let colour = colours.swap_remove(rng.random_range(0..colours.len()));
            let slot = slots.swap_remove(rng.random_range(0..slots.len()));
            let r = rng.random_range(0.09..0.15f32);
            items.push(Item {
                kind,
                colour,
                cx: (slot as f32 + 0.5) / 3.0 + rng.random_range(-0.03..0.03f32),
                cy: rng.random_range(0.25..0.75f32),
                r,
            });
        }
        items.sort_by(|a, b| a.cx.total_cmp(&b.cx)); // left to right: the caption's order
        let background = BACKGROUNDS[rng.random_range(0..BACKGROUNDS.len())];
        Scene { items, background }
    }

    pub fn render(&self, side: u32) -> RgbImage {
        let mut img = RgbImage::from_pixel(side, side, Rgb(self.background));
        let s = side as f32;
        for it in &self.items {
            let c = Rgb(COLOURS[it.colour].1);
            let (x, y, r) = (it.cx * s, it.cy * s, it.r * s);
            match it.kind {
                ShapeKind::Circle => draw_filled_circle_mut(&mut img, (x as i32, y as i32), r as i32, c),
                ShapeKind::Square => draw_filled_rect_mut(
                    &mut img,
                    Rect::at((x - r) as i32, (y - r) as i32).of_size((2.0 * r) as u32, (2.0 * r) as u32),
                    c,
                ),
                ShapeKind::Triangle => draw_polygon_mut(
                    &mut img,
                    &[
                        Point::new(x as i32, (y - r) as i32),
                        Point::new((x + r) as i32, (y + r) as i32),
                        Point::new((x - r) as i32, (y + r) as i32),
                    ],
                    c,
                ),
            }
        }
        img
    }

    fn colour_name(it: &Item) -> &'static str {
        COLOURS[it.colour].0
    }

    /// "A red circle and a blue square." — left to right.
    pub fn caption(&self) -> String {
        let parts: Vec<String> = self
            .items
            .iter()
            .map(|it| format!("a {} {}", Self::colour_name(it), it.kind.name()))
            .collect();
        let text = match parts.len() {
            1 => parts[0].clone(),
            2 => format!("{} and {}", parts[0], parts[1]),
            _ => format!("{}, {} and {}", parts[0], parts[1], parts[2]),
        };
        format!("{}.", capitalise(&text))
    }

    /// One question of each kind, with its answer (presence asks about a present or an absent
    /// shape with equal odds).
    pub fn questions(&self, rng: &mut ChaCha8Rng) -> Vec<Qa> {
        let it = self.items[rng.random_range(0..self.items.len())];
        let mut q = vec![
            Qa {
                kind: "colour",
                question: format!("What colour is the {}?", it.kind.name()),
                answer: format!("{}.", capitalise(Self::colour_name(&it))),
            },
            Qa {
                kind: "shape",
                question: format!("Which shape is {}?", Self::colour_name(&it)),
                answer: format!("The {}.", it.kind.name()),
            },
            Qa {
                kind: "count",
                question: "How many shapes are there?".into(),
                answer: format!("{}.", capitalise(NUMBERS[self.items.len()])),
            },
        ];
        let (kind, colour) = if rng.random_bool(0.5) {
            (it.kind, it.colour)
        } else {
            // a combination that is not in the picture
            loop {
                let k = ShapeKind::ALL[rng.random_range(0..3)];
                let c = rng.random_range(0..COLOURS.len());
                if !self.items.iter().any(|i| i.kind == k && i.colour == c) {
                    break (k, c);
                }
            }
        };
        let present = self.items.iter().any(|i| i.kind == kind && i.colour == colour);
        q.push(Qa {
            kind: "presence",
            question: format!("Is there a {} {}?", COLOURS[colour].0, kind.name()),
            answer: if present { "Yes." } else { "No." }.into(),
        });
        q.push(Qa {
            kind: "caption",
            question: "Describe the image in one sentence.".into(),
            answer: self.caption(),
        });
        q
    }
}

/// What `build` writes.
#[derive(Clone, Debug)]
pub struct WorldOptions {
    pub out: PathBuf,
    pub seed: u64,
    /// scenes of the training data (5 questions each)
    pub train_scenes: usize,
    /// held-out scenes (one question each, kinds in turn)
    pub eval_scenes: usize,
    pub image_size: u32,
}

/// Paths of the built world.
#[derive(Clone, Debug)]
pub struct World {
    /// LLaVA instruction data (image paths relative to `root`)
    pub train: PathBuf,
    /// held-out single-image questions, same format
    pub eval_single: PathBuf,
    pub root: PathBuf,
    pub train_records: usize,
    pub eval_records: usize,
}

fn record(id: &str, image: &str, qa: &Qa) -> serde_json::Value {
    json!({
        "id": id,
        "image": image,
        "task": qa.kind,
        "conversations": [
            {"from": "human", "value": format!("<image>\n{}", qa.question)},
            {"from": "gpt", "value": qa.answer},
        ],
    })
}

/// Builds the world under `o.out`: `images/`, `train.json`, `eval_single.json`. Same options, same
/// bytes.
pub fn build(o: &WorldOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<World> {
    if o.train_scenes == 0 || o.eval_scenes == 0 {
        return Err(Error::Invalid(
            "the world needs at least one training and one held-out scene".into(),
        ));
    }
    let images = o.out.join("images");
    std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed ^ 0x0077_6f72_6c64); // "world"
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    let total = o.train_scenes + o.eval_scenes;
    for i in 0..total {
        progress(i, total);
        let scene = Scene::random(&mut rng);
        let held_out = i >= o.train_scenes;
        let name = if held_out {
            format!("images/eval_{:05}.png", i - o.train_scenes)
        } else {
            format!("images/train_{i:05}.png")
        };
        let path = o.out.join(&name);
        let mut png = Vec::new();
        scene
            .render(o.image_size)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| Error::file(&path, e.to_string()))?;
        write_atomic(&path, &png)?;
        let qas = scene.questions(&mut rng);
        if held_out {
            let k = (i - o.train_scenes) % qas.len();
            eval.push(record(&format!("eval-{:05}", i - o.train_scenes), &name, &qas[k]));
        } else {
            for qa in &qas {
                train.push(record(&format!("train-{i:05}-{}", qa.kind), &name, qa));
            }
        }
    }
    progress(total, total);
    let write = |p: &Path, v: &Vec<serde_json::Value>| -> Result<()> {
        write_atomic(p, serde_json::to_string_pretty(v).expect("json").as_bytes())
    };
    let (tp, ep) = (o.out.join("train.json"), o.out.join("eval_single.json"));
    write(&tp, &train)?;
    write(&ep, &eval)?;
    Ok(World {
        train: tp,
        eval_single: ep,
        root: o.out.clone(),
        train_records: train.len(),
        eval_records: eval.len(),
    })
}

/// An answer as the evaluation compares it: lower case, no surrounding punctuation or spaces, and
/// number words as digits ("Two." and "2" agree).
pub fn normalise_answer(s: &str) -> String {
    let t = s.trim().trim_end_matches(['.', '!']).trim().to_lowercase();
    match NUMBERS.iter().position(|n| *n == t) {
        Some(i) => i.to_string(),
        None => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_answer_their_questions() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let s = Scene::random(&mut rng);
            assert!((1..=3).contains(&s.items.len()));
            let qas = s.questions(&mut rng);
            let by = |k: &str| qas.iter().find(|q| q.kind == k).unwrap().clone();
            let colour = by("colour");
            let kind = colour
                .question
                .trim_start_matches("What colour is the ")
                .trim_end_matches('?');
            let it = s.items.iter().find(|i| i.kind.name() == kind).unwrap();
            assert_eq!(normalise_answer(&colour.answer), COLOURS[it.colour].0);
            assert_eq!(normalise_answer(&by("count").answer), s.items.len().to_string());
            let caption = by("caption").answer;
            for it in &s.items {
                assert!(
                    caption.contains(&format!("{} {}", COLOURS[it.colour].0, it.kind.name())),
                    "{caption}"
                );
            }
        }
    }

    #[test]
    fn rendering_paints_each_shape_in_its_colour() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for _ in 0..20 {
            let s = Scene::random(&mut rng);
            let img = s.render(112);
            for it in &s.items {
                let (x, y) = ((it.cx * 112.0) as u32, (it.cy * 112.0) as u32);
                assert_eq!(
                    img.get_pixel(x, y).0,
                    COLOURS[it.colour].1,
                    "{:?} at its centre",
                    it.kind
                );
            }
            assert_eq!(img.get_pixel(0, 0).0, s.background);
        }
    }

    #[test]
    fn numbers_and_punctuation_normalise() {
        assert_eq!(normalise_answer(" Two. "), "2");
        assert_eq!(normalise_answer("2"), "2");
        assert_eq!(normalise_answer("The circle."), "the circle");
    }
}
