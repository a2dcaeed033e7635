//! Reading the data files users give (training text and chats, evaluation tasks, a benchmark's
//! text): a file's whole text, or only its beginning, without a leading UTF-8 byte-order mark
//! (some editors write one), and JSONL lines parsed with their 1-based numbers. Every failure
//! is an [`EngineError::DataFile`] naming the file and, where one is at fault, the line.

use std::path::Path;

use crate::error::{EngineError, Result};

/// The error of `file` (at `line`, if one is at fault): `problem`, caused by `source`.
pub(crate) fn data_error(
    file: &Path,
    line: Option<usize>,
    problem: impl Into<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
) -> EngineError {
    EngineError::DataFile {
        file: file.to_path_buf(),
        line,
        problem: problem.into(),
        source,
    }
}

/// The text of `path`, without a leading byte-order mark.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| data_error(path, None, "cannot read", Some(Box::new(e))))?;
    Ok(without_bom(text))
}

/// `text` without a leading byte-order mark.
fn without_bom(mut text: String) -> String {
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    text
}

/// The text of `path`'s first `max_bytes` bytes (cut at the last whole character), without a
/// leading byte-order mark: for files of which only a beginning is used, however large (or
/// endless, as `/dev/zero`) they are.
pub(crate) fn read_text_prefix(path: &Path, max_bytes: u64) -> Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max_bytes).read_to_end(&mut bytes))
        .map_err(|e| data_error(path, None, "cannot read", Some(Box::new(e))))?;
    let not_utf8 = |e| data_error(path, None, "is not UTF-8 text", Some(Box::new(e)));
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            // A character cut by the limit is dropped; any other invalid byte is an error.
            let utf8 = e.utf8_error();
            if utf8.error_len().is_some() || (e.as_bytes().len() as u64) < max_bytes {
                return Err(not_utf8(utf8));
            }
            let mut bytes = e.into_bytes();
            bytes.truncate(utf8.valid_up_to());
            String::from_utf8(bytes).map_err(|e| not_utf8(e.utf8_error()))?
        }
    };
    Ok(without_bom(text))
}

/// Line `line` (1-based) of `file`, `text`, as JSON.
pub(crate) fn parse_json_line(file: &Path, line: usize, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text)
        .map_err(|e| data_error(file, Some(line), "invalid JSON", Some(Box::new(e))))
}
