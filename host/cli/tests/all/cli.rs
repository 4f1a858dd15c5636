//! `qlayer run` end to end on the embedded default, its bad-input errors, and the plugin
//! authoring commands (`new` → `build` → `inspect` → loads in the host).

use std::path::Path;
use std::process::{Command, Output};

fn qlayer(args: &[&str], data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlayer"))
        .args(args)
        .env("QLAYER_DATA_DIR", data)
        .env_remove("QLAYER_BASE_URL")
        .env_remove("QLAYER_PROVIDER")
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn run_builds_a_validated_project_offline_with_progress_and_a_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("todo");
    let o = qlayer(
        &["run", "A todo list CLI in Python, with due dates and tags", "--out", out.to_str().unwrap()],
        &tmp.path().join("data"),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("scripted"), "the provider in use is named: {stdout}");
    for role in ["product-manager", "architect", "developer", "devops", "qa-engineer", "reviewer"] {
        assert!(stdout.contains(&format!("✓ {role}")), "{role}: {stdout}");
    }
    // Piped, progress is plain lines (no spinner, no escape codes), and the summary says what
    // was built, checked and spent.
    assert!(stdout.contains("  … developer") && !stdout.contains('\u{1b}'), "{stdout}");
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            l.starts_with("  built ")
                || l.starts_with("  checked ")
                || l.starts_with("  tests ")
                || l.starts_with("  spent ")
        })
        .collect();
    assert_eq!(summary.len(), 4, "{stdout}");
    assert!(
        summary[0].contains(" files in ") && summary[0].contains("sources") && summary[0].contains("tests"),
        "{stdout}"
    );
    assert!(
        summary[1].contains("5 validators (syntax, tests, secrets, deps, hap): 0 errors, 0 warnings; every file read"),
        "{stdout}"
    );
    assert_eq!(summary[2], "  tests    3 of 3 passed in the sandbox");
    assert!(summary[3].contains(" tokens (") && summary[3].contains("over 6 agent steps"), "{stdout}");
    let last = stdout.lines().last().unwrap();
    // Every file was checked, and the project's own tests passed inside the sandbox.
    assert!(
        last.starts_with("passed: every validator passed; 3 of 3 tests passed in the sandbox —"),
        "every file was checked: {stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("qlayer-run.json")).unwrap()).unwrap();
    assert_eq!(report["status"], "passed");
    assert!(out.join("tests/test_acceptance.py").is_file() && out.join("Dockerfile").is_file());
    assert!(report["tokens"]["prompt"].as_u64().unwrap() > 0);
    for file in report["files"].as_array().unwrap() {
        assert!(out.join(file["path"].as_str().unwrap()).is_file(), "{file}");
    }
    // The compile cache was filled: a second run loads compiled plugins from disk. (`cargo test`
    // points QLAYER_CACHE_DIR at the checkout's shared cache; without it, it is the data dir's.)
    let cache = std::env::var_os("QLAYER_CACHE_DIR").map(std::path::PathBuf::from);
    let cache = cache.unwrap_or_else(|| tmp.path().join("data/cache"));
    assert!(std::fs::read_dir(cache).unwrap().count() >= 4);
    let again = qlayer(
        &["run", "A todo list CLI", "--out", tmp.path().join("second").to_str().unwrap()],
        &tmp.path().join("data"),
    );
    assert!(again.status.success(), "{:?}", text(&again));
}

#[test]
fn run_rejects_bad_input_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = tmp.path().join("out");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["run".into(), "   ".into(), "--out".into(), out.display().to_string()], "requirement is empty"),
        (
            vec![
                "run".into(),
                "x".into(),
                "--out".into(),
                out.display().to_string(),
                "--provider".into(),
                "gpt5".into(),
            ],
            "unknown provider `gpt5`",
        ),
        (
            vec![
                "run".into(),
                "x".into(),
                "--out".into(),
                out.display().to_string(),
                "--provider".into(),
                "openai".into(),
                "--base-url".into(),
                "not a url".into(),
            ],
            "--base-url `not a url` is not a URL",
        ),
        (
            vec!["run".into(), "x".into(), "--out".into(), "/proc/qlayer-cannot-write-here".into()],
            "cannot create the output directory",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = qlayer(&args, &data);
        let (_, stderr) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in {stderr}");
    }

    // A file where a directory is expected, and a non-empty directory without --force.
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let o = qlayer(&["run", "x", "--out", file.to_str().unwrap()], &data);
    assert!(text(&o).1.contains("is not a directory"), "{:?}", text(&o));
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    let o = qlayer(&["run", "x", "--out", full.to_str().unwrap()], &data);
    assert!(text(&o).1.contains("is not empty"), "{:?}", text(&o));
    assert_eq!(std::fs::read_to_string(full.join("keep.txt")).unwrap(), "mine", "nothing of the user's is touched");

    // A missing required argument is clap's usage error.
    let o = qlayer(&["run", "x"], &data);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("--out"));
}

