//! JavaScript and TypeScript: imports against package.json.

use crate::{Project, error, join, line_of, undeclared};
use qlayer_sdk::Diagnostic;
use regex::Regex;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

/// Node's built-in modules (`require('module').builtinModules`, without the private ones).
const BUILTINS: &[&str] = &[
    "assert",
    "async_hooks",
    "buffer",
    "child_process",
    "cluster",
    "console",
    "constants",
    "crypto",
    "dgram",
    "diagnostics_channel",
    "dns",
    "domain",
    "events",
    "fs",
    "http",
    "http2",
    "https",
    "inspector",
    "module",
    "net",
    "os",
    "path",
    "perf_hooks",
    "process",
    "punycode",
    "querystring",
    "readline",
    "repl",
    "stream",
    "string_decoder",
    "sys",
    "timers",
    "tls",
    "trace_events",
    "tty",
    "url",
    "util",
    "v8",
    "vm",
    "wasi",
    "worker_threads",
    "zlib",
];

const TABLES: &[&str] = &["dependencies", "devDependencies", "peerDependencies", "optionalDependencies"];

const EXTENSIONS: &[&str] = &[".js", ".mjs", ".cjs", ".jsx", ".ts", ".mts", ".cts", ".tsx", ".vue", ".svelte"];

fn import_patterns() -> &'static [Regex] {
    static PATTERNS: OnceLock<Vec<Regex>> = OnceLock::new();
    PATTERNS.get_or_init(|| {
        [
            // import x from 'm'; import {a,\n b} from "m"; import 'm'; export * from 'm'
            r#"(?m)^[ \t]*(?:import|export)\b[^'";]*?\bfrom[ \t\n]*['"]([^'"\n]+)['"]"#,
            r#"(?m)^[ \t]*import[ \t]*['"]([^'"\n]+)['"]"#,
            // require('m'), import('m')
            r#"\b(?:require|import)\(\s*['"]([^'"\n]+)['"]\s*\)"#,
        ]
        .iter()
        .filter_map(|p| Regex::new(p).ok())
        .collect()
    })
}

/// The package an import specifier names (`lodash/fp` → `lodash`, `@a/b/c` → `@a/b`), or `None`
/// for what is not a package: relative and absolute paths, URLs, Node's built-ins, aliases
/// (`@/`, `~/`, `#`), virtual modules (`virtual:x`, `astro:content`).
fn package_of(spec: &str) -> Option<&str> {
    if spec.starts_with(['.', '/', '#', '~']) || spec.starts_with("@/") || spec.contains(':') {
        return None;
    }
    let mut parts = spec.splitn(3, '/');
    let first = parts.next()?;
    let name = if first.starts_with('@') {
        let second = parts.next()?;
        &spec[..first.len() + 1 + second.len()]
    } else {
        first
    };
    if BUILTINS.contains(&name) { None } else { Some(name) }
}

/// Whether a string is a valid npm package name.
fn valid_name(name: &str) -> bool {
    let plain = |s: &str| {
        !s.is_empty()
            && !s.starts_with(['.', '_'])
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_' | '~'))
    };
    name.len() <= 214
        && match name.strip_prefix('@') {
            Some(scoped) => scoped.split_once('/').is_some_and(|(scope, n)| plain(scope) && plain(n)),
            None => plain(name),
        }
}

