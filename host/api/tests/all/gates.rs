//! Approval gates over the REST API: a gated step pauses its run (status `waiting`, a `waiting`
//! event) at no cost until a person decides; a rejection's comment reaches the step in the next
//! repair round while the steps after the gate skip the round; the wait survives a restart; a
//! viewer's decision, a second decision and a rejection without a comment are refused; a run
//! whose deadline passes at a gate ends. The
//! model is the `scripted` provider (a test double) answering from a script.

use crate::api::{Svc, service};
use qlayer_api::serve::ServeConfig;
use qlayer_db::Backend;
use qlayer_tests::{ADMIN, files_json};
use serde_json::{Value, json};
use std::time::Duration;

/// The run's row once its status is `status` (or it ended).
async fn until(svc: &Svc, key: &str, run: &str, status: &str) -> Value {
    for _ in 0..1200 {
        let r = svc.get(&format!("/v1/runs/{run}"), key).await;
        assert_eq!(r.status, 200, "{r:?}");
        let now = r.body["status"].as_str().unwrap_or_default().to_string();
        if now == status || matches!(now.as_str(), "succeeded" | "failed" | "cancelled") {
            return r.body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {run} never became {status}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_pauses_the_run_until_a_person_decides_and_a_rejection_reaches_the_step() {
    let mut svc = service(Backend::Sqlite, false, |_| {}).await;
    let (acme_id, acme) = svc.tenant("acme").await;
    let (_, viewer) = svc.key(&acme, "viewer").await;
    let (_, other) = svc.tenant("other").await;
    // The developer writes tabs once the reviewer's comment is in its prompt.
    let script = json!({"rules": [
        {"role": "developer", "contains": "indent with tabs", "reply": files_json("fn main() {\n\tprintln!(\"tabs\");\n}\n")},
    ]});
    let pipeline = json!({
        "steps": [
            {"name": "pm", "role": "product-manager"},
            {"name": "dev", "role": "developer", "after": ["pm"], "validators": ["syntax"], "gate": true},
            {"name": "qa", "role": "qa-engineer", "after": ["dev"]},
        ],
        "repair": {"rounds": 1, "steps": ["dev", "qa"]},
    });
    let r = svc.post("/v1/runs", &acme, json!({"requirement": "a CLI", "script": script, "pipeline": pipeline})).await;
    assert_eq!(r.status, 201, "{r:?}");
    let run = r.body["id"].as_str().unwrap().to_string();
    let waiting = until(&svc, &acme, &run, "waiting").await;
    assert_eq!(waiting["status"], "waiting", "{waiting}");
    assert!(waiting["waiting_at"].as_i64().is_some(), "{waiting}");
    let tasks = svc.get(&format!("/v1/jobs/{run}/tasks"), &acme).await.body;
    let status = |tasks: &Value, name: &str| {
        tasks["items"].as_array().unwrap().iter().find(|t| t["name"] == name).map(|t| t["status"].clone())
    };
    assert_eq!(status(&tasks, "approve-dev"), Some(json!("waiting")), "held: no lease, no slot");
    assert_eq!(status(&tasks, "qa"), Some(json!("waiting")), "the step after the gate has not run");
    let events = svc.db().job_events(&acme_id, &run, 0).await.unwrap();
    let held = events.iter().find(|e| e.kind == "waiting").expect("a waiting event");
    assert_eq!(held.data["gate"], "approve-dev");
    // The tenant's jobs by status: the run waits (stored as running, with `waiting_at`).
    let ids = |page: &Value| -> Vec<String> {
        page["items"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(ids(&svc.get("/v1/jobs?status=waiting", &acme).await.body), std::slice::from_ref(&run));
    assert_eq!(ids(&svc.get("/v1/jobs?status=waiting&kind=call", &acme).await.body), Vec::<String>::new());
    assert_eq!(ids(&svc.get("/v1/jobs?status=running", &acme).await.body), Vec::<String>::new());
    assert_eq!(ids(&svc.get("/v1/jobs?status=waiting", &other).await.body), Vec::<String>::new());
    let r = svc.get("/v1/jobs?status=paused", &acme).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.to_string().contains("status"), "the error names the parameter: {r:?}");

    // Refused: a viewer, another tenant (as if the run did not exist), a rejection without a
    // comment, an unknown field; none of them changes anything.
    let approve = format!("/v1/runs/{run}/approve");
    let reject = format!("/v1/runs/{run}/reject");
    let r = svc.post(&approve, &viewer, json!({})).await;
    assert_eq!((r.status, r.code()), (403, "forbidden"), "{r:?}");
    let r = svc.post(&approve, &other, json!({})).await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = svc.post(&reject, &acme, json!({})).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.text.contains("missing field `comment`"), "{r:?}");
    let r = svc.post(&reject, &acme, json!({"comment": "  "})).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.text.contains("a rejection needs a `comment`"), "{r:?}");
    let r = svc.post(&reject, &acme, json!({"comment": "x", "colour": 1})).await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = svc.post("/v1/runs/job_missing/approve", &acme, json!({})).await;
    assert_eq!(r.status, 404, "{r:?}");

    // The wait survives a restart: the run is still waiting, and nothing ran meanwhile.
    let dir = svc._dir.path().to_path_buf();
    svc.running.take().unwrap().stop().await.unwrap();
    let mut config = ServeConfig::default();
    config.server.rest_addr = "127.0.0.1:0".parse().unwrap();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.auth.admin_key = Some(ADMIN.into());
    config.limits.requests_per_second = 0.0;
    let restarted = qlayer_api::serve::start(config, dir).await.unwrap();
    svc.base = format!("http://{}", restarted.rest_addr);
    svc.running = Some(restarted);
    assert_eq!(svc.get(&format!("/v1/runs/{run}"), &acme).await.body["status"], "waiting");

    // Rejected with a comment: the step after the gate skips this round, and the developer gets
    // the comment in the next one.
    let r = svc.post(&reject, &acme, json!({"comment": "indent with tabs"})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let again = svc.post(&reject, &acme, json!({"comment": "again"})).await;
    assert!(matches!(again.status, 409 | 200), "{again:?}");
    assert_eq!(again.status, 409, "one decision per gate: {again:?}");
    let waiting = until(&svc, &acme, &run, "waiting").await;
    assert_eq!(waiting["status"], "waiting", "the repaired step waits at its gate again: {waiting}");
    let tasks = svc.get(&format!("/v1/jobs/{run}/tasks"), &acme).await.body;
    let output = |name: &str| {
        tasks["items"].as_array().unwrap().iter().find(|t| t["name"] == name).map(|t| t["output"].clone()).unwrap()
    };
    assert!(output("qa")["skipped"].as_str().unwrap().contains("rejected"), "{tasks}");
    assert_eq!(output("approve-dev")["decision"]["approved"], false);
    assert_eq!(output("approve-dev")["decision"]["comment"], "indent with tabs");
    assert!(output("dev-repair-1")["step"]["summary"].as_str().unwrap().contains("fixing 1 findings"), "{tasks}");
    let r = svc.post(&approve, &acme, json!({"comment": "good"})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = svc.post(&approve, &acme, json!({})).await;
    assert_eq!((r.status, r.code()), (409, "conflict"), "approved twice: {r:?}");

    let done = svc.wait(&acme, &run).await;
    let report = &done["output"];
    assert_eq!((done["status"].as_str(), report["status"].as_str()), (Some("succeeded"), Some("passed")), "{done}");
    assert_eq!(report["repair_rounds"], 1);
    let steps: Vec<&str> = report["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["pm", "dev", "validate: syntax", "dev (repair 1)", "validate: syntax", "qa (repair 1)"]);
    let files = svc.capsule(&acme, &run).await;
    assert!(files[&format!("{run}/src/main.rs")].contains("\tprintln!"), "the comment reached the developer");
    let kinds: Vec<String> =
        svc.db().job_events(&acme_id, &run, 0).await.unwrap().into_iter().map(|e| e.kind).collect();
    for kind in ["waiting", "rejected", "approved"] {
        assert!(kinds.contains(&kind.to_string()), "{kind}: {kinds:?}");
    }
    let audit = svc.db().audit_records(Some(&acme_id), 0, 1000).await.unwrap();
    let decided: Vec<(&str, &str)> = audit
        .iter()
        .filter(|r| r.target == run && r.action.starts_with("run."))
        .map(|r| (r.action.as_str(), r.outcome.as_str()))
        .collect();
    assert!(decided.contains(&("run.reject", "ok")) && decided.contains(&("run.approve", "ok")), "{decided:?}");

    // A run whose deadline passes while it waits at a gate ends, naming the gate (a waiting run
    // holds no lease, so no lease check would ever see its deadline); a decision then finds it
    // over.
    let gated_pm = json!({
        "steps": [
            {"name": "pm", "role": "product-manager", "gate": true},
            {"name": "dev", "role": "developer", "after": ["pm"]},
        ],
        "repair": {"rounds": 1, "steps": ["pm", "dev"]},
    });
    let body = json!({"requirement": "a CLI", "pipeline": gated_pm, "deadline_ms": 10_000});
    let r = svc.post("/v1/runs", &acme, body).await;
    assert_eq!(r.status, 201, "{r:?}");
    let late = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(until(&svc, &acme, &late, "waiting").await["status"], "waiting");
    let over = svc.wait(&acme, &late).await;
    assert_eq!(over["status"], "failed", "{over}");
    assert!(over["error"].as_str().unwrap().contains("deadline passed while it waited at `approve-pm`"), "{over}");
    let r = svc.post(&format!("/v1/runs/{late}/approve"), &acme, json!({})).await;
    assert_eq!(r.status, 409, "{r:?}");
    svc.stop().await;
}

/// Over gRPC, on PostgreSQL: the `waiting` event on the job's stream, a decision through
/// `RejectRun`; a rejection with no repair round left ends the run `failed-validation`, naming
/// the gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_a_rejection_with_no_round_left_ends_the_run_naming_the_gate() {
    use qlayer_api::grpc::proto::{self, jobs_client::JobsClient, runs_client::RunsClient};
    let svc = service(Backend::Postgres, false, |_| {}).await;
    let (_, acme) = svc.tenant("acme").await;
    let pipeline = json!({
        "steps": [{"name": "pm", "role": "product-manager", "gate": true}],
        "repair": {"rounds": 0, "steps": ["pm"]},
    });
    let r = svc.post("/v1/runs", &acme, json!({"requirement": "a CLI", "pipeline": pipeline})).await;
    let run = r.body["id"].as_str().unwrap().to_string();
    let endpoint = format!("http://{}", svc.running.as_ref().unwrap().grpc_addr);
    let channel = tonic::transport::Endpoint::from_shared(endpoint).unwrap().connect().await.unwrap();
    let key = acme.clone();
    let auth = move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
        Ok(req)
    };
    let mut jobs = JobsClient::with_interceptor(channel.clone(), auth.clone());
    let mut stream =
        jobs.watch_job(proto::WatchJobRequest { id: run.clone(), after_seq: 0 }).await.unwrap().into_inner();
    let waiting = loop {
        let event = stream.message().await.unwrap().expect("the stream stays open while the run waits");
        if event.kind == "waiting" {
            break event;
        }
    };
    assert!(waiting.data_json.contains("approve-pm"), "{waiting:?}");
    let mut runs = RunsClient::with_interceptor(channel, auth);
    let e = runs.reject_run(proto::GateRequest { id: run.clone(), comment: None }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let job = runs
        .reject_run(proto::GateRequest { id: run.clone(), comment: Some("not what we asked".into()) })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(job.status, "waiting", "the decision was taken");
    let e = runs.approve_run(proto::GateRequest { id: run.clone(), comment: None }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let done = svc.wait(&acme, &run).await;
    let report = &done["output"];
    assert_eq!(report["status"], "failed-validation", "{done}");
    let rejected = report["diagnostics"].as_array().unwrap().iter().find(|d| d["rule"] == "rejected").unwrap();
    assert_eq!(rejected["validator"], "approve-pm");
    assert!(rejected["message"].as_str().unwrap().contains("not what we asked"), "{rejected}");
    svc.stop().await;
}
