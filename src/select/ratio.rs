//! Which attention counts as "looking at the right place" for each augmentation kind (MIA-DPO):
//! the key groups to record during decoding, and how their masses make the ratio.
use crate::augment::llava_json::Mia;
use crate::backend::{KeyGroups, KeyRange, KeySpan};
use crate::Result;

/// Key groups to record, and which of them form the target and the whole.
#[derive(Clone, Debug, PartialEq)]
pub struct RatioSpec {
    pub groups: KeyGroups,
    /// the group whose mass is the target's
    pub target: usize,
    /// the groups whose masses sum to the whole the target is compared with
    pub total: Vec<usize>,
}

impl RatioSpec {
    /// sequence: one group per image; the target image (1-based) over all images.
    pub fn sequence(image_spans: &[KeySpan], target: usize) -> Result<Self> {
        Ok(RatioSpec {
            groups: KeyGroups::per_span(image_spans)?,
            target: target - 1,
            total: (0..image_spans.len()).collect(),
        })
    }

    /// grid: the image's g×g patch grid split into rows×cols blocks (remainders to the first blocks);
    /// block `target` (1-based, row-major) over the whole grid.
    pub fn grid(image: KeySpan, g: usize, rows: usize, cols: usize, target: usize) -> Result<Self> {
        let (r_edges, c_edges) = (split(g, rows), split(g, cols));
        let (br, bc) = ((target - 1) / cols, (target - 1) % cols);
        Self::region(
            image,
            g,
            r_edges[br]..r_edges[br + 1],
            c_edges[bc]..c_edges[bc + 1],
        )
    }

    /// pic-in-pic: the middle 2/3 of the patch grid per side (16×16 of 24×24) over the whole grid.
    pub fn pip(image: KeySpan, g: usize) -> Result<Self> {
        let inner = 2 * g / 3;
        let off = (g - inner) / 2;
        Self::region(image, g, off..off + inner, off..off + inner)
    }

    /// A rectangle of patches (group 1: one range per patch row, so one mass column and one kernel
    /// launch however many rows) against the whole image span (group 0).
    fn region(
        image: KeySpan,
        g: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) -> Result<Self> {
        let mut ranges: Vec<KeyRange> = vec![(image.0, image.1, 0)];
        for r in rows {
            ranges.push((image.0 + r * g + cols.start, image.0 + r * g + cols.end, 1));
        }
        Ok(RatioSpec {
            groups: KeyGroups::new(&ranges, 2)?,
            target: 1,
            total: vec![0],
        })
    }

    /// Mean over decoding rows of each group's mass, then target / total. None without rows.
    pub fn ratio(&self, rows: &[Vec<f64>]) -> Option<f64> {
        if rows.is_empty() {
            return None;
        }
        let mean = |i: usize| rows.iter().map(|r| r[i]).sum::<f64>() / rows.len() as f64;
        let all: f64 = self.total.iter().map(|&i| mean(i)).sum();
        Some(mean(self.target) / all)
    }
}

/// Edges of `parts` near-equal pieces of `n`, the first `n % parts` one longer.
fn split(n: usize, parts: usize) -> Vec<usize> {
    let (base, rem) = (n / parts, n % parts);
    let mut edges = vec![0];
    for i in 0..parts {
        edges.push(edges[i] + base + usize::from(i < rem));
    }
    edges
}