/// Whether a string is a version range npm accepts: a semver range (`^1.2.3`, `~1.2`, `>=1 <2`,
/// `1.x`, `1 - 2`, `a || b`), a tag (`latest`), or a protocol (`npm:`, `file:`, `workspace:`,
/// `git+…`, `github:`, `http(s)://`, `user/repo`).
pub fn valid_range(range: &str) -> bool {
    let range = range.trim();
    if range.is_empty() || range == "*" {
        return true;
    }
    const PROTOCOLS: &[&str] = &[
        "npm:",
        "file:",
        "link:",
        "workspace:",
        "portal:",
        "git+",
        "git:",
        "github:",
        "gitlab:",
        "bitbucket:",
        "http://",
        "https://",
        "catalog:",
    ];
    if PROTOCOLS.iter().any(|p| range.starts_with(p)) {
        return true;
    }
    // A tag, or GitHub's `user/repo#ref`.
    if range.starts_with(|c: char| c.is_ascii_lowercase())
        && range.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/' | '#'))
        && !range.starts_with('x')
    {
        return true;
    }
    range.split("||").all(|set| {
        let set = set.trim();
        if set.is_empty() {
            return true;
        }
        if let Some((a, b)) = set.split_once(" - ") {
            return partial(a.trim()) && partial(b.trim());
        }
        let mut tokens = set.split_whitespace().peekable();
        let mut any = false;
        while let Some(token) = tokens.next() {
            any = true;
            let op_len = token.chars().take_while(|c| matches!(c, '<' | '>' | '=' | '~' | '^')).count();
            let (op, version) = token.split_at(op_len);
            if !matches!(op, "" | "<" | "<=" | ">" | ">=" | "=" | "~" | "^" | "~>") {
                return false;
            }
            // `>= 1.2`: the operator stands alone.
            let version = if version.is_empty() {
                match tokens.next() {
                    Some(v) => v,
                    None => return false,
                }
            } else {
                version
            };
            if !partial(version) {
                return false;
            }
        }
        any
    })
}

