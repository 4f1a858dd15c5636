//! `text-stats`: a marketplace tool built as a WIT component (`tool-plugin` world).
//!
//! Input: `{"text": "...", "top": 5}`. Output: counts of words, lines, sentences and characters,
//! the `top` most frequent words (case-folded, ties by word), and reading minutes at 200 words
//! per minute. Needs no capabilities at all.

use qlayer_sdk::PluginError;
use qlayer_sdk::tool::Tool;
use std::collections::HashMap;

struct TextStats;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    text: String,
    #[serde(default = "default_top")]
    top: usize,
}

fn default_top() -> usize {
    5
}

impl Tool for TextStats {
    fn invoke(input_json: String) -> Result<String, PluginError> {
        let input: Input = serde_json::from_str(&input_json)
            .map_err(|e| PluginError::InvalidInput(format!("expected {{\"text\": string, \"top\"?: number}}: {e}")))?;
        if input.top > 100 {
            return Err(PluginError::InvalidInput("`top` is at most 100".into()));
        }
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut words = 0u64;
        for word in input.text.split(|c: char| !c.is_alphanumeric() && c != '\'') {
            let word = word.trim_matches('\'');
            if word.is_empty() {
                continue;
            }
            words += 1;
            *counts.entry(word.to_lowercase()).or_default() += 1;
        }
        let mut top: Vec<(String, u64)> = counts.into_iter().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(input.top);
        let sentences = input.text.split(['.', '!', '?']).filter(|s| s.chars().any(char::is_alphanumeric)).count();
        let output = serde_json::json!({
            "words": words,
            "lines": input.text.lines().count(),
            "sentences": sentences,
            "characters": input.text.chars().count(),
            "top_words": top.iter().map(|(w, n)| serde_json::json!({"word": w, "count": n})).collect::<Vec<_>>(),
            "reading_minutes": (words as f64 / 200.0 * 10.0).ceil() / 10.0,
        });
        Ok(output.to_string())
    }
}

qlayer_sdk::export_tool!(TextStats);
