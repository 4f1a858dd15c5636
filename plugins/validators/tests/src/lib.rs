//! The `tests` validator: runs the project's Python tests inside this plugin's wasm sandbox, with
//! RustPython (a Python interpreter in Rust, its standard library frozen into the component).
//! Generated code never runs on the host: the files come in as the validator's artifacts and
//! live only in the sandbox's memory; the plugin is granted no network and no host files.
//!
//! It collects `unittest` test cases and pytest-style test functions and `Test*` classes from
//! the project's test files (`test*.py`, `*_test.py`), imports the project's modules from
//! memory (from the project's root, `src/`, or a test's own folder, as `python -m unittest` and
//! pytest would), and runs each test with its own time and memory budget (a trace function), so
//! a test that loops or allocates without end fails on its own, named, and the others still run.
//! The instance's own limits (the manifest's) stop what the budgets cannot see.
//!
//! What comes back: an error per failing test (rule `test-failed` for an assertion,
//! `test-error` for another exception, `test-timeout`, `test-memory`) at the innermost line of
//! the project the failure passed through, naming the test; a warning (`test-not-run`) for a
//! test that needs what the sandbox lacks (a third-party package, pytest fixtures) and for test
//! files of languages it has no runner for; `no-tests` when Python code has no tests; and one
//! `info` summary (rule `tests-summary`, [`summary`]). It vouches for no file's syntax: one
//! pathless `unchecked` says so, so the run's unchecked files are the syntax validator's to name.

use qlayer_sdk::validator::Validator;
use qlayer_sdk::*;
use rustpython_vm::{Interpreter, InterpreterBuilder};
use serde::Deserialize;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Each test's time budget.
pub const TEST_SECONDS: f64 = 5.0;
/// All the tests' time budget (the manifest gives the instance 120 s).
pub const TOTAL_SECONDS: f64 = 90.0;
/// The interpreter's memory budget while tests run (the manifest gives the instance 512 MiB).
pub const MEMORY_BYTES: usize = 384 << 20;
/// Each test's captured output kept, in characters (stdout and stderr each).
pub const OUTPUT_CHARS: usize = 16 * 1024;

/// The system allocator, counting the bytes it holds: the memory budget's measure.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to `System` with the same arguments; the counter only observes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `layout` is `System`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HELD.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `System::realloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HELD.fetch_sub(layout.size(), Ordering::Relaxed);
            HELD.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[rustpython_vm::pymodule]
mod _qlayer {
    /// The bytes the interpreter holds now.
    #[pyfunction]
    fn allocated() -> usize {
        super::HELD.load(std::sync::atomic::Ordering::Relaxed)
    }
}

const DRIVER: &str = include_str!("driver.py");

/// One test's result, as the driver reports it.
#[derive(Debug, Deserialize)]
struct Outcome {
    id: String,
    outcome: String,
    path: Option<String>,
    line: Option<u32>,
    message: String,
    #[serde(default)]
    output: String,
}

#[derive(Deserialize)]
struct Output {
    results: Vec<Outcome>,
}

/// The counts of a run's tests, as the `tests-summary` diagnostic says them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
    pub not_run: u32,
}

/// The summary's message: `4 tests ran in the sandbox: 3 passed, 1 failed, 0 skipped; 0 not run`.
pub fn summary(s: &Summary) -> String {
    format!(
        "{} tests ran in the sandbox: {} passed, {} failed, {} skipped; {} not run",
        s.passed + s.failed + s.skipped,
        s.passed,
        s.failed,
        s.skipped,
        s.not_run
    )
}

fn is_python_test(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.ends_with(".py") && name != "__init__.py" && (name.starts_with("test") || name.ends_with("_test.py"))
}

/// The language of a test file this validator has no sandboxed runner for.
fn other_test(path: &str) -> Option<&'static str> {
    let name = path.rsplit('/').next().unwrap_or(path);
    let in_tests = path.starts_with("tests/") || path.contains("/tests/");
    let (stem, ext) = name.rsplit_once('.')?;
    let test_name =
        stem.ends_with("_test") || stem.ends_with(".test") || stem.ends_with(".spec") || stem.starts_with("test");
    let lang = match ext {
        "rs" if in_tests => "Rust",
        "go" if stem.ends_with("_test") => "Go",
        "js" | "mjs" | "cjs" | "jsx" if test_name => "JavaScript",
        "ts" | "tsx" if test_name => "TypeScript",
        "java" if stem.ends_with("Test") || stem.ends_with("Tests") => "Java",
        "rb" if stem.ends_with("_spec") || stem.ends_with("_test") => "Ruby",
        _ => return None,
    };
    Some(lang)
}

/// A finding at a line: a traceback names lines, not columns.
fn diagnostic(severity: Severity, rule: &str, path: Option<String>, line: Option<u32>, message: String) -> Diagnostic {
    Diagnostic { severity, rule: rule.into(), path, line, column: None, message }
}

