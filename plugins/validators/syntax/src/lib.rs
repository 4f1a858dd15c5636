//! The `syntax` validator: parses generated files with pure-Rust parsers and reports every file
//! that does not parse, with its line. Rust with `syn`, JSON with `serde_json`, TOML with `toml`.
//! Files of other types are not checked, and it says so: one `info` diagnostic of rule
//! `unchecked` per file, which the run's report and status line name, never passing silently.

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
        out.extend(skipped.into_iter().map(|path| Diagnostic {
            severity: Severity::Info,
            rule: "unchecked".into(),
            path: Some(path),
            line: None,
            message: "not checked: the syntax validator reads Rust, JSON and TOML".into(),
        }));
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

    #[test]
    fn names_each_file_it_cannot_read() {
        let art = |p: &str, c: &str| Artifact { path: p.into(), media_type: "text/plain".into(), content: c.into() };
        let files = vec![art("main.py", "print(1)"), art("README.md", "# x"), art("ok.toml", "a = 1")];
        let found = Syntax::validate(files).unwrap();
        let unchecked: Vec<_> =
            found.iter().filter(|d| d.rule == "unchecked").map(|d| d.path.clone().unwrap()).collect();
        assert_eq!(unchecked, ["main.py", "README.md"]);
        assert!(found.iter().all(|d| d.severity == Severity::Info));
    }
}
