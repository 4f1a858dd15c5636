//! Factory runs through the core scheduler on SQLite, as `qlayer run` and the service run them:
//! a whole run on the scripted provider (a test double), the bounded repair loop, bounded JSON
//! re-asks with a model that never answers in JSON (the local OpenAI-compatible test server),
//! the token budget, and a run that resumes from its last finished step after its host dies.

use qlayer_bundled::ProviderChoice;
use qlayer_db::{Db, Job, JobKind, JobStatus, NewJob};
use qlayer_jobs::{PluginExecutor, plan};
use qlayer_scheduler::{Execute, Scheduler, SchedulerConfig, TaskContext, TaskError};
use qlayer_tests::{TestServer, files_json, runtime};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// A finished run: its job, and its capsule unpacked.
struct Finished {
    job: Job,
    tasks: Vec<qlayer_db::Task>,
    out: tempfile::TempDir,
}

impl Finished {
    fn report(&self) -> serde_json::Value {
        self.job.output.as_ref().unwrap_or_else(|| panic!("no output: {:?}", self.job)).to_value()
    }
}

/// The job's row once it is terminal.
async fn finished(db: &Db, tenant: &str, job: &str) -> Job {
    for _ in 0..1200 {
        let now = db.job(tenant, job).await.unwrap().unwrap();
        if now.status.is_terminal() {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {job} did not finish")
}

/// Runs the factory on `choice` as a `run` job through a scheduler on a fresh SQLite database.
async fn run(choice: ProviderChoice, rounds: u32, budget: Option<u64>) -> Finished {
    run_for("A todo list CLI, with due dates and tags", choice, rounds, budget).await
}

/// Runs the factory on `requirement`, as [`run`].
async fn run_for(requirement: &str, choice: ProviderChoice, rounds: u32, budget: Option<u64>) -> Finished {
    let mut input = json!({"requirement": requirement, "max_repair_rounds": rounds});
    if let Some(budget) = budget {
        input["token_budget"] = json!(budget);
    }
    run_input(input, choice).await
}

/// Runs the factory on the run input `input`, as [`run`].
async fn run_input(input: serde_json::Value, choice: ProviderChoice) -> Finished {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&format!("sqlite://{}", dir.path().join("q.db").display())).await.unwrap();
    let tenant = db.create_tenant("t").await.unwrap();
    let market = qlayer_marketplace::Marketplace::open(dir.path(), Default::default(), db.clone()).await.unwrap();
    let executor = PluginExecutor::new(db.clone(), Arc::new(runtime()), Arc::new(market)).with_provider(choice);
    let config = SchedulerConfig { node_id: "test".into(), ..Default::default() };
    let scheduler = Scheduler::new(db.clone(), config, Arc::new(executor));
    scheduler.start().await.unwrap();
    let (job, _) = scheduler
        .submit(NewJob {
            tenant_id: &tenant.id,
            kind: JobKind::Run,
            input: &input,
            priority: 0,
            idempotency_key: None,
            deadline_ms: None,
            tasks: plan(JobKind::Run, &input, 3).unwrap(),
        })
        .await
        .unwrap();
    let job = finished(&db, &tenant.id, &job.id).await;
    let out = tempfile::tempdir().unwrap();
    if let Some(capsule) = db.artifact(&tenant.id, &job.id).await.unwrap() {
        qlayer_factory::unpack(&capsule.bytes, out.path()).unwrap();
    }
    let tasks = db.job_tasks(&tenant.id, &job.id).await.unwrap();
    scheduler.shutdown(Duration::from_secs(1)).await;
    Finished { job, tasks, out }
}

/// The default pipeline's steps, as its report lists them.
const EVERY_ROLE: [&str; 11] = [
    "product-manager",
    "architect",
    "developer",
    "devops",
    "qa-engineer",
    "reviewer",
    "validate: syntax",
    "validate: tests",
    "validate: secrets",
    "validate: deps",
    "validate: hap",
];

fn steps(report: &serde_json::Value) -> Vec<&str> {
    report["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_on_the_scripted_provider_writes_validated_files_and_a_report() {
    let run = run(ProviderChoice::Scripted { script: None }, 2, None).await;
    assert_eq!(run.job.status, JobStatus::Succeeded, "{:?}", run.job);
    let report = &run.report();
    assert_eq!(report["status"], "passed", "{report:#}");
    assert_eq!(steps(report), EVERY_ROLE);
    for step in report["steps"].as_array().unwrap() {
        assert!(step["digest"].as_str().unwrap().starts_with("sha256:") && step["outcome"] == "ok", "{step}");
    }
    assert!(report["steps"][0]["tokens"]["prompt"].as_u64().unwrap() > 0, "{report:#}");
    let files = [
        "docs/PRD.json",
        "docs/DESIGN.json",
        "Cargo.toml",
        "src/main.rs",
        "README.md",
        "tests/acceptance.rs",
        "docs/TEST_PLAN.json",
        "Dockerfile",
        ".github/workflows/ci.yml",
        "docs/REVIEW.json",
        qlayer_factory::REPORT_FILE,
    ];
    for file in files {
        assert!(run.out.path().join(file).is_file(), "{file} missing from the capsule");
    }
    // Every file the roles wrote was read by a validator, so the run passes with nothing unseen.
    assert_eq!(report.get("unchecked"), None, "{report:#}");
    assert!(!report["stop_reason"].as_str().unwrap().contains("no validator checked"), "{report:#}");
    // The reviewer's findings are the run's diagnostics, under its name (the test double says
    // that no model reviewed the code).
    let review = report["diagnostics"].as_array().unwrap().iter().find(|d| d["validator"] == "reviewer");
    assert_eq!(review.map(|d| &d["rule"]), Some(&json!("test-double")), "{report:#}");
    // The file plan has one owner per file, and each role wrote its own.
    let design: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.out.path().join("docs/DESIGN.json")).unwrap()).unwrap();
    let owner =
        |path: &str| design["files"].as_array().unwrap().iter().find(|f| f["path"] == path).map(|f| f["owner"].clone());
    assert_eq!(owner("src/main.rs"), Some(json!("developer")));
    assert_eq!(owner("tests/acceptance.rs"), Some(json!("qa-engineer")));
    assert_eq!(owner("Dockerfile"), Some(json!("devops")));
    let plan = std::fs::read_to_string(run.out.path().join("docs/TEST_PLAN.json")).unwrap();
    assert!(plan.contains("every feature has a command"), "{plan}");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.out.path().join(qlayer_factory::REPORT_FILE)).unwrap()).unwrap();
    assert_eq!(&written, report, "the capsule's report is the job's output");
}