#[test]
fn a_run_whose_files_stay_invalid_exits_3_and_still_writes_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("script.json");
    let broken = qlayer_tests::files_json("fn main( {");
    std::fs::write(&script, serde_json::json!({"rules": [{"role": "developer", "reply": broken}]}).to_string())
        .unwrap();
    let out = tmp.path().join("out");
    let o = qlayer(
        &["run", "x", "--out", out.to_str().unwrap(), "--script", script.to_str().unwrap(), "--max-repair-rounds", "1"],
        &tmp.path().join("data"),
    );
    let (stdout, _) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("error [rust-syntax] src/main.rs:1"), "{stdout}");
    assert!(stdout.contains("↻ repair round 1: 1 error(s) to fix"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("qlayer-run.json")).unwrap()).unwrap();
    assert_eq!(report["status"], "failed-validation");
    assert_eq!(std::fs::read_to_string(out.join("src/main.rs")).unwrap(), "fn main( {", "the files are written too");
}

/// The issue's first complaint: a Python project "passed" while nothing checked its Python. Now
/// every file of the default pipeline's Python project is read by a validator; and a file no
/// validator reads is named in the report and in the status line, never passed silently.
#[test]
fn files_no_validator_checked_are_named_in_the_status_line_and_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("short");
    let requirement = "a URL shortener web service in Python with FastAPI and SQLite";
    let o = qlayer(&["run", requirement, "--out", out.to_str().unwrap()], &tmp.path().join("data"));
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("qlayer-run.json")).unwrap()).unwrap();
    assert_eq!(report.get("unchecked"), None, "{report}");
    assert!(out.join("main.py").is_file() && out.join("tests/test_acceptance.py").is_file());
    let line = stdout.lines().last().unwrap();
    assert!(line.starts_with("passed: every validator passed; 3 of 3 tests passed in the sandbox —"), "{stdout}");

    // A developer that also writes Lua, which no bundled validator reads.
    let mut files: serde_json::Value = serde_json::from_str(&qlayer_tests::files_json("fn main() {}\n")).unwrap();
    files["files"].as_array_mut().unwrap().push(serde_json::json!({"path": "lib/app.lua", "content": "print(1)\n"}));
    let script = tmp.path().join("script.json");
    let rules = serde_json::json!({"rules": [{"role": "developer", "reply": files.to_string()}]});
    std::fs::write(&script, rules.to_string()).unwrap();
    let out = tmp.path().join("c");
    let args = ["run", "a CLI", "--out", out.to_str().unwrap(), "--script", script.to_str().unwrap()];
    let o = qlayer(&args, &tmp.path().join("data"));
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("qlayer-run.json")).unwrap()).unwrap();
    assert_eq!(report["unchecked"], serde_json::json!(["lib/app.lua"]), "{report}");
    let line = stdout.lines().last().unwrap();
    assert!(line.starts_with("passed: every validator passed; but no validator checked 1 file: lib/app.lua"), "{line}");
}

