//! Text streaming: incremental detokenization and stop strings.
//!
//! Invariants: the concatenation of every chunk `Detokenizer::push` returns equals the decoding of
//! all ids pushed (once `finish` is called); no chunk ends inside a UTF-8 character made of
//! several tokens. `StopMatcher` never releases text that could still turn out to be the start of
//! a stop string, and never releases anything after a stop string.

use model_zoo::Tokenizer;

/// Turns a stream of token ids into a stream of text chunks (one generation, one tokenizer: the
/// caller passes the same tokenizer to every call).
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// A detokenizer for one generation.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the new text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> model_zoo::Result<Option<String>> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let after = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if after.len() > before.len()
            && !after.ends_with('\u{FFFD}')
            && after.is_char_boundary(before.len())
        {
            let delta = after[before.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// Text still held back (an incomplete character at the end).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> model_zoo::Result<Option<String>> {
        let before = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let after = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.read_offset = self.ids.len();
        self.prefix_offset = self.read_offset;
        Ok(
            (after.len() > before.len() && after.is_char_boundary(before.len()))
                .then(|| after[before.len()..].to_string()),
        )
    }
}

/// Finds stop strings in streamed text, holding back what might be the start of one.
#[derive(Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Feeds a chunk. Returns the text safe to release and whether a stop string was hit (the
    /// stop string and everything after it are dropped).
    pub fn push(&mut self, chunk: &str) -> (String, bool) {
        self.pending.push_str(chunk);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Releases what is held back once generation ends without a stop.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop` (char-aligned).
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_holds_back_partial_matches() {
        let mut m = StopMatcher::new(&["\nUser:".to_string()]);
        assert_eq!(m.push("Hello"), ("Hello".to_string(), false));
        assert_eq!(m.push(" there\nUs"), (" there".to_string(), false));
        assert_eq!(m.push("er: hi"), (String::new(), true));
    }

    #[test]
    fn stop_matcher_releases_false_alarms() {
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        assert_eq!(m.push("a ST"), ("a ".to_string(), false));
        assert_eq!(m.push("ART"), ("START".to_string(), false));
        assert_eq!(m.push("x ST"), ("x ".to_string(), false));
        assert_eq!(m.flush(), "ST");
    }

    #[test]
    fn earliest_stop_wins() {
        let mut m = StopMatcher::new(&["b".to_string(), "a".to_string()]);
        assert_eq!(m.push("xxabyy"), ("xx".to_string(), true));
    }
}
