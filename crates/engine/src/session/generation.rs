//! What a generation asks for ([`GenerateRequest`]) and what it gives back ([`Generation`], with
//! its [`FinishReason`] and timings).
//!
//! Invariant: the rates are 0 (never NaN or infinite) when no time was measured.

use crate::sampling::SamplingParams;

/// What to generate.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct GenerateRequest {
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Stop strings (the text ends before the first one found).
    pub stop: Vec<String>,
    /// Stop at the model's end-of-sequence tokens.
    pub stop_at_eos: bool,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_at_eos: true,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string was produced.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The model's context is full.
    ContextFull,
    /// The caller's callback asked to stop.
    Cancelled,
}

impl FinishReason {
    /// In words, for people (the JSON name is its snake_case serialisation).
    pub fn describe(self) -> &'static str {
        match self {
            FinishReason::Eos => "end of text",
            FinishReason::Stop => "stop string",
            FinishReason::Length => "max tokens reached",
            FinishReason::ContextFull => "the model's context is full",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// The result of one generation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    /// The generated text (stop string excluded).
    pub text: String,
    /// The generated token ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// Tokens prefilled for this request.
    pub prompt_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Seconds spent in prefill.
    pub prefill_secs: f64,
    /// Seconds from the request to the first generated token.
    pub time_to_first_token_secs: f64,
    /// Seconds spent decoding (forward passes of generated tokens and sampling).
    pub decode_secs: f64,
    /// Forward passes during decoding.
    pub decode_steps: usize,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_secs)
    }

    /// Generated tokens per second over the decode forward passes.
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}
