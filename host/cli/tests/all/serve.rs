//! `qlayer serve` as a process, as an operator runs it: its logs are JSON lines that never hold
//! a key, its traces reach an OTLP collector, a node killed with SIGKILL mid-run finishes every
//! job exactly once after restart (SQLite and PostgreSQL), and three nodes on NATS JetStream
//! survive a killed node and dead-letter a poison task.

use qlayer_db::Backend;
use qlayer_tests::{ADMIN, TestRegistry, fresh_postgres, hostile};
use serde_json::{Value, json};
use std::time::Duration;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn call(input: &str) -> Value {
    json!({"kind": "call", "input": {"plugin": "hostile", "input": input}})
}

/// Pushes the hostile guest (plugin time limit `timeout_ms`) to `registry`; returns its reference.
async fn push_hostile(registry: &TestRegistry, timeout_ms: u64) -> String {
    let reference = format!("{}/test/hostile:1.0.0", registry.addr);
    let pusher = tempfile::tempdir().unwrap();
    let market = qlayer_marketplace::Marketplace::open_local(
        pusher.path(),
        qlayer_marketplace::MarketplaceConfig {
            insecure_registries: vec![registry.addr.clone()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    market.push(&hostile(64, timeout_ms), &reference, None).await.unwrap();
    reference
}

/// `qlayer serve` as a process on free ports with a temp data dir and the test admin key, once it
/// answers: the child, its base URL, a client, and the data dir (removed when dropped).
async fn serve_process(
    global: &[&str],
    extra: &[&str],
    stderr: std::process::Stdio,
) -> (std::process::Child, String, reqwest::Client, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let (child, base, http) = serve_process_in(data.path(), global, extra, stderr).await;
    (child, base, http, data)
}

/// `qlayer serve` as a process on free ports with `data` as its data dir, once it answers.
async fn serve_process_in(
    data: &std::path::Path,
    global: &[&str],
    extra: &[&str],
    stderr: std::process::Stdio,
) -> (std::process::Child, String, reqwest::Client) {
    let (rest, grpc) = (qlayer_tests::free_port(), qlayer_tests::free_port());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_qlayer"))
        .args(global)
        .args(["serve", "--rest-addr", &format!("127.0.0.1:{rest}"), "--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(extra)
        .arg("--data-dir")
        .arg(data)
        .env("QLAYER_ADMIN_KEY", ADMIN)
        .env_remove("QLAYER_DATABASE_URL")
        .env_remove("QLAYER_CONFIG")
        .env_remove("QLAYER_LOG_FORMAT")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{rest}");
    qlayer_registry::install_tls_provider();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for _ in 0..400 {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, base, http)
}

/// `qlayer serve` as a process, logging at debug (trace for the HTTP layers): every line is JSON, request
/// lines carry the request id and the tenant, and no API key (valid, unknown or the operator's)
/// appears anywhere in the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_with_request_ids_and_never_hold_keys() {
    let log = "debug,hyper=trace,h2=trace,axum=trace,tonic=trace,tower=trace";
    let (child, base, http, _data) = serve_process(&["--log", log], &[], std::process::Stdio::piped()).await;
    let created: Value = http
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .header("x-request-id", "trace-me-42")
        .body(r#"{"name": "acme"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let acme = created["api_key"].as_str().unwrap().to_string();
    let r = http.get(format!("{base}/v1/jobs")).bearer_auth(&acme).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let unknown = format!("ql_{}", "d".repeat(64));
    assert_eq!(http.get(format!("{base}/v1/jobs")).bearer_auth(&unknown).send().await.unwrap().status(), 401);
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for secret in [ADMIN, acme.as_str(), unknown.as_str(), &ADMIN[3..], &acme[3..]] {
        assert!(!stderr.contains(secret), "a key is in the log");
    }
    let lines: Vec<Value> =
        stderr.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let requests: Vec<&Value> = lines.iter().filter(|l| l["fields"]["message"] == "request").collect();
    let mine = requests.iter().find(|l| l["span"]["request_id"] == request_id.as_str()).expect("the request's line");
    assert_eq!(mine["span"]["tenant"], "acme", "{mine}");
    assert_eq!(mine["span"]["route"], "/v1/jobs");
    assert_eq!(mine["fields"]["status"], 200);
    assert!(requests.iter().any(|l| l["span"]["request_id"] == "trace-me-42"), "the caller's request id is kept");
}

/// With `--otlp-endpoint`, the request spans (id, route, tenant) reach an OpenTelemetry collector
/// over OTLP/gRPC; a stand-in collector (tonic, the OTLP trace service) receives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_an_otlp_collector_when_one_is_configured() {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    type Spans = std::sync::Arc<std::sync::Mutex<Vec<(String, std::collections::HashMap<String, String>)>>>;
    struct Collector(Spans);
    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut seen = self.0.lock().unwrap();
            for span in
                request.into_inner().resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans)
            {
                let attributes = span
                    .attributes
                    .iter()
                    .map(|kv| {
                        let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                            Some(Any::StringValue(s)) => s.clone(),
                            other => format!("{other:?}"),
                        };
                        (kv.key.clone(), value)
                    })
                    .collect();
                seen.push((span.name, attributes));
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
        }
    }
    let spans = Spans::default();
    let collector_port = qlayer_tests::free_port();
    let collector = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(spans.clone())))
            .serve(format!("127.0.0.1:{collector_port}").parse().unwrap()),
    );

    let otlp = format!("http://127.0.0.1:{collector_port}");
    let (child, base, http, _data) = serve_process(&[], &["--otlp-endpoint", &otlp], std::process::Stdio::null()).await;
    let r = http
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(r#"{"name": "acme"}"#)
        .send()
        .await
        .unwrap();
    let acme = r.json::<Value>().await.unwrap()["api_key"].as_str().unwrap().to_string();
    let r = http.get(format!("{base}/v1/jobs")).bearer_auth(&acme).send().await.unwrap();
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    // SIGTERM flushes the batch on the way out.
    assert!(std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let seen = spans.lock().unwrap().clone();
    let mine = seen
        .iter()
        .find(|(name, attrs)| name == "request" && attrs.get("request_id") == Some(&request_id))
        .unwrap_or_else(|| panic!("the request's span was exported: {seen:?}"));
    assert_eq!(mine.1.get("tenant").map(String::as_str), Some("acme"), "{mine:?}");
    assert_eq!(mine.1.get("route").map(String::as_str), Some("/v1/jobs"));
    assert!(seen.iter().all(|(_, attrs)| attrs.values().all(|v| !v.contains(&acme[3..]) && !v.contains(&ADMIN[3..]))));
    collector.abort();
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::Postgres).await })*
        }
    };
}
on_both!(sigkill_mid_run_then_restart_completes_every_job_once);

