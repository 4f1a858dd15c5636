//! The `syntax` validator: parses generated files with pure-Rust parsers and reports every file
//! that does not parse, with its line and, where the parser gives one, its column (in characters):
//! every language but those the lexical checks read (`lexical`), which give a line. Rust with `syn`, Python with RustPython's parser, JSON
//! with `serde_json`, TOML with `toml`, YAML with `yaml-rust2`; Dockerfiles with a parser of
//! their instructions (this module's); Markdown for unclosed code fences (every text is
//! CommonMark: an unclosed fence is the mistake that swallows the rest of a document). Files of
//! other types are not checked, and it says so: one `info` diagnostic of rule `unchecked` per
//! file, which the run's report and status line name, never passing silently.

mod lexical;

use qlayer_sdk::validator::Validator;
use qlayer_sdk::*;

struct Syntax;

/// An error at a line (1-based) and, when known, a column (1-based, in characters).
fn error(rule: &str, path: &str, at: Option<(u32, Option<u32>)>, message: String) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        rule: rule.into(),
        path: Some(path.into()),
        line: at.map(|(line, _)| line),
        column: at.and_then(|(_, column)| column),
        message,
    }
}

/// The line and column (1-based, the column in characters) of a byte offset.
fn position(text: &str, offset: usize) -> (u32, Option<u32>) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (before.matches('\n').count() as u32 + 1, Some(before[line_start..].chars().count() as u32 + 1))
}

/// The byte offset of a 1-based line and a 1-based byte column within it (as serde_json counts).
fn offset_of(text: &str, line: usize, byte_column: usize) -> usize {
    let start: usize = text.split_inclusive('\n').take(line.saturating_sub(1)).map(str::len).sum();
    start + byte_column.saturating_sub(1)
}

/// Where a line's text starts: the column after its indentation.
fn indented(line: u32, text: &str) -> Option<(u32, Option<u32>)> {
    Some((line, Some(text.chars().take_while(|c| c.is_whitespace()).count() as u32 + 1)))
}

/// Dockerfile instructions (as `docker build` knows them).
const INSTRUCTIONS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// Whether a file name is a Dockerfile's (`Dockerfile`, `Containerfile`, `Dockerfile.dev`,
/// `app.dockerfile`).
fn is_dockerfile(name: &str) -> bool {
    name == "Dockerfile"
        || name == "Containerfile"
        || name.starts_with("Dockerfile.")
        || name.starts_with("Containerfile.")
        || name.to_ascii_lowercase().ends_with(".dockerfile")
}

/// A Dockerfile's instructions (continuation lines joined), each with its first line: unknown
/// instructions, one without arguments, anything but `ARG` before the first `FROM`, and an
/// exec form (`["a", "b"]`) that is not a JSON array of strings.
fn check_dockerfile(path: &str, text: &str) -> Vec<Diagnostic> {
    let mut found = Vec::new();
    let mut seen_from = false;
    let mut lines = text.lines().enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let first = indented(i as u32 + 1, line);
        let mut instruction = trimmed.to_string();
        while instruction.ends_with('\\') {
            instruction.pop();
            // Comment lines inside a continuation are dropped, as docker does.
            match lines.by_ref().map(|(_, l)| l.trim()).find(|l| !l.starts_with('#')) {
                Some(next) => {
                    instruction.push(' ');
                    instruction.push_str(next);
                }
                None => {
                    found.push(error(
                        "dockerfile-syntax",
                        path,
                        first,
                        "the file ends inside a continued line (`\\` on the last line)".into(),
                    ));
                    break;
                }
            }
        }
        let (keyword, args) = instruction.split_once(char::is_whitespace).unwrap_or((&instruction, ""));
        let keyword = keyword.to_ascii_uppercase();
        let args = args.trim();
        if !INSTRUCTIONS.contains(&keyword.as_str()) {
            found.push(error("dockerfile-syntax", path, first, format!("unknown instruction `{keyword}`")));
            continue;
        }
        if args.is_empty() {
            found.push(error("dockerfile-syntax", path, first, format!("`{keyword}` needs arguments")));
            continue;
        }
        if !seen_from && keyword != "ARG" && keyword != "FROM" {
            found.push(error(
                "dockerfile-syntax",
                path,
                first,
                format!("`{keyword}` before the first `FROM`: only `ARG` may come before it"),
            ));
        }
        seen_from |= keyword == "FROM";
        let exec_form = matches!(keyword.as_str(), "CMD" | "ENTRYPOINT" | "RUN" | "SHELL" | "VOLUME");
        if exec_form && args.starts_with('[') && serde_json::from_str::<Vec<String>>(args).is_err() {
            found.push(error(
                "dockerfile-syntax",
                path,
                first,
                format!("`{keyword}` in exec form must be a JSON array of strings: {args}"),
            ));
        }
    }
    if !seen_from && found.is_empty() {
        found.push(error("dockerfile-syntax", path, None, "no `FROM` instruction".into()));
    }
    found
}