/// Issue 17 items 5 and 7: a Python project from the default pipeline offline, every file read
/// by a validator, and its own tests run and passed inside the sandbox (the `tests` validator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_run_passes_its_own_tests_inside_the_sandbox() {
    let run = run_for(
        "A todo list CLI in Python, with due dates and tags",
        ProviderChoice::Scripted { script: None },
        2,
        None,
    )
    .await;
    let report = &run.report();
    assert_eq!(report["status"], "passed", "{report:#}");
    assert_eq!(steps(report), EVERY_ROLE);
    assert_eq!(report.get("unchecked"), None, "{report:#}");
    let reason = report["stop_reason"].as_str().unwrap();
    assert!(reason.contains("3 of 3 tests passed in the sandbox"), "{reason}");
    for file in ["main.py", "pyproject.toml", "tests/test_acceptance.py", "Dockerfile"] {
        assert!(run.out.path().join(file).is_file(), "{file} missing from the capsule");
    }
    let warnings: Vec<&serde_json::Value> =
        report["diagnostics"].as_array().unwrap().iter().filter(|d| d["severity"] != "info").collect();
    assert_eq!(warnings, Vec::<&serde_json::Value>::new(), "{report:#}");
}

/// A generated test that fails is an error at its line naming the test; it reaches the developer
/// (the assertion is in the QA engineer's file, the bug in the developer's), whose repaired code
/// passes in the next round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_generated_test_goes_back_to_the_developer_until_it_passes() {
    let files = |commands: &str| {
        json!({"files": [
            {"path": "pyproject.toml", "content": "[project]\nname = \"a-url-shortener-in-python\"\nversion = \"0.1.0\"\n"},
            {"path": "README.md", "content": "# A URL shortener\n"},
            {"path": "main.py", "content": format!("import sys\n\nCOMMANDS = {{{commands}}}\n\n\ndef main(argv):\n    if len(argv) < 2 or argv[1] not in COMMANDS:\n        return 2\n    return 0\n")},
        ]})
        .to_string()
    };
    let script = json!({"rules": [
        {"role": "developer", "contains": "test-failed", "reply": files("\"a_url_shortener_in_python\": \"shortens\"")},
        {"role": "developer", "reply": files("")},
    ]});
    let run =
        run_for("a URL shortener in Python", ProviderChoice::Scripted { script: Some(script.to_string()) }, 2, None)
            .await;
    let report = &run.report();
    assert_eq!(report["status"], "passed", "{report:#}");
    assert_eq!(report["repair_rounds"], 1, "{report:#}");
    assert!(steps(report).contains(&"developer (repair 1)"), "{report:#}");
    assert!(report["stop_reason"].as_str().unwrap().contains("3 of 3 tests passed"), "{report:#}");
    // The first round's review sent the failing test back.
    let review = run.tasks.iter().find(|t| t.name == "review").unwrap();
    let feedback = review.output.as_ref().unwrap().to_value();
    let failed = feedback["feedback"].as_array().unwrap().iter().find(|d| d["rule"] == "test-failed");
    let failed = failed.unwrap_or_else(|| panic!("no failing test in the feedback: {feedback:#}"));
    assert_eq!(failed["path"], "tests/test_acceptance.py", "{failed}");
    assert!(failed["line"].as_u64().unwrap() > 1, "{failed}");
    let message = failed["message"].as_str().unwrap();
    assert!(
        message
            .starts_with("tests/test_acceptance.py::AcceptanceTest::test_every_feature_has_a_command: AssertionError"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_findings_go_back_to_the_developer_until_fixed() {
    let script = json!({"rules": [
        // Second round: the prompt now carries the diagnostic, and the reply is fixed.
        {"role": "developer", "contains": "rust-syntax", "reply": files_json("fn main() {}\n")},
        {"role": "developer", "reply": files_json("fn main() {\n    let x = ;\n}\n")},
    ]});
    let run = run(ProviderChoice::Scripted { script: Some(script.to_string()) }, 2, None).await;
    let report = &run.report();
    assert_eq!(report["status"], "passed", "{report:#}");
    assert_eq!(report["repair_rounds"], 1);
    assert!(steps(report).contains(&"developer (repair 1)"), "{report:#}");
    assert_eq!(std::fs::read_to_string(run.out.path().join("src/main.rs")).unwrap(), "fn main() {}\n");
}

/// A pipeline of product manager, architect and a developer step fanned out to `shards`, with
/// `validators` after it; the developer repeats in repair rounds.
fn fanned_out(shards: u32, validators: serde_json::Value) -> serde_json::Value {
    json!({"steps": [
        {"name": "product-manager", "role": "product-manager"},
        {"name": "architect", "role": "architect", "after": ["product-manager"]},
        {"name": "developer", "role": "developer", "after": ["architect"], "fan-out": shards, "validators": validators},
    ], "repair": {"steps": ["developer"]}})
}

/// The report's entry for the step labelled `label`.
fn step<'a>(report: &'a serde_json::Value, label: &str) -> &'a serde_json::Value {
    let found = report["steps"].as_array().unwrap().iter().find(|s| s["step"] == label);
    found.unwrap_or_else(|| panic!("no step `{label}`: {report:#}"))
}

