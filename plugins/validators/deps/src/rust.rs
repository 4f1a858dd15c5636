//! Rust: the crates paths name against Cargo.toml.

use crate::{Project, error, join, line_of, undeclared};
use qlayer_sdk::Diagnostic;
use std::collections::{BTreeMap, BTreeSet};
use syn::visit::Visit;

/// Names a path may start with that are no dependency.
const BUILTIN: &[&str] = &[
    "std",
    "core",
    "alloc",
    "proc_macro",
    "test",
    "crate",
    "self",
    "super",
    "Self",
    "bool",
    "char",
    "str",
    "u8",
    "u16",
    "u32",
    "u64",
    "u128",
    "usize",
    "i8",
    "i16",
    "i32",
    "i64",
    "i128",
    "isize",
    "f32",
    "f64",
    // Tool attributes: `#[rustfmt::skip]`, `#[diagnostic::on_unimplemented]`, …
    "rustfmt",
    "clippy",
    "diagnostic",
    "rustdoc",
];

/// What a crate's Cargo.toml declares: dependency names as paths spell them (`-` as `_`).
#[derive(Default)]
struct Declared {
    names: BTreeSet<String>,
}

/// A version requirement Cargo accepts: comma-separated `op? version` (`1.2`, `^1`, `~1.2.3`,
/// `>=1, <2`, `=1.0.0-rc.1`, `1.*`, `*`).
pub fn valid_requirement(req: &str) -> bool {
    req.split(',').all(|part| {
        let part = part.trim();
        let op_len = part.chars().take_while(|c| matches!(c, '<' | '>' | '=' | '~' | '^')).count();
        let (op, version) = part.split_at(op_len);
        if !matches!(op, "" | "^" | "~" | "=" | "<" | "<=" | ">" | ">=") {
            return false;
        }
        let version = version.trim();
        if version == "*" {
            return op.is_empty();
        }
        let (core, _) = version.split_once('+').unwrap_or((version, ""));
        let (core, pre) = core.split_once('-').unwrap_or((core, ""));
        let parts: Vec<&str> = core.split('.').collect();
        (1..=3).contains(&parts.len())
            && parts
                .iter()
                .enumerate()
                .all(|(i, p)| (i > 0 && *p == "*") || !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
            && pre.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    })
}

/// A Cargo.toml's dependency tables of every kind and target, with their names
/// (`target.'cfg(unix)'.dev-dependencies`); not `[workspace.dependencies]`.
pub fn dependency_tables(doc: &toml::Table) -> Vec<(String, &toml::Table)> {
    let mut tables = Vec::new();
    for kind in ["dependencies", "dev-dependencies", "build-dependencies"] {
        if let Some(t) = doc.get(kind).and_then(toml::Value::as_table) {
            tables.push((kind.to_string(), t));
        }
        for (cfg, target) in doc.get("target").and_then(toml::Value::as_table).into_iter().flatten() {
            if let Some(t) = target.get(kind).and_then(toml::Value::as_table) {
                tables.push((format!("target.{cfg}.{kind}"), t));
            }
        }
    }
    tables
}

fn manifest(path: &str, text: &str, found: &mut Vec<Diagnostic>) -> Declared {
    let mut declared = Declared::default();
    let Ok(doc) = toml::from_str::<toml::Table>(text) else { return declared };
    let at = |needle: &str| text.find(needle).map_or(1, |o| line_of(text, o));
    if let Some(name) = doc.get("package").and_then(|p| p.get("name")).and_then(toml::Value::as_str) {
        declared.names.insert(name.replace('-', "_"));
    }
    if let Some(name) = doc.get("lib").and_then(|p| p.get("name")).and_then(toml::Value::as_str) {
        declared.names.insert(name.replace('-', "_"));
    }
    let mut tables = dependency_tables(&doc);
    if let Some(t) = doc.get("workspace").and_then(|w| w.get("dependencies")).and_then(toml::Value::as_table) {
        tables.push(("workspace.dependencies".into(), t));
    }
    for (table, deps) in tables {
        for (name, spec) in deps {
            declared.names.insert(name.replace('-', "_"));
            let version = match spec {
                toml::Value::String(v) => Some(v.as_str()),
                toml::Value::Table(t) => {
                    let sourced =
                        ["version", "path", "git", "workspace", "registry"].iter().any(|k| t.contains_key(*k));
                    if !sourced {
                        found.push(error(
                            "invalid-dependency",
                            path,
                            Some(at(name)),
                            format!("`{name}` in [{table}] has no `version`, `path`, `git` or `workspace`"),
                        ));
                    }
                    t.get("version").and_then(toml::Value::as_str)
                }
                _ => {
                    found.push(error(
                        "invalid-dependency",
                        path,
                        Some(at(name)),
                        format!("`{name}` in [{table}] must be a version string or a table"),
                    ));
                    None
                }
            };
            if let Some(v) = version.filter(|v| !valid_requirement(v)) {
                found.push(error(
                    "invalid-dependency",
                    path,
                    Some(at(name)),
                    format!("`{name}`: `{v}` is not a version requirement (say `1.2`, `^1.2.3`, `~1`, `>=1, <2`)"),
                ));
            }
        }
    }
    declared
}

/// The first segments of a file's paths (`serde::Serialize`, `tokio::main`, `use anyhow::{…}`),
/// with their lines, and the names the file defines or brings into scope.
#[derive(Default)]
struct Paths {
    used: Vec<(String, u32)>,
    defined: BTreeSet<String>,
    /// An item-level macro (`include_proto!`, `wit_bindgen::generate!`) may define modules that
    /// its file's paths then name: such a file's paths are not judged.
    opaque: bool,
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_path(&mut self, path: &'ast syn::Path) {
        if (path.segments.len() > 1 || path.leading_colon.is_some())
            && let Some(first) = path.segments.first()
        {
            let line = first.ident.span().start().line as u32;
            self.used.push((first.ident.to_string(), line));
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        fn tree(t: &syn::UseTree, parent: Option<&syn::Ident>, out: &mut Paths) {
            match t {
                syn::UseTree::Path(p) => {
                    if parent.is_none() {
                        out.used.push((p.ident.to_string(), p.ident.span().start().line as u32));
                    }
                    tree(&p.tree, Some(&p.ident), out);
                }
                syn::UseTree::Name(n) => {
                    if parent.is_none() {
                        out.used.push((n.ident.to_string(), n.ident.span().start().line as u32));
                    }
                    // `use a::b::{self, c}` brings `b`.
                    let name = if n.ident == "self" { parent.unwrap_or(&n.ident) } else { &n.ident };
                    out.defined.insert(name.to_string());
                }
                syn::UseTree::Rename(r) => {
                    out.defined.insert(r.rename.to_string());
                }
                syn::UseTree::Group(g) => g.items.iter().for_each(|i| tree(i, parent, out)),
                syn::UseTree::Glob(_) => {}
            }
        }
        tree(&item.tree, None, self);
    }

    fn visit_item_macro(&mut self, item: &'ast syn::ItemMacro) {
        // `macro_rules! name` defines a macro; any other item macro may define anything.
        if item.ident.is_none() {
            self.opaque = true;
        }
        syn::visit::visit_item_macro(self, item);
    }

    fn visit_expr_path(&mut self, expr: &'ast syn::ExprPath) {
        // `<T>::f` and `<T as Trait>::f`: the type and trait are paths; `f` is not a crate.
        match &expr.qself {
            Some(qself) => self.visit_qself(qself),
            None => self.visit_path(&expr.path),
        }
    }

    fn visit_type_path(&mut self, ty: &'ast syn::TypePath) {
        match &ty.qself {
            Some(qself) => self.visit_qself(qself),
            None => self.visit_path(&ty.path),
        }
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        self.defined.insert(item.ident.to_string());
        syn::visit::visit_item_mod(self, item);
    }

    fn visit_item_enum(&mut self, item: &'ast syn::ItemEnum) {
        self.defined.insert(item.ident.to_string());
        syn::visit::visit_item_enum(self, item);
    }

    fn visit_item_extern_crate(&mut self, item: &'ast syn::ItemExternCrate) {
        let name = item.rename.as_ref().map_or(&item.ident, |(_, r)| r);
        self.defined.insert(name.to_string());
        self.used.push((item.ident.to_string(), item.ident.span().start().line as u32));
    }

    fn visit_generics(&mut self, generics: &'ast syn::Generics) {
        for p in generics.type_params() {
            self.defined.insert(p.ident.to_string());
        }
        syn::visit::visit_generics(self, generics);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        // A macro's own path counts; its tokens are not parsed.
        self.visit_path(&mac.path);
    }
}

pub fn check(project: &Project) -> Vec<Diagnostic> {
    let mut found = Vec::new();
    let sources: Vec<(&str, &str)> = project.with_extension(&[".rs"]).collect();
    if sources.is_empty() {
        return found;
    }
    let mut declared: BTreeMap<String, Declared> = BTreeMap::new();
    for (path, text) in project.files.iter().filter(|(p, _)| p.rsplit('/').next() == Some("Cargo.toml")) {
        declared.insert(crate::parent(path), manifest(path, text, &mut found));
    }
    // Modules and items anywhere in the crate are in scope through `crate::`, and in 2018+ a
    // module's own name in its parent: every file's stem and every `mod` count as local.
    let mut local: BTreeSet<String> = sources
        .iter()
        .flat_map(|(p, _)| p.trim_end_matches(".rs").split('/').map(str::to_string).collect::<Vec<_>>())
        .collect();
    let parsed: Vec<(&str, Paths)> = sources
        .iter()
        .filter_map(|(path, text)| {
            let file = syn::parse_file(text).ok()?;
            let mut paths = Paths::default();
            paths.visit_file(&file);
            Some((*path, paths))
        })
        .collect();
    for (_, p) in &parsed {
        local.extend(p.defined.iter().filter(|d| d.starts_with(|c: char| c.is_ascii_lowercase())).cloned());
    }
    let mut reported = BTreeSet::new();
    for (path, paths) in parsed.iter().filter(|(_, p)| !p.opaque) {
        let dir = project.nearest(path, |d| project.get(&join(d, "Cargo.toml")).is_some());
        // A workspace member sees its own table; `workspace = true` entries are named there too.
        let names = dir.as_ref().and_then(|d| declared.get(d)).map(|d| &d.names);
        for (name, line) in &paths.used {
            let lower = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_');
            if !lower
                || BUILTIN.contains(&name.as_str())
                || local.contains(name)
                || paths.defined.contains(name)
                || names.is_some_and(|n| n.contains(name))
                || !reported.insert((dir.clone(), name.clone()))
            {
                continue;
            }
            let manifest = dir.as_deref().map(|d| join(d, "Cargo.toml"));
            found.push(undeclared(path, *line, &format!("the crate `{name}` is used"), manifest, "Cargo.toml", ""));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{findings, r, rules};

    #[test]
    fn requirements() {
        for ok in ["1", "1.2", "^1.2.3", "~1", ">=1, <2", "=1.0.0-rc.1", "1.*", "*", "0.4.0+build"] {
            assert!(valid_requirement(ok), "{ok}");
        }
        for bad in ["latest", "1.2.3.4", "=>1", "v1", "", "^*"] {
            assert!(!valid_requirement(bad), "{bad}");
        }
    }

    #[test]
    fn paths_against_cargo_toml() {
        let cargo = "[package]\nname = \"todo-cli\"\nversion = \"0.1.0\"\n\n[dependencies]\nserde = { version = \"1\", features = [\"derive\"] }\nclap = \"latest\"\nchrono = { features = [\"serde\"] }\n\n[dev-dependencies]\ntempfile = \"3\"\n";
        let main = "mod store;\nuse serde::{self, Deserialize, Serialize};\nuse store::Store;\nuse std::io;\n\n#[derive(Serialize, Deserialize)]\nstruct Item { due: chrono::NaiveDate }\n\nfn main() -> anyhow::Result<()> {\n    let x = u32::MAX;\n    let [a] = <[_; 1]>::try_from(vec![1]).unwrap();\n    let v: Vec<u8> = serde_json::from_str(\"[]\")?;\n    Ok(())\n}\n";
        let store = "pub struct Store;\nimpl Store { pub fn new() -> Self { crate::store::Store } }\n";
        let test = "use todo_cli::store;\n#[test]\nfn t() { let d = tempfile::tempdir(); }\n";
        let files = [("Cargo.toml", cargo), ("src/main.rs", main), ("src/store.rs", store), ("tests/cli.rs", test)];
        assert_eq!(
            rules(&files),
            vec![
                r("invalid-dependency", "Cargo.toml", 7),
                r("invalid-dependency", "Cargo.toml", 8),
                r("undeclared-import", "src/main.rs", 9),
                r("undeclared-import", "src/main.rs", 12),
            ]
        );
        let all = findings(&files);
        assert!(all[2].3.contains("the crate `anyhow` is used but Cargo.toml does not declare it"), "{}", all[2].3);
        // A file whose item macro may define modules is not judged.
        let generated = "wit_bindgen::generate!({ world: \"w\" });\nuse exports::a::b::Guest;\n";
        let files = [
            ("Cargo.toml", "[package]\nname = \"g\"\n[dependencies]\nwit-bindgen = \"0.61\"\n"),
            ("src/lib.rs", generated),
        ];
        assert_eq!(rules(&files), vec![]);
    }
}
