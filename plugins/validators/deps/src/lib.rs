//! The `deps` validator: a project's imports against its dependency manifests.
//!
//! - **Python**: `import`s (from the syntax tree; an import guarded by `except ImportError` is
//!   optional and skipped) against `pyproject.toml` (`[project]` dependencies and optional
//!   dependencies, `[dependency-groups]`, Poetry's tables) and `requirements*.txt`; each
//!   requirement must be a valid PEP 508 requirement.
//! - **JavaScript and TypeScript**: `import`, `export … from`, `require()` and `import()` against
//!   `package.json` (all four dependency tables); each name must be a valid npm name and each
//!   range a valid semver range or a known protocol.
//! - **Rust**: the first segment of every path (`use serde::…`, `tokio::spawn(…)`) against
//!   `Cargo.toml` (dependencies of every kind and target, renames, the workspace's table); each
//!   version requirement must be valid.
//! - **Go**: imports against `go.mod`'s `require`s; each version must be a valid module version.
//!
//! A dependency the manifest declares that the lock file beside it (package-lock.json, Cargo.lock,
//! go.sum, uv.lock, poetry.lock) does not hold is an error: the lock is out of date. A module of
//! the language's standard library (or Node's built-ins) declared as a package is an error too: `sqlite3` in requirements.txt installs nothing useful, `fs` in package.json is a
//! placeholder package. Each file is checked against its nearest manifest (a monorepo's packages
//! each have theirs), and each undeclared package is reported once, at its first import.

mod go;
mod js;
mod locks;
mod python;
mod rust;

use qlayer_sdk::validator::Validator;
use qlayer_sdk::*;
use std::collections::BTreeMap;

/// The project's text files by path.
pub struct Project<'a> {
    files: BTreeMap<&'a str, &'a str>,
}

impl<'a> Project<'a> {
    pub fn new(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Project { files: files.into_iter().collect() }
    }

    /// The files whose names end with one of `extensions`.
    fn with_extension<'s>(&'s self, extensions: &'s [&str]) -> impl Iterator<Item = (&'a str, &'a str)> + 's {
        self.files.iter().filter(move |(p, _)| extensions.iter().any(|e| p.ends_with(e))).map(|(p, t)| (*p, *t))
    }

    fn get(&self, path: &str) -> Option<&'a str> {
        self.files.get(path).copied()
    }

    /// The nearest folder at or above `path`'s that holds a file `has` accepts (`""` is the root).
    fn nearest(&self, path: &str, has: impl Fn(&str) -> bool) -> Option<String> {
        let mut dir = parent(path);
        loop {
            if has(&dir) {
                return Some(dir);
            }
            if dir.is_empty() {
                return None;
            }
            dir = parent(&dir);
        }
    }
}

/// The folder of a path (`""` for the root).
fn parent(path: &str) -> String {
    path.rsplit_once('/').map_or(String::new(), |(d, _)| d.to_string())
}

/// `dir` joined with `name`.
fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") }
}

/// An error at a line: an import or a dependency is a statement of its own, so no column.
pub fn error(rule: &str, path: &str, line: Option<u32>, message: String) -> Diagnostic {
    Diagnostic { severity: Severity::Error, rule: rule.into(), path: Some(path.into()), line, column: None, message }
}

/// The `undeclared-import` error at `path:line`: `subject` ("`requests` is imported") and where
/// its declaration belongs: the manifests that lack it, or, with none, what the project should
/// have (`kinds`).
pub fn undeclared(
    path: &str,
    line: u32,
    subject: &str,
    manifests: Option<String>,
    kinds: &str,
    hint: &str,
) -> Diagnostic {
    let message = match manifests {
        Some(m) => format!("{subject} but {m} does not declare it{hint}"),
        None => format!("{subject} but the project has no {kinds} to declare it{hint}"),
    };
    error("undeclared-import", path, Some(line), message)
}

pub fn line_of(text: &str, offset: usize) -> u32 {
    text[..offset.min(text.len())].matches('\n').count() as u32 + 1
}

/// Every finding of the project.
pub fn check(project: &Project) -> Vec<Diagnostic> {
    let mut found = Vec::new();
    found.extend(python::check(project));
    found.extend(js::check(project));
    found.extend(rust::check(project));
    found.extend(go::check(project));
    found.extend(locks::check(project));
    found.sort_by(|a, b| (&a.path, a.line).cmp(&(&b.path, b.line)));
    found
}

struct Deps;

impl Validator for Deps {
    fn validate(artifacts: Vec<Artifact>) -> Result<Vec<Diagnostic>, PluginError> {
        let texts: Vec<(&str, &str)> = artifacts.iter().filter_map(|a| Some((a.path.as_str(), a.as_text()?))).collect();
        let project = Project::new(texts);
        let mut found = vec![Diagnostic {
            severity: Severity::Info,
            rule: "unchecked".into(),
            path: None,
            line: None,
            column: None,
            message: "checks imports against the dependency manifests; checks no file's syntax".into(),
        }];
        found.extend(check(&project));
        Ok(found)
    }
}

qlayer_sdk::export_validator!(Deps);

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// The findings for `files`, as `(rule, path, line)` with the message.
    pub fn findings(files: &[(&str, &str)]) -> Vec<(String, String, Option<u32>, String)> {
        let project = Project::new(files.iter().copied());
        check(&project).into_iter().map(|d| (d.rule, d.path.unwrap_or_default(), d.line, d.message)).collect()
    }

    /// Just `(rule, path, line)`.
    pub fn rules(files: &[(&str, &str)]) -> Vec<(String, String, Option<u32>)> {
        findings(files).into_iter().map(|(r, p, l, _)| (r, p, l)).collect()
    }

    pub fn r(rule: &str, path: &str, line: u32) -> (String, String, Option<u32>) {
        (rule.into(), path.into(), Some(line))
    }
}

/// A measurement, not a check: `PROJECT=DIR cargo test -p qlayer-validator-deps -- --ignored
/// --nocapture` prints the findings for a folder's text files (on a working project, each is a
/// false alarm or a real slip).
#[cfg(test)]
mod project_dir {
    #[test]
    #[ignore = "a measurement over the folder PROJECT names"]
    fn project() {
        #![allow(clippy::print_stdout, clippy::unwrap_used)]
        let Ok(root) = std::env::var("PROJECT") else { return };
        let mut files = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(&root)];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().to_string();
                if path.is_dir() {
                    if !name.starts_with('.') && name != "target" && name != "node_modules" {
                        dirs.push(path);
                    }
                } else if let Ok(text) = std::fs::read_to_string(&path) {
                    let rel = path.strip_prefix(&root).unwrap().to_string_lossy().to_string();
                    files.push((rel, text));
                }
            }
        }
        let project = super::Project::new(files.iter().map(|(p, t)| (p.as_str(), t.as_str())));
        for d in super::check(&project) {
            println!("{} {}:{} {}", d.rule, d.path.unwrap_or_default(), d.line.unwrap_or(0), d.message);
        }
        println!("{} files", files.len());
    }
}