/// Issue 17 items 1 and 2: a developer step with `fan-out = 3` runs as three agents at once,
/// each writing whole modules of the file plan (the scripted double's plan: the manifest, the
/// `cli` module's source and the `docs` module's README); an error goes back only to the shard
/// that wrote the file, and the others keep their files without asking a model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanned_out_developer_writes_whole_modules_at_once_and_only_the_broken_shard_repairs() {
    let main_rs = |text: &str| json!({"files": [{"path": "src/main.rs", "content": text}]}).to_string();
    let script = json!({"rules": [
        {"role": "developer", "contains": "rust-syntax", "reply": main_rs("fn main() {}\n")},
        {"role": "developer", "contains": "Files to write: src/main.rs", "reply": main_rs("fn main() {\n    let x = ;\n}\n")},
    ]});
    let input = json!({"requirement": "A todo list CLI, with due dates and tags", "max_repair_rounds": 2,
        "pipeline": fanned_out(3, json!(["syntax"]))});
    let run = run_input(input, ProviderChoice::Scripted { script: Some(script.to_string()) }).await;
    let report = &run.report();
    assert_eq!((report["status"].as_str(), report["repair_rounds"].as_u64()), (Some("passed"), Some(1)), "{report:#}");
    let shards = ["developer-shard-1", "developer-shard-2", "developer-shard-3"];
    for (i, shard) in shards.iter().enumerate() {
        let task = run.tasks.iter().find(|t| t.name == *shard).unwrap();
        assert_eq!(task.depends_on, ["architect"], "the shards wait for the design only, not for each other");
        assert_eq!(step(report, shard)["summary"], format!("1 files, shard {} of 3", i + 1), "{report:#}");
    }
    let validate = run.tasks.iter().find(|t| t.name == "validate-syntax").unwrap();
    assert_eq!(validate.depends_on, shards, "the validator waits for every shard");
    // Only the shard that wrote the broken file asked a model again.
    let repaired = step(report, "developer-shard-2 (repair 1)");
    assert!(repaired["summary"].as_str().unwrap().contains("fixing 1 findings"), "{repaired}");
    assert!(repaired["tokens"]["prompt"].as_u64().unwrap() > 0, "{repaired}");
    for kept in ["developer-shard-1 (repair 1)", "developer-shard-3 (repair 1)"] {
        let kept = step(report, kept);
        assert!(kept["summary"].as_str().unwrap().contains("no finding is its to fix; its 1 files are kept"), "{kept}");
        assert_eq!(kept["tokens"]["prompt"], 0, "{kept}");
    }
    assert_eq!(std::fs::read_to_string(run.out.path().join("src/main.rs")).unwrap(), "fn main() {}\n");
    for file in ["Cargo.toml", "README.md"] {
        assert!(run.out.path().join(file).is_file(), "{file} missing from the capsule");
    }
    let design = std::fs::read_to_string(run.out.path().join("docs/DESIGN.json")).unwrap();
    assert!(design.contains("\"module\": \"cli\""), "{design}");
}