/// `qlayer validate DIR`: the validators on a project the factory did not write; exit 3 while
/// errors remain, the files no validator read named, version control skipped, bad input refused.
#[test]
fn validate_checks_any_directory_and_exits_3_on_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, project) = (tmp.path().join("data"), tmp.path().join("project"));
    std::fs::create_dir_all(project.join("src")).unwrap();
    std::fs::create_dir_all(project.join(".git")).unwrap();
    std::fs::write(project.join("src/main.rs"), "fn main() {\n    let x = ;\n}\n").unwrap();
    std::fs::write(project.join("ok.json"), "{\"a\": 1}").unwrap();
    std::fs::write(project.join("main.py"), "def f(:\n    pass\n").unwrap();
    std::fs::write(
        project.join("native.c"),
        "#if FAST\nint f(void) {\n#else\nint f(int x) {\n#endif\n  return 0;\n}\n",
    )
    .unwrap();
    std::fs::write(project.join("app.lua"), "print(1)").unwrap();
    std::fs::create_dir_all(project.join("web")).unwrap();
    std::fs::write(project.join("web/index.html"), "<main>\n<div>\n<script>let t = `${a}`;</script>\n</main>\n")
        .unwrap();
    std::fs::write(project.join("web/app.js"), "export function f() {\n  return `a ${b\n}\n").unwrap();
    std::fs::write(project.join("logo.png"), [0xff, 0xfe, 0x00]).unwrap();
    std::fs::write(project.join(".git/HEAD"), "not a project file {").unwrap();
    let dir = project.to_str().unwrap();
    let o = qlayer(&["validate", dir], &data);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stdout.contains("7 files in"), "{stdout}");
    assert!(stdout.contains("error [rust-syntax] src/main.rs:2:13 "), "{stdout}");
    assert!(stdout.contains("error [python-syntax] main.py:1:"), "{stdout}");
    // Lexical checks: C's `#else` branch opens no second brace; a `<div>` is left open, and so is a
    // template literal, named at the line where it began.
    assert!(stdout.contains("error [html-syntax] web/index.html:2 `<div>` is never closed"), "{stdout}");
    assert!(
        stdout.contains("error [javascript-syntax] web/app.js:2 this template literal is never closed"),
        "{stdout}"
    );
    assert!(!stdout.contains("native.c"), "{stdout}");
    assert!(stdout.contains("not checked (no validator reads them): app.lua"), "{stdout}");
    assert!(stdout.contains("not checked (not UTF-8 text): logo.png"), "{stdout}");
    assert!(!stdout.contains(".git"), "{stdout}");

    std::fs::write(project.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(project.join("main.py"), "def f():\n    pass\n").unwrap();
    std::fs::write(project.join("web/index.html"), "<main>\n<div></div>\n</main>\n").unwrap();
    std::fs::write(project.join("web/app.js"), "export function f() {\n  return `a ${b}`;\n}\n").unwrap();
    let o = qlayer(&["validate", dir, "--validator", "syntax"], &data);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(stdout.lines().last().unwrap().starts_with("passed: 0 errors"), "{stdout}");

    for (args, expected) in [
        (vec!["validate", "/nonexistent/qlayer"], "is not a directory"),
        (vec!["validate", dir, "--validator", "nope"], "`nope` is not a bundled validator"),
        (vec!["validate", dir, "--validator", "developer"], "`developer` is not a bundled validator"),
        (vec!["validate", dir, "--validator", "installed:missing"], "plugin `missing` is not installed"),
    ] {
        let o = qlayer(&args, &data);
        let (_, stderr) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in {stderr}");
    }
}

/// The `deps` and `hap` validators, through the sandbox: imports no manifest declares, a
/// standard-library module and a malformed range declared as packages, and profanity in a
/// README, each at its file and line, the word masked.
#[test]
fn validate_checks_imports_against_the_manifests_and_text_for_hap() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, project) = (tmp.path().join("data"), tmp.path().join("project"));
    std::fs::create_dir_all(project.join("web/src")).unwrap();
    let files = [
        ("pyproject.toml", "[project]\nname = \"short\"\ndependencies = [\"fastapi>=0.110\", \"sqlite3\"]\n"),
        ("app.py", "import sqlite3\nfrom fastapi import FastAPI\nimport requests\n"),
        ("web/package.json", "{\"name\": \"web\", \"dependencies\": {\"react\": \"=> 18\"}}\n"),
        ("web/src/app.js", "import React from 'react';\nconst express = require('express');\n"),
        ("README.md", "# Short\n\nThis shit works.\n"),
    ];
    for (path, text) in files {
        std::fs::write(project.join(path), text).unwrap();
    }
    let dir = project.to_str().unwrap();
    let o = qlayer(&["validate", dir, "--validator", "deps", "--validator", "hap"], &data);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{stdout}{stderr}");
    for expected in [
        "error [stdlib-dependency] pyproject.toml:3 `sqlite3` is declared as a package",
        "error [undeclared-import] app.py:3 `requests` is imported but pyproject.toml does not declare it (deps)",
        "error [invalid-dependency] web/package.json:1 `react`: `=> 18` is not a version range",
        "error [undeclared-import] web/src/app.js:2 `express` is imported but web/package.json does not declare it",
        "error [hap-profanity] README.md:3:6 s*** (profanity)",
    ] {
        assert!(stdout.contains(expected), "expected {expected:?} in\n{stdout}");
    }
    assert!(!stdout.contains("shit"), "the word is masked: {stdout}");
    assert!(stdout.lines().last().unwrap().starts_with("failed: 5 errors"), "{stdout}");
}