/// A Markdown file's fenced code blocks: one opened and never closed is an error at its line.
fn check_markdown(path: &str, text: &str) -> Vec<Diagnostic> {
    let mut open: Option<((u32, Option<u32>), char, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let rest = &line[indent..];
        let fence = rest.chars().next().filter(|c| (*c == '`' || *c == '~') && indent < 4);
        let Some(c) = fence else { continue };
        let run = rest.chars().take_while(|x| *x == c).count();
        if run < 3 {
            continue;
        }
        match open {
            None => open = Some(((i as u32 + 1, Some(indent as u32 + 1)), c, run)),
            Some((_, oc, on)) if oc == c && run >= on && rest[run..].trim().is_empty() => open = None,
            Some(_) => {}
        }
    }
    match open {
        Some((at, c, n)) => vec![error(
            "markdown-syntax",
            path,
            Some(at),
            format!("this code fence ({}) is never closed: the rest of the document is code", c.to_string().repeat(n)),
        )],
        None => vec![],
    }
}

/// Checks one file; `None` when its type is not one this validator reads.
fn check(path: &str, text: &str) -> Option<Vec<Diagnostic>> {
    let name = path.rsplit('/').next().unwrap_or(path);
    if is_dockerfile(name) {
        return Some(check_dockerfile(path, text));
    }
    let ext = if name.contains('.') { name.rsplit('.').next().unwrap_or("") } else { "" };
    let found = match ext {
        "py" | "pyi" => match rustpython_parser::parse(text, rustpython_parser::Mode::Module, path) {
            Ok(_) => vec![],
            Err(e) => {
                vec![error("python-syntax", path, Some(position(text, usize::from(e.offset))), e.error.to_string())]
            }
        },
        "yaml" | "yml" => match yaml_rust2::YamlLoader::load_from_str(text) {
            Ok(_) => vec![],
            Err(e) => {
                let (line, column) = (e.marker().line() as u32, e.marker().col() as u32 + 1);
                vec![error("yaml-syntax", path, Some((line, Some(column))), e.info().to_string())]
            }
        },
        "md" | "markdown" => check_markdown(path, text),
        "rs" => match syn::parse_file(text) {
            Ok(_) => vec![],
            Err(e) => e
                .into_iter()
                .map(|e| {
                    let start = e.span().start();
                    let at = (start.line as u32, Some(start.column as u32 + 1));
                    error("rust-syntax", path, Some(at), e.to_string())
                })
                .collect(),
        },
        "json" => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(_) => vec![],
            Err(e) => vec![error(
                "json-syntax",
                path,
                Some(position(text, offset_of(text, e.line(), e.column()))),
                e.to_string(),
            )],
        },
        "toml" => match toml::from_str::<toml::Table>(text) {
            Ok(_) => vec![],
            Err(e) => {
                let at = e.span().map(|s| position(text, s.start));
                vec![error("toml-syntax", path, at, e.message().to_string())]
            }
        },
        _ => {
            let lang = lexical::Lang::of(name, ext)?;
            match lexical::check(lang, text) {
                None => vec![],
                Some((line, message)) => vec![error(lang.rule(), path, Some((line, None)), message)],
            }
        }
    };
    Some(found)
}

