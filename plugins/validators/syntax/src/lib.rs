//! The `syntax` validator: parses generated files with pure-Rust parsers and reports every file
//! that does not parse, with its line. Rust with `syn`, JSON with `serde_json`, TOML with `toml`.
//! Files of other types are skipped (an `info` diagnostic says which), never passed silently.

use qlayer_sdk::validator::Validator;
use qlayer_sdk::*;

struct Syntax;

fn error(rule: &str, path: &str, line: Option<u32>, message: String) -> Diagnostic {
    Diagnostic { severity: Severity::Error, rule: rule.into(), path: Some(path.into()), line, message }
}

fn line_of(text: &str, offset: usize) -> u32 {
    text[..offset.min(text.len())].matches('\n').count() as u32 + 1
}

/// Checks one file; `None` when its type is not one this validator reads.
fn check(path: &str, text: &str) -> Option<Vec<Diagnostic>> {
    let ext = path.rsplit('.').next().unwrap_or("");
    let found = match ext {
        "rs" => match syn::parse_file(text) {
            Ok(_) => vec![],
            Err(e) => e
                .into_iter()
                .map(|e| error("rust-syntax", path, Some(e.span().start().line as u32), e.to_string()))
                .collect(),
        },
        "json" => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(_) => vec![],
            Err(e) => vec![error("json-syntax", path, Some(e.line() as u32), e.to_string())],
        },
        "toml" => match toml::from_str::<toml::Table>(text) {
            Ok(_) => vec![],
            Err(e) => {
                let line = e.span().map(|s| line_of(text, s.start));
                vec![error("toml-syntax", path, line, e.message().to_string())]
            }
        },
        _ => return None,
    };
    Some(found)
}

impl Validator for Syntax {
    fn validate(artifacts: Vec<Artifact>) -> Result<Vec<Diagnostic>, PluginError> {
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        for a in &artifacts {
            let Some(text) = a.as_text() else {
                out.push(error("utf8", &a.path, None, "the file is not valid UTF-8".into()));
                continue;
            };
            match check(&a.path, text) {
                Some(found) => out.extend(found),
                None => skipped.push(a.path.clone()),
            }
        }
        if !skipped.is_empty() {
            out.push(Diagnostic {
                severity: Severity::Info,
                rule: "syntax-skipped".into(),
                path: None,
                line: None,
                message: format!("no parser for: {}", skipped.join(", ")),
            });
        }
        Ok(out)
    }
}

qlayer_sdk::export_validator!(Syntax);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reports_the_line_of_a_rust_error() {
        let found = check("src/main.rs", "fn main() {\n    let x = ;\n}\n").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].line, Some(2));
        assert_eq!(found[0].rule, "rust-syntax");
    }

    #[test]
    fn reports_json_and_toml_lines() {
        assert_eq!(check("a.json", "{\n\"a\": }").unwrap()[0].line, Some(2));
        assert_eq!(check("Cargo.toml", "[package]\nname = \n").unwrap()[0].line, Some(2));
        assert!(check("ok.toml", "a = 1").unwrap().is_empty());
        assert!(check("x.py", "print(1)").is_none());
    }
}