/// The `tests` validator runs a project's Python tests inside its wasm sandbox: passing tests
/// count, a failing assertion is an error at its line naming the test, a test that loops or
/// allocates without end is stopped at its budget and fails alone (the tests after it still run),
/// one that tries the network gets no connection, and tests needing what the sandbox lacks are
/// named as not run. Nothing of the project runs on the host.
#[test]
fn validate_runs_python_tests_in_the_sandbox_each_under_its_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, project) = (tmp.path().join("data"), tmp.path().join("project"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let host_marker = tmp.path().join("ran-on-the-host");
    let files = [
        ("shortener/__init__.py", String::new()),
        (
            "shortener/codes.py",
            "import hashlib\n\n\ndef code(url):\n    return hashlib.sha256(url.encode()).hexdigest()[:7]\n".into(),
        ),
        (
            "tests/test_codes.py",
            "import unittest\n\nfrom shortener.codes import code\n\n\nclass CodeTest(unittest.TestCase):\n    def test_length(self):\n        self.assertEqual(len(code(\"https://example.com\")), 7)\n\n    def test_stable(self):\n        self.assertEqual(code(\"a\"), code(\"b\"))\n".into(),
        ),
        (
            "tests/test_limits.py",
            format!(
                "import os\n\n\ndef test_loops():\n    while True:\n        pass\n\n\ndef test_allocates():\n    held = []\n    while True:\n        held.append(bytearray(1 << 20))\n\n\ndef test_network():\n    import socket\n    socket.create_connection((\"127.0.0.1\", {port}), timeout=2)\n\n\ndef test_host_files():\n    open({marker:?}, \"w\").write(\"escaped\")\n\n\ndef test_prints_then_passes():\n    for i in range(2000):\n        print(\"line\", i)\n\n\ndef test_needs_a_fixture(tmp_path):\n    pass\n",
                marker = host_marker.to_str().unwrap()
            ),
        ),
        ("tests/test_web.py", "import fastapi\n\n\ndef test_app():\n    pass\n".into()),
        ("config/settings.json", "{\"length\": 7}\n".into()),
        (
            "tests/test_settings.py",
            "import json\n\nfrom shortener.codes import code\n\n\ndef test_reads_the_projects_own_files():\n    with open(\"config/settings.json\") as f:\n        assert len(code(\"a\")) == json.load(f)[\"length\"]\n".into(),
        ),
        (
            "tests/test_pytest_style.py",
            "import pytest\n\nfrom shortener.codes import code\n\n\n@pytest.fixture\ndef url():\n    return \"https://example.com\"\n\n\n@pytest.mark.parametrize(\"size\", [7, 8])\ndef test_size(url, size):\n    assert len(code(url)) == size\n\n\ndef test_raises():\n    with pytest.raises(AttributeError):\n        code(None)\n".into(),
        ),
    ];
    for (path, text) in &files {
        let path = project.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let o = qlayer(&["validate", project.to_str().unwrap(), "--validator", "tests"], &data);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stdout.contains("8 files in"), "{stdout}");
    let line =
        |needle: &str| stdout.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}: {stdout}"));
    assert!(line("tests/test_codes.py::CodeTest::test_stable").contains("error [test-failed] tests/test_codes.py:11"));
    assert!(line("test_codes.py::CodeTest::test_stable").contains("AssertionError"));
    assert!(!stdout.contains("test_length"), "a passing test is only counted: {stdout}");
    let looped = line("tests/test_limits.py::test_loops");
    assert!(looped.contains("error [test-timeout] tests/test_limits.py:") && looped.contains("time limit"), "{looped}");
    let grew = line("tests/test_limits.py::test_allocates");
    assert!(grew.contains("error [test-memory] tests/test_limits.py:") && grew.contains("memory limit"), "{grew}");
    let network = line("tests/test_limits.py::test_network");
    assert!(network.contains("error [test-error]") && network.contains("getaddrinfo is not available"), "{stdout}");
    assert!(listener.accept().is_err(), "a test reached the host's network");
    assert!(line("tests/test_limits.py::test_host_files").contains("error [test-error]"));
    assert!(!host_marker.exists(), "a test wrote a host file");
    assert!(!stdout.contains("test_prints_then_passes"), "{stdout}");
    let fixture = line("tests/test_limits.py::test_needs_a_fixture");
    assert!(fixture.contains("warning [test-not-run]") && fixture.contains("pytest fixtures (tmp_path)"), "{fixture}");
    let web = line("tests/test_web.py");
    assert!(web.contains("warning [test-not-run]") && web.contains("`fastapi`"), "{web}");
    // pytest-style tests get the sandbox's small pytest: fixtures, parametrize, raises.
    let size = line("tests/test_pytest_style.py::test_size[8]");
    assert!(size.contains("error [test-failed] tests/test_pytest_style.py:13"), "{size}");
    assert!(size.contains("AssertionError: assert len(code(url)) == size"), "{size}");
    assert!(!stdout.contains("test_size[7]") && !stdout.contains("test_raises"), "{stdout}");
    // A test reads the project's own files (read-only, from memory): `test_reads_the_projects_own_files`.
    assert!(!stdout.contains("test_reads_the_projects_own_files"), "{stdout}");
    assert!(stdout.contains("tests: 5 of 11 passed in the sandbox, 2 not run"), "{stdout}");
}