/// An error whose message names another shard's file reaches that shard too: an import that
/// `pyproject.toml` does not declare is the manifest's shard's to fix as well as the importer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeclared_import_reaches_the_shard_that_wrote_the_manifest() {
    let main_py = json!({"files": [{"path": "main.py", "content": "import requests\n\nprint(requests.__name__)\n"}]});
    let script =
        json!({"rules": [{"role": "developer", "contains": "Files to write: main.py", "reply": main_py.to_string()}]});
    let input = json!({"requirement": "A todo list CLI in Python", "max_repair_rounds": 1,
        "pipeline": fanned_out(2, json!(["deps"]))});
    let run = run_input(input, ProviderChoice::Scripted { script: Some(script.to_string()) }).await;
    let report = &run.report();
    assert_eq!(report["status"], "failed-validation", "the test double never declares it: {report:#}");
    let found = report["diagnostics"].as_array().unwrap().iter().find(|d| d["rule"] == "undeclared-import");
    assert_eq!(found.map(|d| &d["path"]), Some(&json!("main.py")), "{report:#}");
    assert_eq!(step(report, "developer-shard-1")["summary"], "2 files, shard 1 of 2", "the manifest and the README");
    for shard in ["developer-shard-1 (repair 1)", "developer-shard-2 (repair 1)"] {
        let s = step(report, shard);
        assert!(s["summary"].as_str().unwrap().contains("fixing 1 findings"), "{s}");
    }
}

