//! Conversation templates that wrap a question into the prompt a LLaVA model was trained on.
use std::fmt;
use std::str::FromStr;

/// LLaVA-1.5's system prompt (`conv_vicuna_v1`).
pub const SYSTEM_VICUNA_V1: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";
/// LLaVA's `conv_llava_v0` system prompt (MIA-DPO's selection scripts use this template).
pub const SYSTEM_LLAVA_V0: &str = "A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions.";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Template {
    /// `"{SYSTEM} USER: {question} ASSISTANT:"` (LLaVA-1.5 training)
    #[default]
    VicunaV1,
    /// `"{SYSTEM}###Human: {question}###Assistant:"` (LLaVA `conv_llava_v0`)
    LlavaV0,
    /// `"USER: {question} ASSISTANT:"` (the llava-hf processor's chat template)
    LlavaHf,
    /// the question as it is
    Plain,
}

impl Template {
    pub const NAMES: [&'static str; 4] = ["vicuna_v1", "llava_v0", "llava_hf", "plain"];

    /// The prompt text for one user turn, ending where the assistant's answer starts.
    pub fn apply(self, question: &str) -> String {
        match self {
            Template::VicunaV1 => format!("{SYSTEM_VICUNA_V1} USER: {question} ASSISTANT:"),
            Template::LlavaV0 => format!("{SYSTEM_LLAVA_V0}###Human: {question}###Assistant:"),
            Template::LlavaHf => format!("USER: {question} ASSISTANT:"),
            Template::Plain => question.to_string(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Template::VicunaV1 => "vicuna_v1",
            Template::LlavaV0 => "llava_v0",
            Template::LlavaHf => "llava_hf",
            Template::Plain => "plain",
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Template {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "vicuna_v1" => Template::VicunaV1,
            "llava_v0" => Template::LlavaV0,
            "llava_hf" => Template::LlavaHf,
            "plain" => Template::Plain,
            _ => {
                return Err(format!(
                    "unknown template `{s}` (expected one of {})",
                    Template::NAMES.join(", ")
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_as_llava_does() {
        assert_eq!(
            Template::VicunaV1.apply("<image>\nHi?"),
            format!("{SYSTEM_VICUNA_V1} USER: <image>\nHi? ASSISTANT:")
        );
        assert_eq!(
            Template::LlavaV0.apply("Q"),
            format!("{SYSTEM_LLAVA_V0}###Human: Q###Assistant:")
        );
        assert_eq!(Template::LlavaHf.apply("Q"), "USER: Q ASSISTANT:");
        assert_eq!(Template::Plain.apply("Q"), "Q");
        for n in Template::NAMES {
            assert_eq!(n.parse::<Template>().unwrap().name(), n);
        }
        assert!("chatml".parse::<Template>().unwrap_err().contains("vicuna_v1"));
    }
}
