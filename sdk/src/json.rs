//! Structured output from LLM text. Models wrap JSON in prose or code fences, truncate it, or
//! get a field wrong; [`extract`] finds the JSON, parses it into your type, and when that fails
//! says exactly what was wrong in words you can send back to the model ([`JsonError::feedback`]).

use serde::de::DeserializeOwned;
use std::fmt;

/// Why no value could be read from the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// The text holds no JSON object or array.
    NotFound,
    /// JSON was found but does not parse, or does not have the expected shape.
    Invalid {
        /// serde_json's message, with line and column inside the JSON.
        message: String,
    },
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::NotFound => f.write_str("the reply contains no JSON object"),
            JsonError::Invalid { message } => write!(f, "the reply's JSON is not valid: {message}"),
        }
    }
}

impl std::error::Error for JsonError {}

impl JsonError {
    /// A message to send back to the model so it can correct itself.
    ///
    /// ```
    /// let err = qlayer_sdk::json::extract::<serde_json::Value>("no json here").unwrap_err();
    /// assert!(err.feedback().contains("only a JSON object"));
    /// ```
    pub fn feedback(&self) -> String {
        format!(
            "Your previous reply could not be used: {self}. Reply with only a JSON object, no prose and no code fences."
        )
    }
}

/// JSON text the contract carries (a tool's parameters, a response schema) as a value; `what`
/// names it in the error, which is `invalid-input`.
///
/// ```
/// assert!(qlayer_sdk::json::value(r#"{"type": "object"}"#, "the schema").is_ok());
/// let e = qlayer_sdk::json::value("{", "the parameters of tool `f`").unwrap_err();
/// assert!(matches!(e, qlayer_sdk::PluginError::InvalidInput(m) if m.contains("tool `f`")));
/// ```
pub fn value(text: &str, what: &str) -> Result<serde_json::Value, crate::PluginError> {
    serde_json::from_str(text).map_err(|e| crate::PluginError::InvalidInput(format!("{what} is not valid JSON: {e}")))
}

/// Finds the JSON object or array in `text` (the whole text, a fenced code block, or the first
/// balanced `{...}`/`[...]`) and parses it as `T`.
///
/// ```
/// #[derive(Debug, serde::Deserialize)]
/// struct Prd { title: String }
/// let prd: Prd = qlayer_sdk::json::extract("Sure!\n```json\n{\"title\": \"Todo\"}\n```").unwrap();
/// assert_eq!(prd.title, "Todo");
///
/// let err = qlayer_sdk::json::extract::<Prd>("{\"name\": 1}").unwrap_err();
/// assert!(err.to_string().contains("missing field `title`"));
/// ```
pub fn extract<T: DeserializeOwned>(text: &str) -> Result<T, JsonError> {
    let mut first_error = None;
    for candidate in candidates(text) {
        match serde_json::from_str::<T>(candidate) {
            Ok(value) => return Ok(value),
            Err(e) => {
                first_error.get_or_insert_with(|| JsonError::Invalid { message: e.to_string() });
            }
        }
    }
    Err(first_error.unwrap_or(JsonError::NotFound))
}

fn candidates(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let trimmed = text.trim();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        out.push(trimmed);
    }
    // Fenced blocks: ```json ... ``` or ``` ... ```
    let mut rest = text;
    while let Some(start) = rest.find("```") {
        let after = &rest[start + 3..];
        let body_start = after.find('\n').map(|i| i + 1).unwrap_or(0);
        let body = &after[body_start..];
        match body.find("```") {
            Some(end) => {
                out.push(body[..end].trim());
                rest = &body[end + 3..];
            }
            None => break,
        }
    }
    if let Some(balanced) = first_balanced(text) {
        out.push(balanced);
    }
    out
}

/// The first balanced JSON object or array, skipping brackets inside strings.
fn first_balanced(text: &str) -> Option<&str> {
    let start = text.find(['{', '['])?;
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    for (i, c) in text[start..].char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some(&text[start..start + i + 1]);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn finds_json_after_prose_with_braces_in_strings() {
        let v: serde_json::Value = extract("Here you go: {\"a\": \"}{\", \"b\": [1]} trailing").unwrap();
        assert_eq!(v["a"], "}{");
    }

    #[test]
    fn truncated_json_names_the_position() {
        let err = extract::<serde_json::Value>("{\"a\": [1, 2").unwrap_err();
        assert!(err.to_string().contains("EOF while parsing a list at line 1 column 11"), "{err}");
        assert_eq!(extract::<serde_json::Value>("nothing here"), Err(JsonError::NotFound));
    }
}
