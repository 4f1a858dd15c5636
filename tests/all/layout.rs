//! The workspace's layout, read from `cargo metadata`: dependencies point one way (no crate
//! depends on one above it), each crate's doc says what it may depend on and its `Cargo.toml`
//! keeps to that, and each heavy dependency sits only in the crates that need it.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Our crates, bottom to top: a crate may depend only on crates before it.
const LAYERS: &[&str] = &[
    "qlayer-manifest",
    "qlayer-registry",
    "qlayer-sdk",
    "qlayer-runtime",
    "qlayer-db",
    "qlayer-scheduler",
    "qlayer-gateway",
    "qlayer-marketplace",
    "qlayer-factory",
    "qlayer-bundled",
    "qlayer-jobs",
    "qlayer-api",
    "qlayer",
];

/// Heavy dependencies and the only crates that may depend on them directly (normal or build).
const HEAVY: &[(&str, &[&str])] = &[
    ("wasmtime", &["qlayer-runtime"]),
    ("wasmtime-wasi", &["qlayer-runtime"]),
    ("wasmtime-wasi-http", &["qlayer-runtime"]),
    ("extism", &["qlayer-runtime"]),
    ("sqlx", &["qlayer-db"]),
    ("async-nats", &["qlayer-scheduler"]),
    ("axum", &["qlayer-api"]),
    ("tonic", &["qlayer-api"]),
    ("oci-client", &["qlayer-registry"]),
];

struct Package {
    name: String,
    /// Workspace crates and other crates it depends on (normal and build dependencies).
    deps: BTreeSet<String>,
    /// The crate root of its lib or bin target.
    root: Option<String>,
}

fn workspace() -> Vec<Package> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Package {
            name: p["name"].as_str().unwrap().to_string(),
            deps: p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null() || d["kind"] == "build")
                .map(|d| d["name"].as_str().unwrap().to_string())
                .collect(),
            root: p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "lib" || k == "bin"))
                .map(|t| t["src_path"].as_str().unwrap().to_string()),
        })
        .collect()
}

fn ours(packages: &[Package]) -> BTreeMap<&str, &Package> {
    packages.iter().filter(|p| LAYERS.contains(&p.name.as_str())).map(|p| (p.name.as_str(), p)).collect()
}

#[test]
fn every_crate_of_ours_has_a_layer() {
    let packages = workspace();
    let found = ours(&packages);
    for name in LAYERS {
        assert!(found.contains_key(name), "{name} is in LAYERS but not in the workspace");
    }
    for p in packages.iter().filter(|p| p.name.starts_with("qlayer-") || p.name == "qlayer") {
        let plugin = p.name.starts_with("qlayer-provider-")
            || p.name.starts_with("qlayer-agent-")
            || p.name.starts_with("qlayer-validator-")
            || p.name.starts_with("qlayer-tool-")
            || p.name.starts_with("qlayer-test-")
            || p.name == "qlayer-tests";
        assert!(plugin || LAYERS.contains(&p.name.as_str()), "{}: add it to LAYERS (where it sits)", p.name);
    }
}

#[test]
fn dependencies_point_down_the_layers() {
    let packages = workspace();
    for (name, p) in ours(&packages) {
        let rank = LAYERS.iter().position(|l| *l == name).unwrap();
        for dep in p.deps.iter().filter(|d| LAYERS.contains(&d.as_str())) {
            let dep_rank = LAYERS.iter().position(|l| l == dep).unwrap();
            assert!(dep_rank < rank, "{name} depends on {dep}, which sits above it");
        }
    }
}

/// The crates a crate doc's `May depend on:` paragraph names (`nothing of ours` names none).
fn declared(doc: &str) -> Option<BTreeSet<String>> {
    let start = doc.find("May depend on:")?;
    let paragraph = doc[start..].split("\n\n").next().unwrap_or_default();
    Some(paragraph.split('`').skip(1).step_by(2).filter(|s| s.starts_with("qlayer")).map(str::to_string).collect())
}

#[test]
fn each_crate_doc_says_what_it_is_for_and_what_it_may_depend_on_and_the_manifest_keeps_to_it() {
    let packages = workspace();
    for (name, p) in ours(&packages) {
        if !p.root.as_deref().unwrap_or_default().contains("/host/") {
            continue;
        }
        let root = p.root.as_deref().unwrap();
        let source = std::fs::read_to_string(root).unwrap();
        let doc: String = source
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .map(|l| l.trim_start_matches("//!").trim())
            .collect::<Vec<_>>()
            .join("\n");
        let first = doc.lines().next().unwrap_or_default();
        assert!(first.len() > 20, "{root}: the crate doc's first line says what {name} is for");
        let Some(allowed) = declared(&doc) else {
            panic!("{root}: the crate doc's second line says what {name} may depend on (`May depend on: ...`)")
        };
        if name == "qlayer" {
            continue; // the top: any crate of ours
        }
        let actual: BTreeSet<String> = p.deps.iter().filter(|d| LAYERS.contains(&d.as_str())).cloned().collect();
        let undeclared: Vec<&String> = actual.difference(&allowed).collect();
        assert!(undeclared.is_empty(), "{name} depends on {undeclared:?}, which its crate doc does not allow");
        let unused: Vec<&String> = allowed.difference(&actual).collect();
        assert!(
            unused.is_empty(),
            "{name}'s crate doc allows {unused:?}, which it does not depend on: keep the doc true"
        );
    }
}

#[test]
fn heavy_dependencies_sit_only_where_they_are_needed() {
    let packages = workspace();
    for (name, p) in ours(&packages) {
        for (heavy, allowed) in HEAVY {
            if p.deps.contains(*heavy) {
                assert!(allowed.contains(&name), "{name} depends on {heavy} directly; only {allowed:?} may");
            }
        }
    }
}
