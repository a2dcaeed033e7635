//! The session's text API: raw-text completion ([`Session::complete`]) and chat turns
//! ([`Session::chat`]), with the transcript that lets a chat turn feed only what its rendered
//! conversation adds to the cache.
//!
//! Invariant: the transcript is the rendered conversation the cache holds (every turn rendered
//! with the chat template, then its answer's text); a turn whose rendering does not extend it
//! restarts the cache from the whole conversation.

use model_zoo::ChatMessage;

use super::{GenerateRequest, Generation, Session};
use crate::error::{EngineError, Result};

impl Session {
    /// Tokenizes and prefills raw text (no chat template), then generates.
    pub fn complete(
        &mut self,
        prompt: &str,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyInput { what: "the prompt" });
        }
        let tokens = self
            .engine
            .tokenizer()
            .encode(prompt, self.seen.is_empty())?;
        let (generation, error) = self.generate_after(&tokens, request, on_text)?;
        error.map_or(Ok(generation), Err)
    }

    /// One chat turn: the user's message is rendered with the model's chat template and only
    /// the part not yet in the cache is prefilled; the answer is generated and recorded. A
    /// turn that fails before its answer starts leaves the conversation as it was; one that
    /// fails during its answer keeps the answer so far, as a cancelled one does.
    pub fn chat(
        &mut self,
        user_message: &str,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        if user_message.trim().is_empty() {
            return Err(EngineError::EmptyInput {
                what: "the message",
            });
        }
        let mut messages: Vec<ChatMessage> = self
            .system
            .iter()
            .map(|s| ChatMessage::new("system", s))
            .collect();
        messages.extend(self.messages.iter().cloned());
        messages.push(ChatMessage::new("user", user_message));
        let rendered = self
            .engine
            .tokenizer()
            .apply_chat_template(&messages, true)?;
        let delta = match self.continuation(&rendered) {
            Some(delta) => delta.to_string(),
            None => {
                // The template re-rendered history differently (e.g. it trims answers): start over.
                let (system, history) = (self.system.clone(), self.messages.clone());
                self.clear()?;
                self.system = system;
                self.messages = history;
                rendered.clone()
            }
        };
        let tokens = self
            .engine
            .tokenizer()
            .encode(&delta, self.seen.is_empty())?;
        let (generation, error) = self.generate_after(&tokens, request, on_text)?;
        let answer = self.record_answer(rendered, &generation.tokens)?;
        self.messages.push(ChatMessage::new("user", user_message));
        self.messages.push(ChatMessage::new("assistant", &answer));
        error.map_or(Ok(generation), Err)
    }

    /// The part of `rendered` (a whole conversation rendered with the chat template) that is
    /// not in the cache yet: `None` unless the session's transcript is a prefix of it.
    pub(crate) fn continuation<'r>(&self, rendered: &'r str) -> Option<&'r str> {
        rendered.strip_prefix(self.transcript.as_str())
    }

    /// Records a finished turn: the transcript becomes `rendered` followed by the answer's
    /// text, which is returned.
    pub(crate) fn record_answer(&mut self, rendered: String, answer: &[u32]) -> Result<String> {
        let answer = self.engine.tokenizer().decode(answer)?;
        self.transcript = rendered + &answer;
        Ok(answer)
    }

    /// Replaces the recorded conversation (the scheduler's sessions keep what the client sent).
    pub(crate) fn set_messages(&mut self, messages: Vec<ChatMessage>) {
        self.system = None;
        self.messages = messages;
    }
}
