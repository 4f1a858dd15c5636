//! Lock files against their manifests: a dependency the manifest declares that the lock beside it
//! (package-lock.json, Cargo.lock, go.sum, uv.lock, poetry.lock) does not hold is `not-in-lock`:
//! the lock is out of date, and an install from it (`npm ci`, `cargo build --locked`, `uv sync
//! --locked`) fails or installs something else.

use crate::{Project, error, join, line_of, parent, python, rust};
use qlayer_sdk::Diagnostic;
use std::collections::BTreeSet;

/// One finding per declared name the lock lacks; `names` are `(name as the lock spells it, the
/// text to find its line by)`.
fn missing(
    manifest: &str,
    text: &str,
    lock: &str,
    locked: &BTreeSet<String>,
    names: Vec<(String, String)>,
    fix: &str,
) -> Vec<Diagnostic> {
    names
        .into_iter()
        .filter(|(name, _)| !locked.contains(name))
        .map(|(name, needle)| {
            let line = text.find(&needle).map_or(1, |o| line_of(text, o));
            error(
                "not-in-lock",
                manifest,
                Some(line),
                format!("`{name}` is declared but {lock} does not hold it: the lock is out of date ({fix})"),
            )
        })
        .collect()
}

/// The `name` of each `[[package]]` of a TOML lock (Cargo.lock, uv.lock, poetry.lock).
fn toml_lock_names(lock: &toml::Table, spell: impl Fn(&str) -> String) -> BTreeSet<String> {
    let packages = lock.get("package").and_then(toml::Value::as_array).into_iter().flatten();
    packages.filter_map(|p| p.get("name").and_then(toml::Value::as_str).map(&spell)).collect()
}

fn npm(project: &Project, path: &str, text: &str) -> Vec<Diagnostic> {
    let lock_path = join(&parent(path), "package-lock.json");
    let Some(lock) = project.get(&lock_path) else { return Vec::new() };
    let (Ok(doc), Ok(lock)) =
        (serde_json::from_str::<serde_json::Value>(text), serde_json::from_str::<serde_json::Value>(lock))
    else {
        return Vec::new();
    };
    let mut locked = BTreeSet::new();
    for key in lock.get("packages").and_then(|p| p.as_object()).into_iter().flat_map(|p| p.keys()) {
        if let Some((_, name)) = key.rsplit_once("node_modules/") {
            locked.insert(name.to_string());
        }
    }
    // Lock files of npm 6 and before.
    locked.extend(lock.get("dependencies").and_then(|d| d.as_object()).into_iter().flat_map(|d| d.keys().cloned()));
    // Peers are the user's to install.
    let names = ["dependencies", "devDependencies", "optionalDependencies"]
        .iter()
        .filter_map(|t| doc.get(*t).and_then(|d| d.as_object()))
        .flat_map(|d| d.keys())
        .map(|name| (name.clone(), format!("\"{name}\"")))
        .collect();
    missing(path, text, &lock_path, &locked, names, "run `npm install`")
}

fn cargo(project: &Project, path: &str, text: &str) -> Vec<Diagnostic> {
    // The workspace's lock: beside this manifest or above it.
    let Some(dir) = project.nearest(path, |d| project.get(&join(d, "Cargo.lock")).is_some()) else {
        return Vec::new();
    };
    let lock_path = join(&dir, "Cargo.lock");
    let (Ok(doc), Some(Ok(lock))) =
        (toml::from_str::<toml::Table>(text), project.get(&lock_path).map(toml::from_str::<toml::Table>))
    else {
        return Vec::new();
    };
    let locked = toml_lock_names(&lock, str::to_string);
    // `[workspace.dependencies]` may list what no member uses: the lock need not hold it.
    let names = rust::dependency_tables(&doc)
        .into_iter()
        .flat_map(|(_, t)| t)
        .map(|(key, spec)| {
            let package = spec.get("package").and_then(toml::Value::as_str).unwrap_or(key);
            (package.to_string(), key.clone())
        })
        .collect();
    missing(path, text, &lock_path, &locked, names, "run `cargo update` and commit Cargo.lock")
}

fn go(project: &Project, path: &str, text: &str) -> Vec<Diagnostic> {
    let sum_path = join(&parent(path), "go.sum");
    let Some(sum) = project.get(&sum_path) else { return Vec::new() };
    let locked: BTreeSet<String> =
        sum.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect();
    let mut names = Vec::new();
    let mut block = false;
    for line in text.lines().map(|l| l.split("//").next().unwrap_or("").trim()) {
        let entry = match line {
            "require (" | "require(" => {
                block = true;
                continue;
            }
            ")" => {
                block = false;
                continue;
            }
            _ if block => line,
            _ => match line.strip_prefix("require ") {
                Some(rest) => rest,
                None => continue,
            },
        };
        if let Some(module) = entry.split_whitespace().next() {
            names.push((module.to_string(), module.to_string()));
        }
    }
    missing(path, text, &sum_path, &locked, names, "run `go mod tidy`")
}