/// MIA-DPO's ratio thresholds: keep a pair when the target's share is at most this.
pub fn default_threshold(mia: &Mia) -> f64 {
    match mia {
        Mia::Sequence { n_images, .. } => match n_images {
            0..=2 => 0.8,
            3 => 0.7,
            _ => 0.6,
        },
        Mia::Grid { n_images, .. } => match n_images {
            0..=2 => 0.7,
            3 => 0.6,
            4 => 0.5,
            5 | 6 => 0.4,
            _ => 0.3,
        },
        Mia::Pip { .. } => 0.8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built attention row over a 6×6 grid at tokens 10..46: mass 1 on the given patches.
    fn keys(hot: &[(usize, usize)]) -> Vec<f64> {
        let mut keys = vec![0f64; 60];
        for &(r, c) in hot {
            keys[10 + r * 6 + c] = 1.0;
        }
        keys
    }

    /// The mass of each group of `spec` on a row of key masses.
    fn masses(k: &[f64], spec: &RatioSpec) -> Vec<f64> {
        (0..spec.groups.n_groups())
            .map(|g| {
                spec.groups
                    .group(g)
                    .iter()
                    .map(|&(a, b, _)| k[a..b].iter().sum::<f64>())
                    .sum()
            })
            .collect()
    }

    fn row(hot: &[(usize, usize)], spec: &RatioSpec) -> Vec<f64> {
        masses(&keys(hot), spec)
    }

    /// The spans select recorded before key groups (the image, then one span per patch row of the
    /// region, summed into the target on the host) and their ratio.
    fn old_ratio(
        image: KeySpan,
        g: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        k: &[f64],
    ) -> f64 {
        let whole: f64 = k[image.0..image.1].iter().sum();
        let target: f64 = rows
            .map(|r| {
                k[image.0 + r * g + cols.start..image.0 + r * g + cols.end]
                    .iter()
                    .sum::<f64>()
            })
            .sum();
        target / whole
    }

    #[test]
    fn grid_blocks_split_with_remainders_first() {
        assert_eq!(split(24, 2), [0, 12, 24]);
        assert_eq!(split(24, 9), [0, 3, 6, 9, 12, 15, 18, 20, 22, 24]); // 24 = 9·2 + 6
        assert_eq!(split(7, 3), [0, 3, 5, 7]);
        assert_eq!(split(4, 3), [0, 2, 3, 4]);
    }

    #[test]
    fn grid_ratio_on_hand_built_attention() {
        // 2×3 grid on a 6×6 patch grid: blocks are 3 rows × 2 columns; target 5 = row 1, column 1
        let spec = RatioSpec::grid((10, 46), 6, 2, 3, 5).unwrap();
        assert_eq!(spec.groups.n_groups(), 2);
        assert_eq!(spec.groups.group(0), [(10, 46, 0)]);
        assert_eq!(spec.groups.group(1).len(), 3);
        assert_eq!(spec.groups.group(1)[0], (10 + 3 * 6 + 2, 10 + 3 * 6 + 4, 1));
        // all attention inside block 5
        assert_eq!(spec.ratio(&[row(&[(3, 2), (5, 3)], &spec)]), Some(1.0));
        // half inside, half in block 1
        assert_eq!(spec.ratio(&[row(&[(4, 2), (0, 0)], &spec)]), Some(0.5));
        // averaged over rows: 1 then 0
        assert_eq!(
            spec.ratio(&[row(&[(4, 3)], &spec), row(&[(0, 5)], &spec)]),
            Some(0.5)
        );
        assert_eq!(spec.ratio(&[]), None);
        // a block as wide as the grid: its rows are adjacent, one range
        let wide = RatioSpec::grid((10, 46), 6, 2, 1, 2).unwrap();
        assert_eq!(wide.groups.group(1), [(10 + 3 * 6, 46, 1)]);
    }

    #[test]
    fn pip_centre_is_the_middle_two_thirds() {
        let spec = RatioSpec::pip((10, 46), 6).unwrap(); // 4×4 centre at offset 1
        assert_eq!(spec.groups.group(1).len(), 4);
        assert_eq!(spec.groups.group(1)[0], (10 + 6 + 1, 10 + 6 + 5, 1));
        assert_eq!(
            spec.ratio(&[row(&[(1, 1), (4, 4), (0, 0), (5, 5)], &spec)]),
            Some(0.5)
        );
        // LLaVA-1.5: 16×16 of 24×24, 16 ranges in one group
        let big = RatioSpec::pip((0, 576), 24).unwrap();
        assert_eq!(big.groups.n_groups(), 2);
        assert_eq!(big.groups.group(1).len(), 16);
        assert_eq!(big.groups.group(1)[0], (4 * 24 + 4, 4 * 24 + 20, 1));
    }

    #[test]
    fn groups_give_the_ratios_of_the_old_per_row_spans() {
        // pseudo-random key masses (a fixed LCG), every grid target and the pic-in-pic centre
        let mut x = 12345u64;
        let k: Vec<f64> = (0..60)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect();
        for (rows, cols) in [(2, 3), (3, 3), (2, 2), (1, 2)] {
            let (re, ce) = (split(6, rows), split(6, cols));
            for target in 1..=rows * cols {
                let spec = RatioSpec::grid((10, 46), 6, rows, cols, target).unwrap();
                let (br, bc) = ((target - 1) / cols, (target - 1) % cols);
                let want = old_ratio((10, 46), 6, re[br]..re[br + 1], ce[bc]..ce[bc + 1], &k);
                let got = spec.ratio(&[masses(&k, &spec)]).unwrap();
                assert!(
                    (got - want).abs() < 1e-12,
                    "grid {rows}x{cols} target {target}: {got} vs {want}"
                );
            }
        }
        let spec = RatioSpec::pip((10, 46), 6).unwrap();
        let want = old_ratio((10, 46), 6, 1..5, 1..5, &k);
        assert!((spec.ratio(&[masses(&k, &spec)]).unwrap() - want).abs() < 1e-12);
    }

    #[test]
    fn sequence_ratio_is_the_target_share() {
        let spec = RatioSpec::sequence(&[(0, 4), (4, 8), (8, 12)], 2).unwrap();
        assert_eq!(spec.groups.n_groups(), 3);
        let r = spec.ratio(&[vec![0.1, 0.3, 0.1], vec![0.2, 0.1, 0.2]]).unwrap();
        assert!((r - 0.2 / 0.5).abs() < 1e-12);
    }
}
