//! The random choices of augmentation, made per sample from a seeded stream that depends only on
//! (seed, kind, sample index): the output is the same for any thread count and any `--per-kind`.
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Sequence,
    Grid,
    Pip,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Sequence, Kind::Grid, Kind::Pip];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Sequence => "sequence",
            Kind::Grid => "grid",
            Kind::Pip => "pip",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown kind `{s}` (expected sequence, grid or pip)"))
    }
}

/// Where sequence/grid companions and pic-in-pic backgrounds come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Companions {
    /// other images of the same source dataset (the path's first folder: coco, gqa, vg, ...)
    #[default]
    Same,
    /// any other image of the input
    Any,
}

impl FromStr for Companions {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "same" => Ok(Companions::Same),
            "any" => Ok(Companions::Any),
            _ => Err(format!("unknown companion pool `{s}` (expected same or any)")),
        }
    }
}

/// Image counts and their weights (MIA-DPO's defaults).
pub const SEQUENCE_WEIGHTS: [(usize, f64); 4] = [(2, 0.55), (3, 0.15), (4, 0.15), (5, 0.15)];
pub const GRID_WEIGHTS: [(usize, f64); 5] = [(2, 0.46), (3, 0.14), (4, 0.14), (6, 0.14), (9, 0.12)];

/// The source dataset of an image path: its first folder (`coco/train2017/x.jpg` -> `coco`).
pub fn dataset_of(path: &str) -> &str {
    path.trim_start_matches("./")
        .split(['/', '\\'])
        .next()
        .unwrap_or("")
}

/// Distinct image paths, grouped by dataset, in first-seen order.
pub struct Pools {
    all: Vec<String>,
    by_dataset: HashMap<String, Vec<String>>,
}

impl Pools {
    pub fn new<'a>(images: impl IntoIterator<Item = &'a str>) -> Self {
        let mut seen = std::collections::HashSet::new();
        let (mut all, mut by_dataset) = (Vec::new(), HashMap::<String, Vec<String>>::new());
        for p in images {
            if seen.insert(p.to_string()) {
                all.push(p.to_string());
                by_dataset
                    .entry(dataset_of(p).to_string())
                    .or_default()
                    .push(p.to_string());
            }
        }
        Pools { all, by_dataset }
    }

    pub fn pool(&self, image: &str, c: Companions) -> &[String] {
        match c {
            Companions::Any => &self.all,
            Companions::Same => self
                .by_dataset
                .get(dataset_of(image))
                .map_or(&[], |v| v.as_slice()),
        }
    }
}

/// The random stream of one (kind, sample): ChaCha8 keyed by a splitmix of the three numbers.
pub fn rng_for(seed: u64, kind: Kind, index: usize) -> ChaCha8Rng {
    let mut z = seed ^ (kind as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
}

/// A count drawn with the given weights.
pub fn pick_weighted(rng: &mut impl Rng, weights: &[(usize, f64)]) -> usize {
    let total: f64 = weights.iter().map(|w| w.1).sum();
    let mut u = rng.random::<f64>() * total;
    for &(n, w) in weights {
        if u < w {
            return n;
        }
        u -= w;
    }
    weights[weights.len() - 1].0
}

/// `count` distinct images of `pool`, none equal to `exclude`, in drawn order. Err: the pool is too small
/// (how many it holds).
pub fn pick_companions(
    rng: &mut impl Rng,
    pool: &[String],
    exclude: &str,
    count: usize,
) -> Result<Vec<String>, usize> {
    let available = pool.len() - usize::from(pool.iter().any(|p| p == exclude));
    if available < count {
        return Err(available);
    }
    let amount = (count + 1).min(pool.len());
    let picked = rand::seq::index::sample(rng, pool.len(), amount);
    Ok(picked
        .into_iter()
        .map(|i| pool[i].clone())
        .filter(|p| p != exclude)
        .take(count)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datasets_are_the_first_folder() {
        assert_eq!(dataset_of("coco/train2017/a.jpg"), "coco");
        assert_eq!(dataset_of("./gqa/images/b.jpg"), "gqa");
        assert_eq!(dataset_of("c.jpg"), "c.jpg");
    }

    #[test]
    fn pools_group_distinct_paths_by_dataset() {
        let p = Pools::new(["coco/a.jpg", "gqa/b.jpg", "coco/a.jpg", "coco/c.jpg"]);
        assert_eq!(
            p.pool("coco/z.jpg", Companions::Same),
            ["coco/a.jpg", "coco/c.jpg"]
        );
        assert_eq!(p.pool("gqa/b.jpg", Companions::Any).len(), 3);
        assert!(p.pool("vg/x.jpg", Companions::Same).is_empty());
    }

    #[test]
    fn companions_are_distinct_and_exclude_the_source() {
        let pool: Vec<String> = (0..20).map(|i| format!("coco/{i}.jpg")).collect();
        for idx in 0..200 {
            let mut rng = rng_for(7, Kind::Grid, idx);
            let c = pick_companions(&mut rng, &pool, "coco/3.jpg", 8).unwrap();
            assert_eq!(c.len(), 8);
            assert!(!c.contains(&"coco/3.jpg".to_string()));
            let set: std::collections::HashSet<_> = c.iter().collect();
            assert_eq!(set.len(), 8);
        }
        let mut rng = rng_for(7, Kind::Grid, 0);
        assert_eq!(pick_companions(&mut rng, &pool[..4], "coco/3.jpg", 4), Err(3));
    }

    #[test]
    fn weighted_counts_follow_the_weights() {
        let mut rng = rng_for(1, Kind::Sequence, 0);
        let mut counts = HashMap::new();
        for _ in 0..20000 {
            *counts
                .entry(pick_weighted(&mut rng, &SEQUENCE_WEIGHTS))
                .or_insert(0usize) += 1;
        }
        let f2 = counts[&2] as f64 / 20000.0;
        assert!((f2 - 0.55).abs() < 0.02, "share of n=2: {f2}");
        assert!(counts.keys().all(|n| (2..=5).contains(n)));
    }

    #[test]
    fn streams_depend_on_seed_kind_and_index() {
        let a = rng_for(1, Kind::Grid, 5).random::<u64>();
        assert_eq!(a, rng_for(1, Kind::Grid, 5).random::<u64>());
        assert_ne!(a, rng_for(2, Kind::Grid, 5).random::<u64>());
        assert_ne!(a, rng_for(1, Kind::Pip, 5).random::<u64>());
        assert_ne!(a, rng_for(1, Kind::Grid, 6).random::<u64>());
    }
}