fn interpreter() -> Interpreter {
    let builder = InterpreterBuilder::new();
    let mut defs = rustpython_stdlib::stdlib_module_defs(&builder.ctx);
    defs.push(_qlayer::module_def(&builder.ctx));
    builder.add_native_modules(&defs).add_frozen_modules(rustpython_pylib::FROZEN_STDLIB).build()
}

/// Runs the driver over the project's Python files; the driver's JSON, or why it failed.
fn run_driver(input: String) -> Result<Output, String> {
    interpreter().enter(|vm| {
        let scope = vm.new_scope_with_builtins();
        scope
            .globals
            .set_item("__qlayer_input__", vm.ctx.new_str(input).into(), vm)
            .map_err(|_| "could not hand the files to the interpreter".to_string())?;
        if let Err(e) = vm.run_string(scope.clone(), DRIVER, "<qlayer-tests>") {
            let mut text = String::new();
            let _ = vm.write_exception(&mut text, &e);
            return Err(format!("the test driver failed: {text}"));
        }
        let out = scope
            .globals
            .get_item("__qlayer_output__", vm)
            .map_err(|_| "the test driver returned nothing".to_string())?;
        let out = out.str(vm).map_err(|_| "the test driver's output is not text".to_string())?;
        serde_json::from_str(&out.to_string_lossy()).map_err(|e| format!("the test driver's output: {e}"))
    })
}

struct Tests;

impl Validator for Tests {
    fn validate(artifacts: Vec<Artifact>) -> Result<Vec<Diagnostic>, PluginError> {
        // It runs tests; it does not vouch for any file's syntax (the syntax validator does).
        let mut found = vec![diagnostic(
            Severity::Info,
            "unchecked",
            None,
            None,
            "runs the project's tests; checks no file's syntax".into(),
        )];
        let mut python = serde_json::Map::new();
        // The project's other text files, which its tests may read (`open`, read-only).
        let mut data = serde_json::Map::new();
        let mut tests = Vec::new();
        for a in &artifacts {
            let is_python = a.path.ends_with(".py");
            match (is_python, std::str::from_utf8(&a.content)) {
                (true, Ok(text)) => {
                    python.insert(a.path.clone(), text.into());
                    if is_python_test(&a.path) {
                        tests.push(a.path.clone());
                    }
                }
                (true, Err(_)) => found.push(diagnostic(
                    Severity::Error,
                    "test-error",
                    Some(a.path.clone()),
                    None,
                    "not UTF-8: Python cannot import it".into(),
                )),
                (false, text) => {
                    if let Ok(text) = text {
                        data.insert(a.path.clone(), text.into());
                    }
                    if let Some(lang) = other_test(&a.path) {
                        found.push(diagnostic(
                            Severity::Warning,
                            "test-not-run",
                            Some(a.path.clone()),
                            None,
                            format!("not run: the sandbox runs Python tests only, and this is {lang}"),
                        ));
                    }
                }
            }
        }
        if python.is_empty() {
            return Ok(found);
        }
        if tests.is_empty() {
            found.push(diagnostic(
                Severity::Warning,
                "no-tests",
                None,
                None,
                format!("{} Python files and no tests (test*.py or *_test.py) to run", python.len()),
            ));
            return Ok(found);
        }
        tests.sort();
        let input = serde_json::json!({
            "files": python,
            "data": data,
            "tests": tests,
            "limits": {
                "test_seconds": TEST_SECONDS,
                "total_seconds": TOTAL_SECONDS,
                "memory_bytes": MEMORY_BYTES,
                "output_chars": OUTPUT_CHARS,
            },
        });
        let output = run_driver(input.to_string()).map_err(PluginError::Internal)?;
        let mut counts = Summary::default();
        for r in output.results {
            let (severity, rule) = match r.outcome.as_str() {
                "passed" => {
                    counts.passed += 1;
                    continue;
                }
                "skipped" => {
                    counts.skipped += 1;
                    continue;
                }
                "not-run" => {
                    counts.not_run += 1;
                    (Severity::Warning, "test-not-run")
                }
                "failed" => (Severity::Error, "test-failed"),
                "timeout" => (Severity::Error, "test-timeout"),
                "memory" => (Severity::Error, "test-memory"),
                _ => (Severity::Error, "test-error"),
            };
            if severity == Severity::Error {
                counts.failed += 1;
            }
            let mut message = format!("{}: {}", r.id, r.message);
            if severity == Severity::Error && !r.output.trim().is_empty() {
                message.push_str(&format!("\noutput:\n{}", r.output.trim_end()));
            }
            found.push(diagnostic(severity, rule, r.path, r.line, message));
        }
        found.push(diagnostic(Severity::Info, "tests-summary", None, None, summary(&counts)));
        Ok(found)
    }
}

qlayer_sdk::export_validator!(Tests);