/// A partial version: `1`, `1.2`, `1.2.3`, `1.x`, `*`, with `v`, a pre-release and build.
fn partial(v: &str) -> bool {
    let v = v.strip_prefix(['v', '=']).unwrap_or(v);
    let (core, _) = v.split_once('+').unwrap_or((v, ""));
    let (core, pre) = core.split_once('-').unwrap_or((core, ""));
    let parts: Vec<&str> = core.split('.').collect();
    (1..=3).contains(&parts.len())
        && parts.iter().all(|p| matches!(*p, "x" | "X" | "*") || !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        && pre.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
}

/// What a package.json declares (names), and findings in it.
fn manifest(path: &str, text: &str, found: &mut Vec<Diagnostic>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(text) else {
        // The syntax validator reports bad JSON.
        return names;
    };
    if let Some(own) = doc.get("name").and_then(|n| n.as_str()) {
        names.insert(own.to_string());
    }
    let at = |needle: &str| text.find(&format!("\"{needle}\"")).map_or(1, |o| line_of(text, o));
    for table in TABLES {
        let Some(deps) = doc.get(*table) else { continue };
        let Some(deps) = deps.as_object() else {
            found.push(error(
                "invalid-dependency",
                path,
                Some(at(table)),
                format!("`{table}` must be an object of names and versions"),
            ));
            continue;
        };
        for (name, range) in deps {
            let line = Some(at(name));
            if !valid_name(name) {
                found.push(error(
                    "invalid-dependency",
                    path,
                    line,
                    format!("`{name}` in `{table}` is not a valid npm package name (lower case, URL-safe, at most 214 characters)"),
                ));
            } else if BUILTINS.contains(&name.as_str()) {
                found.push(error(
                    "stdlib-dependency",
                    path,
                    line,
                    format!("`{name}` in `{table}` is built into Node.js (`node:{name}`); the npm package of that name is not it: remove it"),
                ));
            }
            match range.as_str() {
                Some(r) if valid_range(r) => {}
                Some(r) => found.push(error(
                    "invalid-dependency",
                    path,
                    line,
                    format!("`{name}`: `{r}` is not a version range (say `^1.2.3`, `~1.2`, `>=1 <2` or `latest`)"),
                )),
                None => found.push(error(
                    "invalid-dependency",
                    path,
                    line,
                    format!("`{name}`: its version must be a string"),
                )),
            }
            names.insert(name.clone());
        }
    }
    names
}

pub fn check(project: &Project) -> Vec<Diagnostic> {
    let mut found = Vec::new();
    let sources: Vec<(&str, &str)> = project
        .with_extension(EXTENSIONS)
        .filter(|(p, _)| !p.contains("node_modules/") && !p.ends_with(".d.ts"))
        .collect();
    let manifests: Vec<(&str, &str)> = project
        .files
        .iter()
        .filter(|(p, _)| p.rsplit('/').next() == Some("package.json"))
        .map(|(p, t)| (*p, *t))
        .collect();
    let mut declared: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in &manifests {
        declared.insert(crate::parent(path), manifest(path, text, &mut found));
    }
    let mut reported = BTreeSet::new();
    for (path, text) in sources {
        let dir = project.nearest(path, |d| project.get(&join(d, "package.json")).is_some());
        let names = dir.as_ref().and_then(|d| declared.get(d));
        let mut imports: Vec<(usize, &str)> = Vec::new();
        for pattern in import_patterns() {
            imports.extend(pattern.captures_iter(text).filter_map(|c| c.get(1)).map(|m| (m.start(), m.as_str())));
        }
        imports.sort();
        for (offset, spec) in imports {
            let Some(package) = package_of(spec) else { continue };
            if names.is_some_and(|n| n.contains(package)) || !reported.insert((dir.clone(), package.to_string())) {
                continue;
            }
            let manifest = dir.as_deref().map(|d| join(d, "package.json"));
            let subject = format!("`{package}` is imported");
            found.push(undeclared(path, line_of(text, offset), &subject, manifest, "package.json", ""));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{findings, r, rules};

    #[test]
    fn ranges_and_names() {
        for ok in [
            "^1.2.3",
            "~1.2",
            ">=1.0.0 <2",
            ">= 1.2",
            "1.x",
            "1.2.3 - 2",
            "^1 || ^2",
            "*",
            "",
            "latest",
            "next",
            "npm:react@18",
            "workspace:*",
            "file:../lib",
            "github:a/b",
            "user/repo#main",
            "18.2.0",
            "v1.0.0",
            "1.0.0-beta.1",
        ] {
            assert!(valid_range(ok), "{ok}");
        }
        for bad in ["^1.2.3.4", "=> 1", "1.2.a", "^", ">=", "~>x.y", "1..2"] {
            assert!(!valid_range(bad), "{bad}");
        }
        assert!(
            valid_name("@types/node")
                && valid_name("lodash.merge")
                && !valid_name("React")
                && !valid_name("_x")
                && !valid_name("a b")
        );
    }

    #[test]
    fn imports_against_package_json() {
        let package = "{\n  \"name\": \"web\",\n  \"dependencies\": {\n    \"react\": \"^18.2.0\",\n    \"fs\": \"^0.0.1\",\n    \"Axios\": \"1.6.0\",\n    \"express\": \"=> 4\"\n  },\n  \"devDependencies\": {\"@types/node\": \"^20\", \"vitest\": \"^1\"}\n}\n";
        let app = "import React from 'react';\nimport {\n  a,\n  b\n} from \"lodash/fp\";\nimport fs from 'node:fs';\nimport path from 'path';\nimport './styles.css';\nimport Button from '@/components/Button';\nconst x = require('@scope/pkg/sub');\nconst y = await import('react');\nexport * from './local';\n";
        let files = [
            ("web/package.json", package),
            ("web/src/app.ts", app),
            ("web/src/app.test.ts", "import { test } from 'vitest';\n"),
        ];
        assert_eq!(
            rules(&files),
            vec![
                r("stdlib-dependency", "web/package.json", 5),
                r("invalid-dependency", "web/package.json", 6),
                r("invalid-dependency", "web/package.json", 7),
                r("undeclared-import", "web/src/app.ts", 5),
                r("undeclared-import", "web/src/app.ts", 10),
            ]
        );
        let all = findings(&files);
        assert!(all[3].3.contains("`lodash` is imported but web/package.json does not declare it"), "{}", all[3].3);
        assert!(all[4].3.contains("`@scope/pkg`"), "{}", all[4].3);
    }
}
