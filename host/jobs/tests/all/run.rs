//! The factory pipeline through the library: a whole run on the scripted provider, the bounded
//! repair loop, bounded JSON retries with a model that never answers in JSON, and the budget.

use qlayer_host::embedded::{self, ProviderChoice};
use qlayer_host::factory::{self, RunRequest};
use qlayer_tests::{TestServer, runtime};

fn request(requirement: &str, rounds: u32) -> RunRequest {
    RunRequest {
        requirement: requirement.into(),
        options_json: "{}".into(),
        max_repair_rounds: rounds,
        tenant: "t".into(),
    }
}

async fn run(choice: ProviderChoice, rounds: u32, budget: Option<u64>) -> (factory::RunReport, tempfile::TempDir) {
    let rt = runtime();
    let pipeline = embedded::pipeline(&rt, &choice, budget, None).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    factory::prepare("A todo list CLI, with due dates and tags", out.path(), false).unwrap();
    let report =
        factory::run(&pipeline, &request("A todo list CLI, with due dates and tags", rounds), out.path(), &|_| {})
            .await
            .unwrap();
    (report, out)
}

#[tokio::test]
async fn a_run_on_the_scripted_provider_writes_validated_files_and_a_report() {
    let (report, out) = run(ProviderChoice::Scripted { script: None }, 2, None).await;
    assert_eq!(report.status, "passed", "{report:#?}");
    let steps: Vec<&str> = report.steps.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(steps, ["product-manager", "developer", "validate: syntax"]);
    assert!(report.steps.iter().all(|s| s.digest.starts_with("sha256:") && s.outcome == "ok"));
    assert!(report.steps[0].tokens.total() > 0);
    for file in ["docs/PRD.json", "Cargo.toml", "src/main.rs", "README.md", factory::REPORT_FILE] {
        assert!(out.path().join(file).is_file(), "{file} missing");
    }
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join(factory::REPORT_FILE)).unwrap()).unwrap();
    assert_eq!(written["status"], "passed");
    assert_eq!(written["files"].as_array().unwrap().len(), report.files.len());
}

fn files_json(main_rs: &str) -> String {
    serde_json::json!({"files": [
        {"path": "Cargo.toml", "content": "[package]\nname = \"x\"\nversion = \"0.1.0\"\n"},
        {"path": "src/main.rs", "content": main_rs},
    ]})
    .to_string()
}

#[tokio::test]
async fn validator_findings_go_back_to_the_developer_until_fixed() {
    let script = serde_json::json!({"rules": [
        // Second round: the prompt now carries the diagnostic, and the reply is fixed.
        {"role": "developer", "contains": "rust-syntax", "reply": files_json("fn main() {}\n")},
        {"role": "developer", "reply": files_json("fn main() {\n    let x = ;\n}\n")},
    ]});
    let (report, out) = run(ProviderChoice::Scripted { script: Some(script.to_string()) }, 2, None).await;
    assert_eq!(report.status, "passed", "{report:#?}");
    assert_eq!(report.repair_rounds, 1);
    assert!(report.steps.iter().any(|s| s.step == "developer (repair 1)"));
    assert_eq!(std::fs::read_to_string(out.path().join("src/main.rs")).unwrap(), "fn main() {}\n");
}

#[tokio::test]
async fn repair_rounds_are_bounded_and_the_report_says_why_it_stopped() {
    let script = serde_json::json!({"rules": [{"role": "developer", "reply": files_json("fn main( {")}]});
    let (report, _out) = run(ProviderChoice::Scripted { script: Some(script.to_string()) }, 2, None).await;
    assert_eq!(report.status, "failed-validation");
    assert_eq!(report.repair_rounds, 2);
    assert!(report.stop_reason.contains("after 2 repair rounds"), "{}", report.stop_reason);
    let error = report.diagnostics.iter().find(|d| d.severity == "error").unwrap();
    assert_eq!((error.rule.as_str(), error.path.as_deref(), error.line), ("rust-syntax", Some("src/main.rs"), Some(1)));
}

#[tokio::test]
async fn a_model_that_never_answers_in_json_is_asked_a_bounded_number_of_times() {
    // The test server echoes the prompt: never a PRD.
    let server = TestServer::start().await;
    let choice =
        ProviderChoice::OpenAi { base_url: format!("{}/v1", server.url()), model: Some("ok".into()), api_key: None };
    let (report, _out) = run(choice, 2, None).await;
    assert_eq!(report.status, "failed");
    assert!(report.stop_reason.contains("product-manager failed"), "{}", report.stop_reason);
    assert!(report.stop_reason.contains("after 3 attempts"), "{}", report.stop_reason);
    let chats = server.requests().iter().filter(|r| r.path == "/v1/chat/completions").count();
    assert_eq!(chats, 3);
}

#[tokio::test]
async fn a_run_stops_when_its_token_budget_is_spent() {
    let (report, _out) = run(ProviderChoice::Scripted { script: None }, 2, Some(10)).await;
    assert_eq!(report.status, "failed");
    assert!(report.stop_reason.contains("token budget of 10"), "{}", report.stop_reason);
}
