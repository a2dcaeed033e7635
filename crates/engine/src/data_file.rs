//! Reading the data files users give (training text and chats, evaluation tasks): a file's
//! whole text without a leading UTF-8 byte-order mark (some editors write one), and JSONL lines
//! parsed with their 1-based numbers. Every failure is an [`EngineError::DataFile`] naming the
//! file and, where one is at fault, the line.

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
    let mut text = std::fs::read_to_string(path)
        .map_err(|e| data_error(path, None, "cannot read", Some(Box::new(e))))?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// Line `line` (1-based) of `file`, `text`, as JSON.
pub(crate) fn parse_json_line(file: &Path, line: usize, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text)
        .map_err(|e| data_error(file, Some(line), "invalid JSON", Some(Box::new(e))))
}
