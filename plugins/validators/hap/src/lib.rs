//! The `hap` validator: hate, abuse and profanity in generated text.
//!
//! Each text file is split into words (letters and digits; identifiers split at `_`, `-` and
//! camel case, so `shit_list` and `stupidUser` are read as words), and each entry of the list, a
//! word or a phrase, matches whole words case-insensitively. A finding is an error with the
//! file, line and category; the word is masked (`f***`), so the run's report does not repeat it.
//!
//! The list is `words.txt`, extended or replaced by the install's config: `words` (entries
//! separated by commas or newlines, each `category:entry` or just `entry`, which is abuse),
//! `words-mode` (`extend`, the default, or `replace`) and `allow` (entries to drop, for a
//! project whose domain needs a word).

use qlayer_sdk::validator::Validator;
use qlayer_sdk::*;
use std::collections::BTreeMap;

const DEFAULT: &str = include_str!("words.txt");

/// The list: each entry's words, by its first word, with its category.
pub struct List {
    by_first: BTreeMap<String, Vec<(Vec<String>, String)>>,
}

fn entry(raw: &str) -> Option<(String, Vec<String>)> {
    let raw = raw.trim();
    if raw.is_empty() || raw.starts_with('#') {
        return None;
    }
    let (category, words) = match raw.split_once(':') {
        Some((c, w)) if matches!(c.trim(), "hate" | "abuse" | "profanity") => (c.trim().to_string(), w),
        _ => ("abuse".to_string(), raw),
    };
    let words: Vec<String> = words.split_whitespace().map(str::to_lowercase).collect();
    if words.is_empty() { None } else { Some((category, words)) }
}

impl List {
    /// The default list with the config applied; an error names a bad `words-mode`.
    pub fn new(words: Option<&str>, mode: Option<&str>, allow: Option<&str>) -> Result<Self, String> {
        let split = |s: &str| s.split([',', '\n']).filter_map(entry).collect::<Vec<_>>();
        let mut entries = match mode.map(str::trim) {
            None | Some("" | "extend") => DEFAULT.lines().filter_map(entry).collect(),
            Some("replace") => Vec::new(),
            Some(other) => return Err(format!("config `words-mode` must be `extend` or `replace`, not `{other}`")),
        };
        entries.extend(words.map(split).unwrap_or_default());
        let allowed: Vec<Vec<String>> = allow.map(split).unwrap_or_default().into_iter().map(|(_, w)| w).collect();
        let mut by_first: BTreeMap<String, Vec<(Vec<String>, String)>> = BTreeMap::new();
        for (category, words) in entries {
            if !allowed.contains(&words) {
                by_first.entry(words[0].clone()).or_default().push((words, category));
            }
        }
        Ok(List { by_first })
    }

    /// The findings in one file.
    pub fn scan(&self, path: &str, text: &str) -> Vec<Diagnostic> {
        let words = words(text);
        let mut found = Vec::new();
        let mut i = 0;
        while i < words.len() {
            let (line, column, word) = &words[i];
            let matched = self.by_first.get(word.as_str()).and_then(|entries| {
                entries
                    .iter()
                    .filter(|(e, _)| {
                        words.len() - i >= e.len() && e.iter().zip(&words[i..]).all(|(a, (_, _, b))| a == b)
                    })
                    .max_by_key(|(e, _)| e.len())
            });
            match matched {
                Some((entry, category)) => {
                    let masked: Vec<String> = entry.iter().map(|w| mask(w)).collect();
                    found.push(Diagnostic {
                        severity: Severity::Error,
                        rule: format!("hap-{category}"),
                        path: Some(path.into()),
                        line: Some(*line),
                        column: Some(*column),
                        message: format!(
                            "{} ({category}): generated text must carry no hate, abuse or profanity",
                            masked.join(" ")
                        ),
                    });
                    i += entry.len();
                }
                None => i += 1,
            }
        }
        found
    }
}

/// `f***`: the first letter, then one `*` a letter.
fn mask(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map(|c| c.to_string()).unwrap_or_default() + &"*".repeat(chars.count())
}

