//! Validator throughput: lines checked per second per language by the bundled `syntax`
//! validator, called as a run's validator step is (a fresh sandboxed instance per call, the files
//! passed in and the diagnostics read back), on a generated file of about 10,000 valid lines per
//! language. The baseline, from the same run, is the same call on a one-line file of that
//! language: the fixed cost of a call (instance, copying, the step's report), which the
//! per-line rate leaves out. Then the `secrets`, `deps` and `hap` validators over the same files, and the `tests`
//! validator's sandboxed test run of a generated sample project with its baselines.
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
    // Lexical checks (strings, comments, nesting).
    (
        "C",
        "src/util.c",
        "int add_{n}(int a, int b) {\n    /* adds */\n    int c = a + b;\n    return c > 10 ? c - 1 : c + 1;\n}\n\n",
        "int a;\n",
    ),
    (
        "JavaScript",
        "web/app.js",
        "export function add{n}(a, b) {\n  const c = a + b; // adds\n  return c > 10 ? `${c - 1}` : String(c + 1);\n}\n\n",
        "let a = 1;\n",
    ),
    (
        "HTML",
        "web/index.html",
        "<section id=\"s{n}\">\n  <h2>Section {n}</h2>\n  <p>Some <em>text</em> for section {n}.<br>\n  <img src=\"a.png\" alt=\"a\">\n</section>\n",
        "<p>a</p>\n",
    ),
    ("Bash", "run.sh", "if [ -n \"$A{n}\" ]; then\n  echo \"step {n}: $(date)\"\nfi\n", "echo a\n"),
    (
        "SQL",
        "schema.sql",
        "CREATE TABLE t{n} (\n  id INTEGER PRIMARY KEY,\n  name TEXT NOT NULL DEFAULT 'it''s'\n);\n\n",
        "SELECT 1;\n",
    ),
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

        // The validators that read every file (secrets: every line against every rule; deps: the
        // Python and Rust files parsed for their imports; hap: every word against the list) over
        // the same ~10,000-line files.
        let mut lines = 0;
        let mut files = Vec::new();
        for (language, path, unit, _) in SAMPLES {
            let text = file(language, unit, 10_000);
            lines += text.lines().count();
            files.push(Artifact { path: path.to_string(), media_type: "text/plain".into(), content: text.into() });
        }
        for name in ["secrets", "deps", "hap"] {
            let validator = runtime
                .load(qlayer_bundled::bundled_plugin(name).unwrap())
                .unwrap()
                .install(Grants::default())
                .unwrap();
            let mut times = Vec::new();
            for _ in 0..5 {
                let began = Instant::now();
                let (_, found) = qlayer_factory::validate_step("bench", &validator, "t", &files).await;
                let found = found.unwrap();
                assert!(!found.iter().any(|d| d.is_error()), "{name}: {found:?}");
                times.push(began.elapsed());
            }
            times.sort();
            let t = times[2];
            println!(
                "{name} validator: {lines} lines in {} files, {:.1} ms (median of 5), {:.0} lines/s",
                files.len(),
                t.as_secs_f64() * 1e3,
                lines as f64 / t.as_secs_f64()
            );
        }

        // The tests validator: the project's Python tests run in the sandbox (RustPython). The
        // baselines, in the same run: the call on a project without Python (the instance alone)
        // and on one trivial test (plus the interpreter's start and the driver).
        let tests =
            runtime.load(qlayer_bundled::bundled_plugin("tests").unwrap()).unwrap().install(Grants::default()).unwrap();
        let art = |p: &str, c: &str| Artifact { path: p.into(), media_type: "text/plain".into(), content: c.into() };
        let sample = vec![
            art("main.py", SAMPLE_MAIN),
            art("tests/test_acceptance.py", SAMPLE_TESTS),
            art("pyproject.toml", "[project]\nname = \"todo\"\nversion = \"0.1.0\"\n"),
        ];
        let projects = [
            ("no Python (the call alone)", vec![art("README.md", "# todo\n")], 0),
            ("one trivial test", vec![art("test_one.py", "def test_one():\n    assert 1 + 1 == 2\n")], 1),
            ("the scripted double's Python project", sample, 3),
        ];
        println!("tests validator: the project's tests in the sandbox, median of 5 calls");
        for (name, files, expected) in projects {
            let mut times = Vec::new();
            for _ in 0..5 {
                let began = Instant::now();
                let (_, found) = qlayer_factory::validate_step("bench", &tests, "t", &files).await;
                let found = found.unwrap();
                assert!(!found.iter().any(|d| d.is_error()), "{name}: {found:?}");
                let ran = qlayer_factory::tests_summary(&found).map(|t| t.passed).unwrap_or(0);
                assert_eq!(ran, expected, "{name}: {found:?}");
                times.push(began.elapsed());
            }
            times.sort();
            println!("  {name:<38} {:>8.1} ms", times[2].as_secs_f64() * 1e3);
        }
    });
}

/// The scripted test double's Python template for "a todo list CLI in Python" (main.py and
/// its acceptance tests, as `qlayer run` writes them).
const SAMPLE_MAIN: &str = "\"\"\"Todo: a todo list CLI\"\"\"\nimport sys\n\nCOMMANDS = {\n    \"add\": \"adds a todo\",\n    \"list\": \"lists todos\",\n    \"done\": \"marks a todo done\",\n}\n\n\ndef main(argv):\n    if len(argv) < 2 or argv[1] not in COMMANDS:\n        print(\"usage: todo <command>\", file=sys.stderr)\n        return 2\n    print(argv[1] + \": \" + COMMANDS[argv[1]])\n    return 0\n\n\nif __name__ == \"__main__\":\n    sys.exit(main(sys.argv))\n";
const SAMPLE_TESTS: &str = "import os\nimport sys\nimport unittest\n\nsys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), \"..\"))\n\nimport main  # noqa: E402\n\nFEATURES = [\"add\", \"list\", \"done\"]\n\n\nclass AcceptanceTest(unittest.TestCase):\n    def test_usage(self):\n        self.assertEqual(main.main([\"todo\"]), 2)\n\n    def test_commands(self):\n        for feature in FEATURES:\n            self.assertIn(feature, main.COMMANDS)\n            self.assertEqual(main.main([\"todo\", feature]), 0)\n\n    def test_unknown(self):\n        self.assertEqual(main.main([\"todo\", \"no-such-command\"]), 2)\n\n\nif __name__ == \"__main__\":\n    unittest.main()\n";