/// What it reads, for the `unchecked` diagnostic.
const READS: &str = "Rust, Python, JSON, TOML, YAML, Markdown and Dockerfiles, and the tokens and nesting of C, C++, \
                     C#, Java, Go, Kotlin, Swift, Dart, Scala, JavaScript, TypeScript, PHP, Ruby, CSS, SQL, Bash and HTML";

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
            column: None,
            message: format!("not checked: the syntax validator reads {READS}"),
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
        assert_eq!((found[0].line, found[0].column), (Some(2), Some(13)));
        assert_eq!(found[0].rule, "rust-syntax");
    }

    #[test]
    fn reports_json_and_toml_lines() {
        assert_eq!(check("a.json", "{\n\"a\": }").unwrap()[0].line, Some(2));
        assert_eq!(check("Cargo.toml", "[package]\nname = \n").unwrap()[0].line, Some(2));
        assert!(check("ok.toml", "a = 1").unwrap().is_empty());
        assert!(check("x.lua", "print(1)").is_none());
    }

    #[test]
    fn names_each_file_it_cannot_read() {
        let art = |p: &str, c: &str| Artifact { path: p.into(), media_type: "text/plain".into(), content: c.into() };
        let files = vec![art("main.lua", "print(1)"), art("LICENSE", "MIT"), art("ok.toml", "a = 1")];
        let found = Syntax::validate(files).unwrap();
        let unchecked: Vec<_> =
            found.iter().filter(|d| d.rule == "unchecked").map(|d| d.path.clone().unwrap()).collect();
        assert_eq!(unchecked, ["main.lua", "LICENSE"]);
        assert!(found.iter().all(|d| d.severity == Severity::Info));
    }

    /// Each language: a valid sample, and an invalid one with the line of its error.
    #[test]
    fn each_language_has_a_valid_and_an_invalid_sample() {
        let cases: &[(&str, &str, &str, (u32, u32), &str)] = &[
            ("main.py", "def f(x):\n    return x + 1\n", "def f(x):\n    return x +\n", (2, 15), "python-syntax"),
            ("types.pyi", "x: int\n", "def (:\n", (1, 5), "python-syntax"),
            ("ci.yml", "on: [push]\njobs:\n  a: 1\n", "on: [push]\njobs: [a\n", (3, 1), "yaml-syntax"),
            ("a.yaml", "a: 1\n", "a: 1\n b: 2\n", (2, 3), "yaml-syntax"),
            ("a.json", "{\"a\": 1}", "{\"é\": 1,\n  \"b\": }", (2, 8), "json-syntax"),
            ("Cargo.toml", "a = 1", "[package]\nname = \n", (2, 8), "toml-syntax"),
            ("src/lib.rs", "pub fn f() {}\n", "pub fn f() {\n    let é = ;\n}\n", (2, 13), "rust-syntax"),
            (
                "Dockerfile",
                "FROM rust:1 AS b\nRUN cargo \\\n  build\nCMD [\"x\"]\n",
                "FROM x\nRUN a\n  COPPY . .\n",
                (3, 3),
                "dockerfile-syntax",
            ),
            ("app.dockerfile", "ARG V=1\nFROM x:${V}\n", "RUN make\nFROM x\n", (1, 1), "dockerfile-syntax"),
            (
                "Containerfile",
                "FROM x\nENTRYPOINT [\"a\", \"b\"]\n",
                "FROM x\n\nENTRYPOINT [\"a\", b]\n",
                (3, 1),
                "dockerfile-syntax",
            ),
            ("README.md", "# T\n\n```sh\nrun\n```\n", "# T\n\n  ```sh\nrun\n", (3, 3), "markdown-syntax"),
        ];
        for (path, good, bad, (line, column), rule) in cases {
            assert_eq!(check(path, good).unwrap(), vec![], "{path}: {good}");
            let found = check(path, bad).unwrap();
            assert_eq!(found.len(), 1, "{path}: {found:?}");
            let d = &found[0];
            assert_eq!(
                (d.line, d.column, d.rule.as_str()),
                (Some(*line), Some(*column), *rule),
                "{path}: {:?}",
                d.message
            );
        }
    }
}