/// `qlayer serve` as a process runs 60 jobs four at a time; it is killed with SIGKILL while
/// some run (the last four take 2 s each, so some always do), then started again on the same data dir and database. Every job completes, each
/// with exactly one terminal event, and the tasks that were running at the kill say they resumed.
async fn sigkill_mid_run_then_restart_completes_every_job_once(backend: Backend) {
    let registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("marketplace.toml"), format!("insecure-registries = [\"{}\"]\n", registry.addr))
        .unwrap();
    std::fs::write(data.path().join("qlayer.toml"), "[jobs]\nconcurrency = 4\nlease-ms = 30000\n").unwrap();
    let (database, _pg) = match backend {
        Backend::Sqlite => (None, None),
        Backend::Postgres => {
            let (url, pg) = fresh_postgres().await;
            (Some(url), Some(pg))
        }
    };
    let config = data.path().join("qlayer.toml");
    let mut extra = vec!["--config", config.to_str().unwrap()];
    if let Some(url) = &database {
        extra.extend(["--database", url.as_str()]);
    }
    let (mut child, base, http) = serve_process_in(data.path(), &[], &extra, std::process::Stdio::null()).await;
    let post = |base: String, key: String, path: &'static str, body: Value| {
        let http = http.clone();
        async move {
            let r = http.post(format!("{base}{path}")).bearer_auth(key).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, created) = post(base.clone(), ADMIN.into(), "/v1/tenants", json!({"name": "acme"})).await;
    assert_eq!(status, 201, "{created}");
    let acme = created["api_key"].as_str().unwrap().to_string();
    let tenant = created["tenant"]["id"].as_str().unwrap().to_string();
    let reference = push_hostile(&registry, 10_000).await;
    let (status, body) = post(base.clone(), acme.clone(), "/v1/plugins", json!({"reference": reference})).await;
    assert_eq!(status, 201, "{body}");
    let mut ids = Vec::new();
    // The last four jobs are long, so the kill comes while they run however slowly the 60
    // submissions go (on a loaded machine the short jobs finished as fast as they were posted).
    for n in 0..60 {
        let ms = if n >= 56 { 2000 } else { 150 };
        let (status, job) =
            post(base.clone(), acme.clone(), "/v1/jobs", call(&format!("sleep-ms {ms} job {n}")).clone()).await;
        assert_eq!(status, 201, "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    // Kill it once some have finished and others run.
    let db = qlayer_db::Db::open(
        &database.clone().unwrap_or_else(|| format!("sqlite://{}", data.path().join("qlayer.db").display())),
    )
    .await
    .unwrap();
    for _ in 0..600 {
        let succeeded = db
            .jobs(&tenant, None, None, None, 100)
            .await
            .unwrap()
            .iter()
            .filter(|j| j.status.as_str() == "succeeded")
            .count();
        if succeeded >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let running_at_kill: Vec<String> = db
        .jobs(&tenant, None, None, None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|j| j.status.as_str() == "running")
        .map(|j| j.id)
        .collect();
    let finished_at_kill =
        db.jobs(&tenant, None, None, None, 100).await.unwrap().iter().filter(|j| j.status.is_terminal()).count();
    assert!(finished_at_kill < 60, "the kill came mid-run");
    assert!(!running_at_kill.is_empty(), "some jobs were running at the kill");

    let (mut child, _base, _http) = serve_process_in(data.path(), &[], &extra, std::process::Stdio::null()).await;
    for _ in 0..3000 {
        let jobs = db.jobs(&tenant, None, None, None, 100).await.unwrap();
        if jobs.len() == 60 && jobs.iter().all(|j| j.status.is_terminal()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in &ids {
        let job = db.job(&tenant, id).await.unwrap().unwrap();
        assert_eq!(job.status.as_str(), "succeeded", "{job:?}");
        let evs = db.job_events(&tenant, id, 0).await.unwrap();
        let terminal = evs.iter().filter(|e| matches!(e.kind.as_str(), "succeeded" | "failed" | "cancelled")).count();
        assert_eq!(terminal, 1, "completed exactly once: {evs:?}");
        assert!(
            job.output
                .unwrap()
                .read::<String>()
                .unwrap()
                .ends_with(&format!("job {}", ids.iter().position(|i| i == id).unwrap()))
        );
    }
    for id in &running_at_kill {
        let evs = db.job_events(&tenant, id, 0).await.unwrap();
        assert!(evs.iter().any(|e| e.kind == "started" && e.data["resumed"] == true), "{id} resumed: {evs:?}");
    }
    eprintln!(
        "sigkill ({backend:?}): {finished_at_kill} finished before the kill, {} running at it; all 60 completed once",
        running_at_kill.len()
    );
    child.kill().unwrap();
    child.wait().unwrap();
    db.close().await;
}

/// Scale mode: three `qlayer serve` nodes on loopback share PostgreSQL and a NATS JetStream
/// (a `nats-server -js` this test starts on a free port). Jobs submitted to one node run on all
/// three. The node running a long task is killed with SIGKILL: JetStream redelivers the task to
/// another node once the lease runs out, and the job completes exactly once. A task that keeps
/// failing lands on the dead-letter subject with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_nats_survive_a_killed_node_and_dead_letter_a_poison_task() {
    let nats = qlayer_tests::TestNats::start();
    let registry = TestRegistry::start();
    let (pg, _pg) = fresh_postgres().await;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let data = tempfile::tempdir().unwrap();
        std::fs::write(
            data.path().join("marketplace.toml"),
            format!("insecure-registries = [\"{}\"]\n", registry.addr),
        )
        .unwrap();
        let config = data.path().join("qlayer.toml");
        std::fs::write(
            &config,
            format!("[jobs]\nconcurrency = 2\nlease-ms = 2000\nretry-base-ms = 50\nqueue = \"{}\"\n", nats.url),
        )
        .unwrap();
        let extra = ["--config", config.to_str().unwrap(), "--database", pg.as_str()];
        let (child, base, http) = serve_process_in(data.path(), &[], &extra, std::process::Stdio::null()).await;
        let node_id = std::fs::read_to_string(data.path().join("node-id")).unwrap();
        nodes.push((Some(child), base, http, data, node_id));
    }
    let http = nodes[0].2.clone();
    let post = |base: String, key: String, path: String, body: Value| {
        let http = http.clone();
        async move {
            let r = http.post(format!("{base}{path}")).bearer_auth(key).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, created) = post(nodes[0].1.clone(), ADMIN.into(), "/v1/tenants".into(), json!({"name": "acme"})).await;
    assert_eq!(status, 201, "{created}");
    let acme = created["api_key"].as_str().unwrap().to_string();
    let tenant = created["tenant"]["id"].as_str().unwrap().to_string();
    // Installed once, through one node: the record is in the shared database, and each node pulls
    // the binary from the registry by its pinned digest the first time it runs it.
    let reference = push_hostile(&registry, 20_000).await;
    let (status, body) =
        post(nodes[0].1.clone(), acme.clone(), "/v1/plugins".into(), json!({"reference": reference})).await;
    assert_eq!(status, 201, "{body}");
    for node in &nodes[1..] {
        let listed: Value =
            http.get(format!("{}/v1/plugins", node.1)).bearer_auth(&acme).send().await.unwrap().json().await.unwrap();
        assert_eq!(listed["items"][0]["name"], "hostile", "{listed}");
        let (status, body) =
            post(node.1.clone(), acme.clone(), "/v1/plugins".into(), json!({"reference": reference})).await;
        assert_eq!((status, body["error"]["code"].as_str()), (409, Some("conflict")), "{body}");
    }
    let db = qlayer_db::Db::open(&pg).await.unwrap();
    let wait = |id: String| {
        let (db, tenant) = (db.clone(), tenant.clone());
        async move {
            for _ in 0..3000 {
                let job = db.job(&tenant, &id).await.unwrap().unwrap();
                if job.status.is_terminal() {
                    return job;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("job {id} did not finish");
        }
    };

    // Work submitted to one node spreads over all three.
    let mut quick = Vec::new();
    for n in 0..24 {
        let (status, job) =
            post(nodes[0].1.clone(), acme.clone(), "/v1/jobs".into(), call(&format!("sleep-ms 100 q{n}"))).await;
        assert_eq!(status, 201, "{job}");
        quick.push(job["id"].as_str().unwrap().to_string());
    }
    let mut ran_on = std::collections::HashSet::new();
    for id in &quick {
        let job = wait(id.clone()).await;
        assert_eq!(job.status.as_str(), "succeeded", "{job:?}");
        for e in db.job_events(&tenant, id, 0).await.unwrap() {
            if e.kind == "started" {
                ran_on.insert(e.data["node"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(ran_on.len() >= 2, "the work spread over the nodes: {ran_on:?}");

    // A long task; kill the node running it.
    let (_, job) = post(nodes[1].1.clone(), acme.clone(), "/v1/jobs".into(), call("sleep-ms 3000 long")).await;
    let long = job["id"].as_str().unwrap().to_string();
    let first_node = loop {
        let events = db.job_events(&tenant, &long, 0).await.unwrap();
        if let Some(e) = events.iter().find(|e| e.kind == "started") {
            break e.data["node"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let victim = nodes.iter_mut().find(|n| n.4 == first_node).unwrap();
    let mut child = victim.0.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = now_ms();
    let done = wait(long.clone()).await;
    assert_eq!(
        (done.status.as_str(), done.output.clone()),
        ("succeeded", Some(json!("slept long").into())),
        "{done:?}"
    );
    let events = db.job_events(&tenant, &long, 0).await.unwrap();
    let starts: Vec<&qlayer_db::JobEvent> = events.iter().filter(|e| e.kind == "started").collect();
    assert_eq!(starts.len(), 2, "{events:?}");
    assert_ne!(starts[1].data["node"], starts[0].data["node"], "it ran again elsewhere");
    assert_eq!(starts[1].data["resumed"], true);
    let terminal = events.iter().filter(|e| matches!(e.kind.as_str(), "succeeded" | "failed" | "cancelled")).count();
    assert_eq!(terminal, 1, "completed exactly once: {events:?}");
    eprintln!(
        "takeover on NATS: the task ran again {} ms after its node was killed (lease 2000 ms)",
        starts[1].at - killed_at
    );

    // A poison task: it keeps failing; after its attempts it is dead-lettered.
    let mut body = call(&format!("fail-until {}", now_ms() + 3_600_000));
    body["max_attempts"] = json!(2);
    let alive = nodes.iter().find(|n| n.0.is_some()).unwrap().1.clone();
    let (_, job) = post(alive, acme.clone(), "/v1/jobs".into(), body).await;
    let poison = job["id"].as_str().unwrap().to_string();
    let failed = wait(poison.clone()).await;
    assert_eq!(failed.status.as_str(), "failed");
    assert!(failed.error.as_deref().unwrap_or("").contains("gave up after 2 attempts"), "{failed:?}");
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let dead = js.get_stream("QLAYER_DEAD").await.unwrap();
    let message = dead.get_last_raw_message_by_subject(&format!("qlayer.dead.{tenant}")).await.unwrap();
    assert_eq!(message.headers.get("Qlayer-Job").map(|v| v.as_str()), Some(poison.as_str()));
    let body: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(body["attempts"], 2);
    assert!(body["reason"].as_str().unwrap().contains("unavailable"), "{body}");
    // Nothing is left in the work queue.
    let mut tasks = js.get_stream("QLAYER_TASKS").await.unwrap();
    let info = tasks.info().await.unwrap();
    assert_eq!(info.state.messages, 0, "every task message was settled");

    for node in &mut nodes {
        if let Some(mut child) = node.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    db.close().await;
}