/// `--pipeline FILE` runs the steps a pipeline lists; a bad one is refused before anything runs,
/// naming the step.
#[test]
fn run_follows_a_pipeline_file_and_refuses_a_bad_one_naming_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let write = |name: &str, text: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let cases = [
        (
            write(
                "cycle.toml",
                "[[steps]]\nname = \"a\"\nrole = \"developer\"\nafter = [\"b\"]\n[[steps]]\nname = \"b\"\nrole = \"developer\"\nafter = [\"a\"]\n",
            ),
            "steps[0] (`a`): after: the steps' dependencies form a cycle through a, b",
        ),
        (write("key.toml", "[[steps]]\nname = \"a\"\nrole = \"developer\"\ncolour = 1\n"), "unknown field `colour`"),
        (
            write("missing.toml", "[[steps]]\nname = \"a\"\nrole = \"installed:reviewer\"\n"),
            "steps[0] (`a`): role: no plugin `reviewer` is installed for this tenant",
        ),
        (write("bad.json", "{\"steps\": 3}"), "steps: invalid type"),
    ];
    for (i, (file, expected)) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        let o = qlayer(&["run", "x", "--out", out.to_str().unwrap(), "--pipeline", file.to_str().unwrap()], &data);
        let (stdout, stderr) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{file:?}: {stdout}{stderr}");
        assert!(stderr.contains(expected), "{file:?}: expected {expected:?} in {stderr}");
        assert!(!stdout.contains("✓"), "nothing ran: {stdout}");
    }

    let mine = write(
        "mine.toml",
        "name = \"mine\"\n[[steps]]\nname = \"plan\"\nrole = \"product-manager\"\n[repair]\nrounds = 0\n",
    );
    let out = tmp.path().join("planned");
    let o = qlayer(&["run", "a todo CLI", "--out", out.to_str().unwrap(), "--pipeline", mine.to_str().unwrap()], &data);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("✓ plan"), "{stdout}");
    assert!(!stdout.contains("developer"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("qlayer-run.json")).unwrap()).unwrap();
    assert_eq!(report["pipeline"], "mine");
    assert!(out.join("docs/PRD.json").is_file());
}

/// `qlayer run` is a job through the core scheduler: a step that cannot run (here, the token
/// budget is spent after the first) fails the run with exit 3 and a `failed` report that names
/// why and lists the steps that did run.
#[test]
fn a_run_that_spends_its_token_budget_stops_with_a_failed_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = qlayer(&["run", "x", "--out", out.to_str().unwrap(), "--token-budget", "1"], &tmp.path().join("data"));
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stdout.contains("✓ product-manager"), "{stdout}");
    assert!(stdout.contains("token budget of 1 is spent"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("qlayer-run.json")).unwrap()).unwrap();
    assert_eq!(report["status"], "failed");
    assert!(report["stop_reason"].as_str().unwrap().contains("token budget of 1 is spent"), "{report}");
    let steps: Vec<&str> = report["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["product-manager"]);
    assert!(report["tokens"]["prompt"].as_u64().unwrap() > 0);
}

#[test]
fn plugin_new_then_build_produces_a_component_the_host_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dir = tmp.path().join("echo-tool");
    let o = qlayer(&["plugin", "new", "tool", "echo-tool", "--dir", dir.to_str().unwrap()], &data);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(dir.join("qlayer-plugin.toml").is_file());

    let wasm = tmp.path().join("echo-tool.wasm");
    let build = Command::new(env!("CARGO_BIN_EXE_qlayer"))
        .args(["plugin", "build", dir.to_str().unwrap(), "--out", wasm.to_str().unwrap()])
        // Reuse the workspace's compiled plugin dependencies.
        .env("CARGO_TARGET_DIR", qlayer_bundled::bundled::PLUGIN_TARGET_DIR)
        .output()
        .unwrap();
    assert!(build.status.success(), "{:?}", text(&build));
    assert!(text(&build).0.contains("built"), "{:?}", text(&build));

    let inspect = qlayer(&["plugin", "inspect", wasm.to_str().unwrap(), "--json"], &data);
    assert!(inspect.status.success(), "{:?}", text(&inspect));
    let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(info["manifest"]["name"], "echo-tool");
    assert_eq!(info["manifest"]["kind"], "tool");
    assert_eq!(info["world"], "tool-plugin");
    assert!(info["load_error"].is_null(), "{info}");
    assert!(
        info["exports"].as_array().unwrap().iter().any(|e| e.as_str().unwrap().starts_with("quantumlayer:plugin/tool"))
    );

    // And it runs in the host.
    let rt = qlayer_runtime::Runtime::new(Default::default()).unwrap();
    let installed = rt.load(&std::fs::read(&wasm).unwrap()).unwrap().install(Default::default()).unwrap();
    let reply = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { installed.tool("t").await.unwrap().invoke(r#"{"a":1}"#).await })
        .unwrap();
    assert_eq!(reply, r#"{"echo":{"a":1}}"#);
}

#[test]
fn plugin_commands_reject_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let o = qlayer(&["plugin", "new", "widget", "x"], &data);
    assert_ne!(o.status.code(), Some(0));
    assert!(text(&o).1.contains("unknown plugin kind `widget`"), "{:?}", text(&o));
    let o = qlayer(&["plugin", "new", "tool", "Bad_Name", "--dir", tmp.path().join("b").to_str().unwrap()], &data);
    assert!(text(&o).1.contains("`name`"), "{:?}", text(&o));
    let junk = tmp.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x01\0\0\0").unwrap();
    let o = qlayer(&["plugin", "inspect", junk.to_str().unwrap()], &data);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("no plugin manifest"), "{:?}", text(&o));
    let o = qlayer(&["plugin", "build", tmp.path().to_str().unwrap()], &data);
    assert!(text(&o).1.contains("qlayer-plugin.toml"), "{:?}", text(&o));
}

