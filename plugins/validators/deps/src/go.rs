//! Go: imports against go.mod.

use crate::{Project, error, join, undeclared};
use qlayer_sdk::Diagnostic;
use std::collections::BTreeSet;

/// A go.mod: the module path and the required modules.
struct GoMod {
    module: Option<String>,
    required: Vec<String>,
}

/// A module version: `v1.2.3`, with a pre-release (pseudo-versions are pre-releases) and
/// `+incompatible`.
pub fn valid_version(v: &str) -> bool {
    let Some(v) = v.strip_prefix('v') else { return false };
    let v = v.strip_suffix("+incompatible").unwrap_or(v);
    let (core, pre) = v.split_once('-').unwrap_or((v, ""));
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        && pre.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
}

fn parse(path: &str, text: &str, found: &mut Vec<Diagnostic>) -> GoMod {
    let mut gomod = GoMod { module: None, required: Vec::new() };
    let mut in_require = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split("//").next().unwrap_or("").trim();
        let n = Some(i as u32 + 1);
        if line.is_empty() {
            continue;
        }
        if in_require && line == ")" {
            in_require = false;
            continue;
        }
        let entry = if in_require {
            line
        } else if let Some(rest) = line.strip_prefix("module ") {
            gomod.module = Some(rest.trim().trim_matches('"').to_string());
            continue;
        } else if line == "require (" || line == "require(" {
            in_require = true;
            continue;
        } else if let Some(rest) = line.strip_prefix("require ") {
            rest
        } else if let Some(rest) = line.strip_prefix("go ") {
            let v = rest.trim();
            let ok = v.split('.').count() <= 3
                && v.split('.').all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
            if !ok {
                found.push(error(
                    "invalid-dependency",
                    path,
                    n,
                    format!("`go {v}`: the Go version must be like `1.22` or `1.22.1`"),
                ));
            }
            continue;
        } else {
            continue;
        };
        let mut parts = entry.split_whitespace();
        let (Some(module), version) = (parts.next(), parts.next()) else { continue };
        let module = module.trim_matches('"');
        match version {
            Some(v) if valid_version(v) => {}
            Some(v) => found.push(error(
                "invalid-dependency",
                path,
                n,
                format!("`{module}`: `{v}` is not a module version (say `v1.2.3`)"),
            )),
            None => {
                found.push(error("invalid-dependency", path, n, format!("`{module}` is required without a version")))
            }
        }
        if !module.split('/').next().is_some_and(|first| first.contains('.')) {
            found.push(error(
                "invalid-dependency",
                path,
                n,
                format!("`{module}` is not a module path (its first element has no dot, as a host name does)"),
            ));
        }
        gomod.required.push(module.to_string());
    }
    gomod
}

/// A Go file's import paths with their lines.
fn imports(text: &str) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let mut block = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split("//").next().unwrap_or("").trim();
        let spec = if block {
            if line.starts_with(')') {
                block = false;
                continue;
            }
            line
        } else if line == "import (" || line == "import(" {
            block = true;
            continue;
        } else if let Some(rest) = line.strip_prefix("import ") {
            rest
        } else if line.starts_with("func ") || line.starts_with("type ") || line.starts_with("var ") {
            // Imports come before any declaration.
            break;
        } else {
            continue;
        };
        if let Some(start) = spec.find('"')
            && let Some(len) = spec[start + 1..].find('"')
        {
            out.push((spec[start + 1..start + 1 + len].to_string(), i as u32 + 1));
        }
    }
    out
}

pub fn check(project: &Project) -> Vec<Diagnostic> {
    let mut found = Vec::new();
    let sources: Vec<(&str, &str)> = project.with_extension(&[".go"]).collect();
    let mods: Vec<(String, GoMod)> = project
        .files
        .iter()
        .filter(|(p, _)| p.rsplit('/').next() == Some("go.mod"))
        .map(|(p, t)| (crate::parent(p), parse(p, t, &mut found)))
        .collect();
    let mut reported = BTreeSet::new();
    for (path, text) in sources {
        let dir = project.nearest(path, |d| project.get(&join(d, "go.mod")).is_some());
        let gomod = dir.as_ref().and_then(|d| mods.iter().find(|(m, _)| m == d)).map(|(_, g)| g);
        for (import, line) in imports(text) {
            // The standard library's paths have no dot in their first element.
            if !import.split('/').next().is_some_and(|first| first.contains('.')) {
                continue;
            }
            let within = |m: &str| import == m || import.starts_with(&format!("{m}/"));
            let ok =
                gomod.is_some_and(|g| g.module.as_deref().is_some_and(within) || g.required.iter().any(|m| within(m)));
            let module = import.clone();
            if ok || !reported.insert((dir.clone(), module.clone())) {
                continue;
            }
            let manifest = dir.as_deref().map(|d| join(d, "go.mod"));
            found.push(undeclared(path, line, &format!("`{import}` is imported"), manifest, "go.mod", ""));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{r, rules};

    #[test]
    fn imports_against_go_mod() {
        let gomod = "module example.com/todo\n\ngo 1.22\n\nrequire (\n\tgithub.com/spf13/cobra v1.8.0\n\tgithub.com/mattn/go-sqlite3 1.14\n\tsqlite v1.0.0\n)\n";
        let main = "package main\n\nimport (\n\t\"fmt\"\n\tnet \"net/http\"\n\n\t\"example.com/todo/store\"\n\t\"github.com/spf13/cobra\"\n\t\"github.com/google/uuid\"\n)\n\nfunc main() {}\n";
        let files = [("go.mod", gomod), ("main.go", main), ("store/store.go", "package store\n\nimport \"errors\"\n")];
        assert_eq!(
            rules(&files),
            vec![
                r("invalid-dependency", "go.mod", 7),
                r("invalid-dependency", "go.mod", 8),
                r("undeclared-import", "main.go", 9),
            ]
        );
        assert!(
            valid_version("v0.0.0-20240101000000-abcdef123456")
                && valid_version("v2.0.0+incompatible")
                && !valid_version("1.2.3")
        );
    }
}
