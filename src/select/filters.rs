//! The keep rule of MIA-DPO's selection and the post-selection filters that clean its pairs.

/// Post-selection: three filters against noisy pairs (on by default; see README for why each default).
#[derive(Clone, Debug, PartialEq)]
pub struct PostSelect {
    /// drop a pair whose rejected answer has a max-softmax perplexity above this: the model was so
    /// unsure at every step that the answer is noise rather than a plausible, wrong answer
    pub max_ppl: f64,
    /// drop a pair whose longer answer has more than this many times the words of the shorter one:
    /// DPO would learn length instead of grounding
    pub max_length_ratio: f64,
    /// drop a pair whose normalised character edit distance is below this: a near-copy of the ground
    /// truth is not a wrong answer, and pushing it down pushes the truth down
    pub min_edit_distance: f64,
}

impl Default for PostSelect {
    fn default() -> Self {
        PostSelect {
            max_ppl: 10.0,
            max_length_ratio: 3.0,
            min_edit_distance: 0.2,
        }
    }
}

/// Why a record yields no pair (`None` from [`decide`] keeps it).
pub fn decide(
    answer: &str,
    gt: &str,
    ratio: Option<f64>,
    ppl: f64,
    ratio_threshold: f64,
    ppl_threshold: f64,
    post: Option<&PostSelect>,
) -> Option<String> {
    let (a, g) = (answer.trim(), gt.trim());
    if a.is_empty() {
        return Some("empty answer".into());
    }
    if g.is_empty() {
        return Some("empty ground truth".into());
    }
    if a == g {
        return Some("answer equals the ground truth".into());
    }
    let Some(ratio) = ratio else {
        return Some("no attention row (answer of one token)".into());
    };
    if ratio > ratio_threshold {
        return Some(format!("attention ratio above threshold ({ratio_threshold})"));
    }
    if ppl.is_nan() || ppl <= ppl_threshold {
        return Some(format!("perplexity not above threshold ({ppl_threshold})"));
    }
    let p = post?;
    if ppl > p.max_ppl {
        return Some(format!("post-select: perplexity above {}", p.max_ppl));
    }
    let (wa, wg) = (
        a.split_whitespace().count().max(1) as f64,
        g.split_whitespace().count().max(1) as f64,
    );
    if wa.max(wg) / wa.min(wg) > p.max_length_ratio {
        return Some(format!("post-select: length ratio above {}", p.max_length_ratio));
    }
    if normalized_edit_distance(a, g) < p.min_edit_distance {
        return Some(format!(
            "post-select: edit distance below {}",
            p.min_edit_distance
        ));
    }
    None
}

/// Levenshtein distance over characters of the lower-cased, whitespace-collapsed texts, divided by the
/// longer length: 0 = same text, 1 = nothing in common.
pub fn normalized_edit_distance(a: &str, b: &str) -> f64 {
    let norm = |s: &str| -> Vec<char> {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
            .chars()
            .collect()
    };
    let (a, b) = (norm(a), norm(b));
    let n = a.len().max(b.len());
    if n == 0 {
        return 0.0;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()] as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_is_normalised_levenshtein() {
        assert_eq!(normalized_edit_distance("kitten", "sitting"), 3.0 / 7.0);
        assert_eq!(normalized_edit_distance("A  red car.", "a red car."), 0.0);
        assert_eq!(normalized_edit_distance("", ""), 0.0);
        assert_eq!(normalized_edit_distance("abc", ""), 1.0);
    }

    #[test]
    fn keep_rule_and_thresholds() {
        let keep = |a: &str, r: f64, p: f64| decide(a, "A red car.", Some(r), p, 0.7, 1.1, None);
        assert_eq!(keep("A blue bus.", 0.5, 2.0), None);
        assert!(keep("A blue bus.", 0.71, 2.0).unwrap().contains("ratio"));
        assert_eq!(
            keep("A blue bus.", 0.7, 2.0),
            None,
            "ratio equal to the threshold is kept"
        );
        assert!(keep("A blue bus.", 0.5, 1.1).unwrap().contains("perplexity"));
        assert!(keep("A red car.", 0.1, 2.0).unwrap().contains("equals"));
        assert!(keep("  ", 0.1, 2.0).unwrap().contains("empty answer"));
        assert!(decide("x", "A", None, 2.0, 0.7, 1.1, None)
            .unwrap()
            .contains("no attention row"));
    }

    #[test]
    fn post_selection_filters() {
        let p = PostSelect::default();
        let post = |a: &str, ppl: f64| {
            decide(
                a,
                "There is a red car parked on the street.",
                Some(0.1),
                ppl,
                0.8,
                1.1,
                Some(&p),
            )
        };
        assert_eq!(post("A blue bus drives down the road.", 2.0), None);
        assert!(post("A blue bus drives down the road.", 11.0)
            .unwrap()
            .contains("perplexity above"));
        assert!(post("Bus.", 2.0).unwrap().contains("length ratio"));
        assert!(post("There is a red car parked on the street", 2.0)
            .unwrap()
            .contains("edit distance"));
    }
}
