//! Validator throughput: lines checked per second per language by the bundled `syntax`
//! validator, called as a run's validator step is (a fresh sandboxed instance per call, the files
//! passed in and the diagnostics read back), on a generated file of about 10,000 valid lines per
//! language. The baseline, from the same run, is the same call on a one-line file of that
//! language: the fixed cost of a call (instance, copying, the step's report), which the
//! per-line rate leaves out.
//!
//! `cargo bench -p qlayer-jobs --bench validators` (docs/PERFORMANCE.md records the figures).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use qlayer_runtime::{Artifact, Grants};
use std::time::{Duration, Instant};

/// For each language: a path, a unit of valid source repeated to make a file (`{n}` numbers each
/// copy, so names stay unique), and a valid one-line file.
const SAMPLES: &[(&str, &str, &str, &str)] = &[
    (
        "Rust",
        "src/lib.rs",
        "/// Adds.\npub fn add_{n}(a: u64, b: u64) -> u64 {\n    let c = a.wrapping_add(b);\n    if c > 10 { c - 1 } else { c + 1 }\n}\n\n",
        "pub fn a() {}\n",
    ),
    (
        "Python",
        "app/main.py",
        "def add_{n}(a, b):\n    \"\"\"Adds.\"\"\"\n    c = a + b\n    return c - 1 if c > 10 else c + 1\n\n\n",
        "x = 1\n",
    ),
    (
        "JSON",
        "data.json",
        "  {\"id\": {n}, \"name\": \"item {n}\", \"tags\": [\"a\", \"b\"], \"ok\": true},\n",
        "[1]\n",
    ),
    ("TOML", "config.toml", "[item_{n}]\nid = {n}\nname = \"item {n}\"\ntags = [\"a\", \"b\"]\n\n", "a = 1\n"),
    ("YAML", "config.yaml", "item_{n}:\n  id: {n}\n  name: item {n}\n  tags: [a, b]\n", "a: 1\n"),
    ("Dockerfile", "Dockerfile", "RUN echo step {n} && \\\n    true\nENV STEP_{n}={n}\n", "FROM debian\n"),
    ("Markdown", "README.md", "## Section {n}\n\nSome text for section {n}.\n\n```sh\necho {n}\n```\n\n", "# a\n"),
];

fn file(language: &str, unit: &str, lines: usize) -> String {
    let per = unit.lines().count().max(1);
    let copies = lines.div_ceil(per);
    let body: String = (0..copies).map(|n| unit.replace("{n}", &n.to_string())).collect();
    match language {
        // One array of the objects.
        "JSON" => format!("[\n{body}  {{\"id\": -1}}\n]\n"),
        "Dockerfile" => format!("FROM debian:bookworm-slim\n{body}"),
        _ => body,
    }
}

fn main() {
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    tokio.block_on(async {
        let runtime = qlayer_tests::runtime();
        let syntax = runtime
            .load(qlayer_bundled::bundled_plugin("syntax").unwrap())
            .unwrap()
            .install(Grants::default())
            .unwrap();
        println!("syntax validator throughput: ~10,000-line file per language, median of 5 calls");
        println!(
            "  {:<11} {:>7} {:>12} {:>16} {:>14}",
            "language", "lines", "call (ms)", "1-line call (ms)", "lines/s"
        );
        for (language, path, unit, one) in SAMPLES {
            let check = |text: String| {
                let files =
                    vec![Artifact { path: path.to_string(), media_type: "text/plain".into(), content: text.into() }];
                let syntax = syntax.clone();
                async move {
                    let began = Instant::now();
                    let (_, found) = qlayer_factory::validate_step("bench", &syntax, "t", &files).await;
                    let found = found.unwrap();
                    assert!(!found.iter().any(|d| d.is_error()), "{language}: {found:?}");
                    assert!(!found.iter().any(|d| d.rule == qlayer_factory::UNCHECKED), "{language} is checked");
                    began.elapsed()
                }
            };
            let median = |mut v: Vec<Duration>| {
                v.sort();
                v[v.len() / 2]
            };
            let big = file(language, unit, 10_000);
            let lines = big.lines().count();
            let one = one.to_string();
            let mut full = Vec::new();
            let mut base = Vec::new();
            for _ in 0..5 {
                full.push(check(big.clone()).await);
                base.push(check(one.clone()).await);
            }
            let (full, base) = (median(full), median(base));
            let rate = lines as f64 / full.saturating_sub(base).as_secs_f64().max(1e-9);
            println!(
                "  {language:<11} {lines:>7} {:>12.1} {:>16.1} {rate:>14.0}",
                full.as_secs_f64() * 1e3,
                base.as_secs_f64() * 1e3
            );
        }
    });
}