#[test]
fn qlayer_keys_issues_a_working_key_for_a_tenant_locked_out_of_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("qlayer.db");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let db = rt.block_on(async {
        let db = qlayer_db::Db::open_sqlite(&path).await.unwrap();
        db.create_tenant("acme").await.unwrap();
        db
    });
    let o = qlayer(&["keys", "create", "--tenant", "acme", "--role", "admin"], tmp.path());
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    let secret = stdout.trim();
    assert!(secret.starts_with("ql_") && stderr.contains("shown once"), "{stdout}{stderr}");
    let principal = rt.block_on(db.authenticate(secret)).unwrap().expect("the key works");
    assert_eq!((principal.tenant_name.as_str(), principal.role), ("acme", qlayer_db::Role::Admin));
    let o = qlayer(&["keys", "list", "--tenant", "acme"], tmp.path());
    let (stdout, _) = text(&o);
    assert!(stdout.contains(&principal.key_id) && stdout.contains("admin\tactive"), "{stdout}");
    assert!(!stdout.contains(secret), "a list never shows a key");
    let o = qlayer(&["keys", "create", "--tenant", "nobody"], tmp.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("no tenant named `nobody`"), "{}", text(&o).1);
    let records = rt.block_on(db.audit_records(None, 0, 10)).unwrap();
    assert!(records.iter().any(|r| r.action == "key.create" && r.actor == "cli"), "{records:?}");
}

#[test]
fn audit_verify_reports_an_intact_chain_and_the_first_broken_record() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("qlayer.db");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let db = rt.block_on(async {
        let db = qlayer_db::Db::open_sqlite(&path).await.unwrap();
        for i in 0..3 {
            db.audit(qlayer_db::AuditEntry {
                actor: "key_admin".into(),
                tenant_id: "tn_a".into(),
                action: "plugin.install".into(),
                target: format!("plugin-{i}"),
                outcome: "ok".into(),
            })
            .await
            .unwrap();
        }
        db
    });
    let o = qlayer(&["audit", "verify"], tmp.path());
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("intact: 3 records"), "{stdout}");

    rt.block_on(async {
        sqlx_update(&db, "UPDATE audit_log SET target = 'plugin-x' WHERE seq = 2").await;
    });
    let o = qlayer(&["audit", "verify", "--database", &format!("sqlite://{}", path.display())], tmp.path());
    let (stdout, _) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("BROKEN at record 2: its contents were changed"), "{stdout}");

    let o = qlayer(&["audit", "verify"], &tmp.path().join("empty"));
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("no database at"), "{}", text(&o).1);
}