/// A text's words, lower case, with their lines and columns (1-based, in characters): runs of
/// letters and digits, split at camel case.
fn words(text: &str) -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n as u32 + 1;
        let mut current = String::new();
        let mut start = 0u32;
        let mut prev_lower = false;
        for (col, c) in (1u32..).zip(line.chars()) {
            if c.is_alphanumeric() {
                if c.is_uppercase() && prev_lower && !current.is_empty() {
                    out.push((line_no, start, std::mem::take(&mut current)));
                }
                if current.is_empty() {
                    start = col;
                }
                prev_lower = c.is_lowercase() || c.is_ascii_digit();
                current.extend(c.to_lowercase());
            } else {
                if !current.is_empty() {
                    out.push((line_no, start, std::mem::take(&mut current)));
                }
                prev_lower = false;
            }
        }
        if !current.is_empty() {
            out.push((line_no, start, current));
        }
    }
    out
}

struct Hap;

impl Validator for Hap {
    fn validate(artifacts: Vec<Artifact>) -> Result<Vec<Diagnostic>, PluginError> {
        let (words, mode, allow) = (host::config("words"), host::config("words-mode"), host::config("allow"));
        let list = List::new(words.as_deref(), mode.as_deref(), allow.as_deref()).map_err(PluginError::InvalidInput)?;
        let mut found = vec![Diagnostic {
            severity: Severity::Info,
            rule: "unchecked".into(),
            path: None,
            line: None,
            column: None,
            message: "reads text for hate, abuse and profanity; checks no file's syntax".into(),
        }];
        for a in &artifacts {
            if let Some(text) = a.as_text() {
                found.extend(list.scan(&a.path, text));
            }
        }
        Ok(found)
    }
}

qlayer_sdk::export_validator!(Hap);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rules(list: &List, text: &str) -> Vec<(String, (u32, u32), String)> {
        list.scan("a.md", text).into_iter().map(|d| (d.rule, (d.line.unwrap(), d.column.unwrap()), d.message)).collect()
    }

    #[test]
    fn whole_words_phrases_and_identifiers() {
        let list = List::new(None, None, None).unwrap();
        let found = rules(
            &list,
            "# Title\nThis is SHIT.\nlet shit_list = 1;\nconst stupidUser = f(); // you stupid thing\nassess the scunthorpe class\nHeil   Hitler\n",
        );
        let short: Vec<(&str, (u32, u32))> = found.iter().map(|(r, at, _)| (r.as_str(), *at)).collect();
        assert_eq!(
            short,
            [("hap-profanity", (2, 9)), ("hap-profanity", (3, 5)), ("hap-abuse", (4, 28)), ("hap-hate", (6, 1))],
            "{found:?}"
        );
        assert!(found[0].2.starts_with("s*** (profanity)"), "{}", found[0].2);
        assert!(found[3].2.starts_with("h*** h***** (hate)"), "{}", found[3].2);
        assert!(found.iter().all(|(_, _, m)| !m.contains("shit") && !m.contains("hitler")));
    }

    #[test]
    fn the_list_is_configurable() {
        let list = List::new(Some("profanity: darn, profanity: heck it\nfrobnicate"), None, Some("bullshit")).unwrap();
        let found = rules(&list, "darn; heck it; frobnicate; bullshit; fuck\n");
        let short: Vec<&str> = found.iter().map(|(r, _, _)| r.as_str()).collect();
        assert_eq!(short, ["hap-profanity", "hap-profanity", "hap-abuse", "hap-profanity"], "{found:?}");
        let replaced = List::new(Some("darn"), Some("replace"), None).unwrap();
        assert_eq!(rules(&replaced, "fuck darn\n").len(), 1);
        assert!(List::new(None, Some("merge"), None).err().unwrap().contains("`words-mode`"));
    }
}

/// A measurement, not a check: `CORPUS=LIST cargo test -p qlayer-validator-hap -- --ignored
/// --nocapture` prints the findings in each file LIST names (in ordinary text, false alarms).
#[cfg(test)]
mod corpus {
    #[test]
    #[ignore = "a measurement over files named by CORPUS"]
    fn corpus() {
        #![allow(clippy::print_stdout, clippy::unwrap_used)]
        let Ok(list) = std::env::var("CORPUS") else { return };
        let words = super::List::new(None, None, None).unwrap();
        let (mut files, mut lines, mut found) = (0, 0, 0);
        for path in std::fs::read_to_string(list).unwrap_or_default().lines() {
            let Ok(text) = std::fs::read_to_string(path) else { continue };
            files += 1;
            lines += text.lines().count();
            for d in words.scan(path, &text) {
                found += 1;
                println!("{path}:{} {} {}", d.line.unwrap_or(0), d.rule, d.message);
            }
        }
        println!("{found} findings in {files} files, {lines} lines");
    }
}