/// Issue 14 item 22: a developer file at `./docs/PRD.json` is the same path as the PRD, and does
/// not replace it; the capsule and the report name each file once, in its one spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_developer_file_cannot_replace_the_prd_by_spelling_its_path_differently() {
    let reply = json!({"files": [
        {"path": "./docs/PRD.json", "content": "{\"forged\": true}"},
        {"path": "Cargo.toml", "content": "[package]\nname = \"x\"\nversion = \"0.1.0\"\n"},
        {"path": "./src/main.rs", "content": "fn main() {}\n"},
        {"path": "README.md", "content": "# x\n"},
    ]});
    let script = json!({"rules": [{"role": "developer", "reply": reply.to_string()}]});
    let run = run(ProviderChoice::Scripted { script: Some(script.to_string()) }, 1, None).await;
    let report = &run.report();
    assert_eq!(report["status"], "passed", "{report:#}");
    let prd = std::fs::read_to_string(run.out.path().join("docs/PRD.json")).unwrap();
    assert!(!prd.contains("forged"), "the PRD was replaced: {prd}");
    let paths: Vec<&str> = report["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(paths.iter().filter(|p| p.contains("PRD")).count(), 1, "{paths:?}");
    assert!(paths.contains(&"src/main.rs"), "{paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_rounds_are_bounded_and_the_report_says_why_it_stopped() {
    let script = json!({"rules": [{"role": "developer", "reply": files_json("fn main( {")}]});
    let run = run(ProviderChoice::Scripted { script: Some(script.to_string()) }, 2, None).await;
    let report = &run.report();
    assert_eq!(report["status"], "failed-validation", "{report:#}");
    assert_eq!(report["repair_rounds"], 2);
    assert!(report["stop_reason"].as_str().unwrap().contains("after 2 repair rounds"), "{report:#}");
    let errors: Vec<&serde_json::Value> =
        report["diagnostics"].as_array().unwrap().iter().filter(|d| d["severity"] == "error").collect();
    let error = errors.first().unwrap_or_else(|| panic!("no error diagnostic: {report:#}"));
    assert_eq!(
        (&error["rule"], &error["path"], &error["line"]),
        (&json!("rust-syntax"), &json!("src/main.rs"), &json!(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_never_answers_in_json_is_asked_a_bounded_number_of_times() {
    // The test server echoes the prompt: never a PRD.
    let server = TestServer::start().await;
    let choice =
        ProviderChoice::OpenAi { base_url: format!("{}/v1", server.url()), model: Some("ok".into()), api_key: None };
    let run = run(choice, 2, None).await;
    assert_eq!(run.job.status, JobStatus::Failed, "{:?}", run.job);
    let error = run.job.error.clone().unwrap_or_default();
    assert!(error.contains("product-manager"), "{error}");
    assert!(error.contains("no usable JSON after 3 attempts"), "{error}");
    // Spent re-asks fail the step once: it is not an outage, so the scheduler does not retry it
    // (each retry would ask three more times) nor count it against the plugin's breaker.
    let pm = run.tasks.iter().find(|t| t.name == "product-manager").unwrap();
    assert_eq!(pm.attempts, 1, "{pm:?}");
    let chats = server.requests().iter().filter(|r| r.path == "/v1/chat/completions").count();
    assert_eq!(chats, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stops_when_its_token_budget_is_spent() {
    let run = run(ProviderChoice::Scripted { script: None }, 2, Some(10)).await;
    assert_eq!(run.job.status, JobStatus::Failed, "{:?}", run.job);
    let error = run.job.error.clone().unwrap_or_default();
    assert!(error.contains("token budget of 10"), "{error}");
}

/// Stands for a host that dies during one step: it runs every other task, and on that one it
/// says so and never returns.
struct DiesAt {
    inner: Arc<PluginExecutor>,
    task: &'static str,
    reached: Arc<tokio::sync::Notify>,
}

impl Execute for DiesAt {
    fn execute<'a>(
        &'a self,
        task: &'a qlayer_db::Task,
        ctx: TaskContext,
    ) -> futures::future::BoxFuture<'a, Result<qlayer_db::TaskResult, TaskError>> {
        if task.name == self.task {
            self.reached.notify_one();
            return Box::pin(std::future::pending());
        }
        Execute::execute(&*self.inner, task, ctx)
    }
}

/// A host that dies mid-run (during validation): another node takes the step over when its lease
/// runs out and the run resumes there; the roles, already done, do not run again, and the report lists each step once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_factory_run_resumes_from_its_last_finished_step_after_its_host_dies() {
    let dir = tempfile::tempdir().unwrap();
    let db = qlayer_db::Db::open(&format!("sqlite://{}", dir.path().join("q.db").display())).await.unwrap();
    let acme = db.create_tenant("acme").await.unwrap();
    let market = qlayer_marketplace::Marketplace::open(dir.path(), Default::default(), db.clone()).await.unwrap();
    let executor = Arc::new(PluginExecutor::new(db.clone(), Arc::new(qlayer_tests::runtime()), Arc::new(market)));
    let config = |node: &str| SchedulerConfig { node_id: node.into(), lease_ms: 1_000, ..Default::default() };
    let reached = Arc::new(tokio::sync::Notify::new());
    let dying = DiesAt { inner: executor.clone(), task: "validate-syntax", reached: reached.clone() };
    let a = Scheduler::new(db.clone(), config("node-a"), Arc::new(dying));
    a.start().await.unwrap();
    let input = json!({"requirement": "a todo list CLI"});
    let (job, _) = a
        .submit(qlayer_db::NewJob {
            tenant_id: &acme.id,
            kind: qlayer_db::JobKind::Run,
            input: &input,
            priority: 0,
            idempotency_key: None,
            deadline_ms: None,
            tasks: plan(qlayer_db::JobKind::Run, &input, 3).unwrap(),
        })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(120), reached.notified()).await.expect("the run reaches validation");
    a.crash().await;

    let b = Scheduler::new(db.clone(), config("node-b"), executor);
    b.start().await.unwrap();
    let mut finished = None;
    for _ in 0..600 {
        let now = db.job(&acme.id, &job.id).await.unwrap().unwrap();
        if now.status.is_terminal() {
            finished = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let finished = finished.expect("the run finishes on the other node");
    let output = finished.output.clone().unwrap().to_value();
    assert_eq!((finished.status, output["status"].as_str()), (qlayer_db::JobStatus::Succeeded, Some("passed")));
    let tasks = db.job_tasks(&acme.id, &job.id).await.unwrap();
    let runs: Vec<(&str, i32, bool)> = tasks.iter().map(|t| (t.name.as_str(), t.attempts, t.resumed)).collect();
    assert_eq!(
        runs[..7],
        [
            ("product-manager", 1, false),
            ("architect", 1, false),
            ("developer", 1, false),
            ("devops", 1, false),
            ("qa-engineer", 1, false),
            ("reviewer", 1, false),
            ("validate-syntax", 2, true),
        ],
        "finished steps are not run again"
    );
    // The other validators ran beside `validate-syntax`: each either finished before the host
    // died or was leased by it and resumed on the other node.
    for (name, attempts, resumed) in &runs[7..11] {
        assert!(
            name.starts_with("validate-") && (*attempts, *resumed) == (1, false) || (*attempts, *resumed) == (2, true),
            "{runs:?}"
        );
    }
    assert_eq!(runs[11], ("review", 1, false), "{runs:?}");
    assert_eq!(steps(&output), EVERY_ROLE);
    assert!(db.artifact(&acme.id, &job.id).await.unwrap().is_some(), "the capsule is stored with the job");
    b.shutdown(Duration::from_secs(1)).await;
}