async fn sqlx_update(db: &qlayer_db::Db, sql: &str) {
    sqlx::query(sql).execute(db.pool()).await.unwrap();
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn serve_answers_health_and_readiness_bootstraps_an_admin_once_and_stops_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let start = |addr: &str| {
        Command::new(env!("CARGO_BIN_EXE_qlayer"))
            .args(["serve", "--rest-addr", addr, "--grpc-addr", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .env_remove("QLAYER_ADMIN_KEY")
            .env_remove("QLAYER_DATABASE_URL")
            .env_remove("QLAYER_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let wait_ready = |addr: &str| {
        for _ in 0..200 {
            if let Some(r) = http_get(addr, "/healthz") {
                return r;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("qlayer serve did not come up on {addr}");
    };
    let stop = |child: std::process::Child| {
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "exits cleanly on SIGTERM: {:?}", out.status);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let addr = free_addr();
    let child = start(&addr);
    let health = wait_ready(&addr);
    assert!(health.starts_with("HTTP/1.0 200") && health.contains("\"ok\""), "{health}");
    let ready = http_get(&addr, "/readyz").unwrap();
    assert!(ready.starts_with("HTTP/1.0 200") && ready.contains("\"ready\""), "{ready}");
    let stderr = stop(child);
    assert!(stderr.contains("admin API key (shown once"), "{stderr}");
    assert!(data.join("qlayer.db").exists(), "SQLite in the data dir by default");

    // Second start: the admin exists; no key is printed again.
    let addr = free_addr();
    let child = start(&addr);
    wait_ready(&addr);
    let stderr = stop(child);
    assert!(!stderr.contains("admin API key"), "{stderr}");

    // A config file with an unknown key is refused, quoting the key.
    let config = tmp.path().join("qlayer.toml");
    std::fs::write(&config, "[server]\nrest-adress = \"127.0.0.1:1\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qlayer")).args(["serve", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rest-adress") && stderr.contains("line 2"), "{stderr}");
}

/// A gated step: `qlayer run` asks on the terminal (here, standard input): a rejection's comment
/// goes back to the step, the repaired step's gate asks again; `--approve-all` does not ask; with
/// standard input closed the run stops and says what to do.
#[test]
fn run_asks_at_a_gate_and_a_rejection_goes_back_to_the_step() {
    use std::io::Write as _;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let pipeline = tmp.path().join("gated.toml");
    std::fs::write(
        &pipeline,
        "[[steps]]\nname = \"pm\"\nrole = \"product-manager\"\n\
         [[steps]]\nname = \"dev\"\nrole = \"developer\"\nafter = [\"pm\"]\nvalidators = [\"syntax\"]\ngate = true\n\
         [repair]\nrounds = 1\nsteps = [\"dev\"]\n",
    )
    .unwrap();
    let script = tmp.path().join("script.json");
    let tabs = qlayer_tests::files_json("fn main() {\n\tprintln!(\"tabs\");\n}\n");
    let rules = serde_json::json!({"rules": [{"role": "developer", "contains": "indent with tabs", "reply": tabs}]});
    std::fs::write(&script, rules.to_string()).unwrap();
    let run = |out: &str, extra: &[&str], stdin: &str| {
        let out = tmp.path().join(out);
        let mut args = vec!["run", "a CLI", "--out", out.to_str().unwrap(), "--pipeline", pipeline.to_str().unwrap()];
        args.extend(["--script", script.to_str().unwrap()]);
        args.extend(extra);
        let mut child = Command::new(env!("CARGO_BIN_EXE_qlayer"))
            .args(&args)
            .env("QLAYER_DATA_DIR", &data)
            .env_remove("QLAYER_BASE_URL")
            .env_remove("QLAYER_PROVIDER")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        (child.wait_with_output().unwrap(), out)
    };

    let (o, out) = run("asked", &[], "maybe\nn: indent with tabs\ny\n");
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.matches("⏸ gate after `dev`").count(), 2, "asked again after the repair: {stdout}");
    let main = std::fs::read_to_string(out.join("src/main.rs")).unwrap();
    assert!(main.contains("\tprintln!"), "the comment reached the developer: {main}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("qlayer-run.json")).unwrap()).unwrap();
    assert_eq!((report["status"].as_str(), report["repair_rounds"].as_u64()), (Some("passed"), Some(1)), "{report}");

    let (o, _) = run("all", &["--approve-all"], "");
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(!stdout.contains("approve?"), "{stdout}");

    let (o, _) = run("closed", &[], "");
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("standard input is closed") && stderr.contains("--approve-all"), "{stderr}");
}

/// `qlayer eval`: a suite's cases run one after the other through the same pipeline and provider;
/// the table has a row per case and the totals; each project and eval.json are written; a case
/// that does not pass makes the exit code 3. A bad suite is refused before anything runs.
#[test]
fn eval_runs_a_suite_and_prints_a_row_per_requirement_and_the_totals() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let pipeline = tmp.path().join("short.toml");
    std::fs::write(
        &pipeline,
        "[[steps]]\nname = \"pm\"\nrole = \"product-manager\"\n\
         [[steps]]\nname = \"dev\"\nrole = \"developer\"\nafter = [\"pm\"]\nvalidators = [\"syntax\"]\n\
         [repair]\nrounds = 1\nsteps = [\"dev\"]\n",
    )
    .unwrap();
    let script = tmp.path().join("script.json");
    let broken = qlayer_tests::files_json("fn main( {");
    let rules = serde_json::json!({"rules": [{"role": "developer", "contains": "a broken parser", "reply": broken}]});
    std::fs::write(&script, rules.to_string()).unwrap();
    let suite = tmp.path().join("suite.toml");
    std::fs::write(
        &suite,
        "[[case]]\nname = \"todo\"\nrequirement = \"a todo list CLI\"\n\
         [[case]]\nname = \"parser\"\nrequirement = \"a broken parser CLI\"\n",
    )
    .unwrap();
    let out = tmp.path().join("results");
    let args = ["eval", suite.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let more = ["--pipeline", pipeline.to_str().unwrap(), "--script", script.to_str().unwrap()];
    let o = qlayer(&[&args[..], &more[..]].concat(), &data);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stdout.contains("[1/2] todo: passed") && stdout.contains("[2/2] parser: failed-validation"), "{stdout}");
    let row = |name: &str| stdout.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name}: {stdout}"));
    assert!(row("case").contains("checked") && row("case").contains("tokens"), "{stdout}");
    assert!(row("todo ").contains("passed"), "{stdout}");
    assert!(row("parser").contains("failed-validation"), "{stdout}");
    assert!(row("total").contains("1/2 passed"), "{stdout}");
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(results["cases"][0]["status"], "passed", "{results}");
    assert_eq!(results["cases"][0]["errors"], 0, "{results}");
    assert!(results["cases"][0]["tokens"].as_u64().unwrap() > 0, "{results}");
    assert_eq!(
        (results["cases"][1]["errors"].as_u64(), results["cases"][1]["repair_rounds"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(results["total"]["status"], "1/2 passed");
    assert!(out.join("todo/src/main.rs").is_file() && out.join("parser/qlayer-run.json").is_file());
    assert_eq!(std::fs::read_to_string(out.join("parser/src/main.rs")).unwrap(), "fn main( {");

    // --json: the same results on standard output.
    let again = tmp.path().join("again");
    let o = qlayer(
        &[
            "eval",
            suite.to_str().unwrap(),
            "--out",
            again.to_str().unwrap(),
            "--json",
            "--pipeline",
            pipeline.to_str().unwrap(),
        ],
        &data,
    );
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "without the script both pass: {stdout}{stderr}");
    let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(printed["total"]["status"], "2/2 passed");

    // A bad suite: refused naming the case, nothing run.
    std::fs::write(&suite, "[[case]]\nname = \"a\"\nrequirement = \"x\"\nrequirment = \"typo\"\n").unwrap();
    let o = qlayer(&["eval", suite.to_str().unwrap(), "--out", tmp.path().join("bad").to_str().unwrap()], &data);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("unknown field `requirment`"), "{stderr}");
}

/// On a system without CA certificates (an empty `SSL_CERT_FILE`, as in a scratch image) the
/// main job still runs, since it reaches no registry, and a command that does reach one says
/// what is missing. Both panicked before: the registry client was made up front and panicked.
#[test]
fn without_ca_certificates_the_main_job_runs_and_a_registry_command_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let no_cas = tmp.path().join("no-cas.pem");
    std::fs::write(&no_cas, "").unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qlayer"))
            .args(args)
            .env("QLAYER_DATA_DIR", tmp.path().join("data"))
            .env("SSL_CERT_FILE", &no_cas)
            .env("SSL_CERT_DIR", tmp.path().join("no-certs"))
            .env_remove("QLAYER_BASE_URL")
            .env_remove("QLAYER_PROVIDER")
            .output()
            .unwrap()
    };
    let out = tmp.path().join("todo");
    let o = run(&["run", "a todo list CLI", "--out", out.to_str().unwrap()]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.join("qlayer-run.json").is_file());
    let o = run(&["plugin", "search", "registry.example.com"]);
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success() && !stderr.contains("panicked"), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("CA certificate"), "{stderr}");
}

/// On a terminal (a pseudo-terminal from `script`), `qlayer run` draws spinners for the running
/// steps instead of the plain `  … step` lines, and still prints each finished step and the
/// summary.
#[test]
fn on_a_terminal_run_shows_spinners_instead_of_plain_start_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("todo");
    let command = format!("{} run 'A todo list CLI in Python' --out {}", env!("CARGO_BIN_EXE_qlayer"), out.display());
    let o = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("QLAYER_DATA_DIR", tmp.path().join("data"))
        .env("TERM", "xterm-256color")
        .env_remove("QLAYER_BASE_URL")
        .env_remove("QLAYER_PROVIDER")
        .output()
        .unwrap();
    let (screen, stderr) = text(&o);
    assert!(o.status.success(), "screen:\n{screen}\nstderr:\n{stderr}");
    assert!(screen.contains('\u{1b}'), "a terminal gets the spinners' escape codes: {screen}");
    assert!(!screen.contains("  … developer"), "no plain start lines on a terminal: {screen}");
    assert!(screen.contains("✓ developer") && screen.contains("  spent "), "{screen}");
    assert!(screen.contains("passed: every validator passed"), "{screen}");
}