fn pyproject(project: &Project, path: &str, text: &str) -> Vec<Diagnostic> {
    let dir = parent(path);
    let Some((lock_path, lock, fix)) = [("uv.lock", "run `uv lock`"), ("poetry.lock", "run `poetry lock`")]
        .into_iter()
        .find_map(|(name, fix)| project.get(&join(&dir, name)).map(|l| (join(&dir, name), l, fix)))
    else {
        return Vec::new();
    };
    let (Ok(doc), Ok(lock)) = (toml::from_str::<toml::Table>(text), toml::from_str::<toml::Table>(lock)) else {
        return Vec::new();
    };
    let locked = toml_lock_names(&lock, python::normalise);
    let names = python::pyproject_requirements(&doc)
        .into_iter()
        .filter_map(|(req, bare)| {
            let name = if bare { Ok(python::normalise(req)) } else { python::check_requirement(req) };
            name.ok().map(|name| (name, req.to_string()))
        })
        .collect();
    missing(path, text, &lock_path, &locked, names, fix)
}

pub fn check(project: &Project) -> Vec<Diagnostic> {
    let mut found = Vec::new();
    for (path, text) in &project.files {
        match path.rsplit('/').next() {
            Some("package.json") => found.extend(npm(project, path, text)),
            Some("Cargo.toml") => found.extend(cargo(project, path, text)),
            Some("go.mod") => found.extend(go(project, path, text)),
            Some("pyproject.toml") => found.extend(pyproject(project, path, text)),
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use crate::testing::{findings, r, rules};

    #[test]
    fn declared_dependencies_must_be_in_the_lock_beside_their_manifest() {
        let files = [
            (
                "web/package.json",
                "{\"dependencies\": {\"react\": \"^18\", \"left-pad\": \"1\"}, \"peerDependencies\": {\"vue\": \"3\"}}\n",
            ),
            (
                "web/package-lock.json",
                "{\"lockfileVersion\": 3, \"packages\": {\"\": {}, \"node_modules/react\": {}, \"node_modules/react/node_modules/loose-envify\": {}}}\n",
            ),
            (
                "Cargo.toml",
                "[package]\nname = \"a\"\n\n[dependencies]\nserde = \"1\"\njson = { package = \"serde_json\", version = \"1\" }\nanyhow = \"1\"\n\n[workspace.dependencies]\nunused = \"1\"\n",
            ),
            (
                "Cargo.lock",
                "version = 4\n\n[[package]]\nname = \"serde\"\nversion = \"1.0.0\"\n\n[[package]]\nname = \"serde_json\"\nversion = \"1.0.0\"\n",
            ),
            (
                "svc/go.mod",
                "module example.com/svc\n\ngo 1.22\n\nrequire (\n\tgithub.com/a/b v1.0.0\n\tgithub.com/c/d v1.2.0\n)\n",
            ),
            ("svc/go.sum", "github.com/a/b v1.0.0 h1:x=\ngithub.com/a/b v1.0.0/go.mod h1:y=\n"),
            ("py/pyproject.toml", "[project]\nname = \"p\"\ndependencies = [\"Flask>=3\", \"requests\"]\n"),
            ("py/uv.lock", "version = 1\n\n[[package]]\nname = \"flask\"\nversion = \"3.0.0\"\n"),
        ];
        let found: Vec<_> = rules(&files).into_iter().filter(|(rule, _, _)| rule == "not-in-lock").collect();
        assert_eq!(
            found,
            vec![
                r("not-in-lock", "Cargo.toml", 7),
                r("not-in-lock", "py/pyproject.toml", 3),
                r("not-in-lock", "svc/go.mod", 7),
                r("not-in-lock", "web/package.json", 1),
            ]
        );
        let all = findings(&files);
        let cargo = all.iter().find(|f| f.0 == "not-in-lock" && f.1 == "Cargo.toml").map(|f| f.3.clone());
        assert_eq!(
            cargo.as_deref(),
            Some(
                "`anyhow` is declared but Cargo.lock does not hold it: the lock is out of date (run `cargo update` and commit Cargo.lock)"
            )
        );
        assert!(all.iter().any(|f| f.3.starts_with("`left-pad` is declared but web/package-lock.json")), "{all:?}");
        assert!(all.iter().any(|f| f.3.starts_with("`requests` is declared but py/uv.lock")), "{all:?}");
    }
}
