//! Rewriting the human turns of a single-image conversation for a multi-image prompt. Answers (gpt
//! turns) are never touched.
use super::llava_json::Turn;

pub const IMAGE: &str = "<image>";

/// The question without its `<image>` placeholder: LLaVA data puts it first (`<image>\n...`) or last
/// (`...\n<image>`); a placeholder anywhere else is removed too. Surrounding whitespace is trimmed.
pub fn strip_image(q: &str) -> String {
    let q = q.trim();
    let q = if let Some(rest) = q.strip_prefix(IMAGE) {
        rest
    } else if let Some(rest) = q.strip_suffix(IMAGE) {
        rest
    } else {
        q
    };
    q.replace(IMAGE, "").trim().to_string()
}

/// First letter lower-cased ("What is..." -> "what is..."), so the question reads on after a prefix.
pub fn lower_first(q: &str) -> String {
    let mut c = q.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// `Image1:<image>\nImage2:<image>\n...ImageN:<image>\n`
pub fn sequence_header(n: usize) -> String {
    (1..=n).map(|i| format!("Image{i}:{IMAGE}\n")).collect()
}

/// The conversation with every human turn rewritten: the first as `first_prefix + prefix + question`,
/// later ones as `prefix + question` (question: placeholder stripped, first letter lower-cased).
pub fn rewrite(conv: &[Turn], first_prefix: &str, prefix: &str) -> Vec<Turn> {
    let mut first = true;
    conv.iter()
        .map(|t| {
            if t.from != "human" {
                return t.clone();
            }
            let q = lower_first(&strip_image(&t.value));
            let value = if first {
                format!("{first_prefix}{prefix}{q}")
            } else {
                format!("{prefix}{q}")
            };
            first = false;
            Turn {
                from: t.from.clone(),
                value,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(from: &str, v: &str) -> Turn {
        Turn {
            from: from.into(),
            value: v.into(),
        }
    }

    #[test]
    fn placeholder_first_or_last_is_removed() {
        assert_eq!(strip_image("<image>\nWhat is this?"), "What is this?");
        assert_eq!(strip_image("What is this?\n<image>"), "What is this?");
        assert_eq!(strip_image("What <image> is this?"), "What  is this?");
        assert_eq!(strip_image("No placeholder."), "No placeholder.");
    }

    #[test]
    fn first_letter_lower_cased() {
        assert_eq!(lower_first("What colour?"), "what colour?");
        assert_eq!(lower_first("Élan"), "élan");
        assert_eq!(lower_first(""), "");
    }

    #[test]
    fn sequence_prompt_and_later_turns() {
        let conv = vec![
            turn("human", "<image>\nWhat is the man holding?"),
            turn("gpt", "A Frisbee."),
            turn("human", "Is it sunny?"),
            turn("gpt", "Yes, it is."),
        ];
        let out = rewrite(&conv, &sequence_header(3), "In Image2, ");
        assert_eq!(
            out[0].value,
            "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image2, what is the man holding?"
        );
        assert_eq!(out[1], conv[1]);
        assert_eq!(out[2].value, "In Image2, is it sunny?");
        assert_eq!(out[3], conv[3]);
    }

    #[test]
    fn grid_and_pip_prompts_with_trailing_placeholder() {
        let conv = vec![
            turn("human", "Describe the scene.\n<image>"),
            turn("gpt", "A street."),
        ];
        assert_eq!(
            rewrite(&conv, "<image>\n", "In Image3, ")[0].value,
            "<image>\nIn Image3, describe the scene."
        );
        let p = "For the image in the center, ";
        assert_eq!(
            rewrite(&conv, "<image>\n", p)[0].value,
            "<image>\nFor the image in the center, describe the scene."
        );
    }
}
