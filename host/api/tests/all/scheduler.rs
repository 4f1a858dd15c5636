//! The core scheduler through the service: retries with backoff (and only of retryable errors),
//! circuit breakers, deadlines stopping a looping plugin, fair sharing between a flooding tenant
//! and a quiet one, DAG jobs, admission limits, and a host killed with SIGKILL mid-run that
//! finishes every job exactly once after restart (SQLite and PostgreSQL).
//!
//! The plugin that fails on purpose is the hostile test guest (`fail-until T`, `rate-limited N`,
//! `fail-fatal`, `loop`, `sleep-ms N`, echo), installed from a real registry.

use crate::api::{Svc, service};
use qlayer_db::Backend;
use qlayer_tests::ADMIN;
use qlayer_tests::{files_json, hostile};
use serde_json::{Value, json};
use std::time::Duration;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn call(input: &str) -> Value {
    json!({"kind": "call", "input": {"plugin": "hostile", "input": input}})
}

async fn events(svc: &Svc, tenant: &str, job: &str) -> Vec<qlayer_db::JobEvent> {
    svc.db().job_events(tenant, job, 0).await.unwrap()
}

/// Tenants, each with the hostile guest installed from the service's registry: (id, key).
async fn tenants_with_hostile(svc: &Svc, names: &[&str]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in names {
        let (id, key) = svc.tenant(name).await;
        assert_eq!(svc.install(&key, "test/hostile", &hostile(64, 10_000)).await.status, 201);
        out.push((id, key));
    }
    out
}

async fn submit(svc: &Svc, key: &str, body: Value) -> String {
    let r = svc.post("/v1/jobs", key, body).await;
    assert_eq!(r.status, 201, "{r:?}");
    r.body["id"].as_str().unwrap().to_string()
}

/// A plugin that is unavailable for a while is retried with growing, jittered delays until it
/// recovers; a plugin's retry-after is honoured; bad input is never retried; attempts run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_retryable_errors_are_retried_with_backoff_and_retry_after() {
    let svc = service(Backend::Sqlite, true, |c| {
        c.jobs.retry_base_ms = 100;
        c.jobs.breaker_failures = 0;
    })
    .await;
    let [(acme_id, acme)] = <[_; 1]>::try_from(tenants_with_hostile(&svc, &["acme"]).await).unwrap();

    // Unavailable for 700 ms: retried until it recovers.
    let mut body = call(&format!("fail-until {}", now_ms() + 700));
    body["max_attempts"] = json!(10);
    let flaky = submit(&svc, &acme, body).await;
    let fatal = submit(&svc, &acme, call("fail-fatal")).await;
    let mut body = call("rate-limited 600");
    body["max_attempts"] = json!(2);
    let limited = submit(&svc, &acme, body).await;

    let done = svc.wait(&acme, &flaky).await;
    assert_eq!((done["status"].as_str(), done["output"].as_str()), (Some("succeeded"), Some("recovered")), "{done}");
    let evs = events(&svc, &acme_id, &flaky).await;
    let retries: Vec<&qlayer_db::JobEvent> = evs.iter().filter(|e| e.kind == "retrying").collect();
    assert!(retries.len() >= 2, "{evs:?}");
    let delays: Vec<i64> = retries.iter().map(|e| e.data["delay_ms"].as_i64().unwrap()).collect();
    // Attempt n waits between half and all of 100·2^(n-1) ms.
    for (n, d) in delays.iter().enumerate() {
        let cap = 100 << n;
        assert!(*d >= cap / 2 && *d <= cap, "retry {n}: {d} ms outside {}..={cap}: {delays:?}", cap / 2);
    }
    let starts: Vec<i64> = evs.iter().filter(|e| e.kind == "started").map(|e| e.at).collect();
    assert_eq!(starts.len(), retries.len() + 1, "one start per attempt: {evs:?}");
    for (gap, delay) in starts.windows(2).map(|w| w[1] - w[0]).zip(&delays) {
        assert!(gap >= *delay, "the next attempt waited its backoff: {gap} < {delay}");
    }
    let tasks = svc.db().job_tasks(&acme_id, &flaky).await.unwrap();
    assert_eq!(tasks[0].attempts as usize, starts.len());

    // Bad input: one attempt, no retry.
    let failed = svc.wait(&acme, &fatal).await;
    assert_eq!(failed["status"], "failed");
    assert!(failed["error"].as_str().unwrap().contains("invalid input"), "{failed}");
    let evs = events(&svc, &acme_id, &fatal).await;
    assert!(!evs.iter().any(|e| e.kind == "retrying"), "a non-retryable error is not retried: {evs:?}");
    assert_eq!(svc.db().job_tasks(&acme_id, &fatal).await.unwrap()[0].attempts, 1);

    // Rate-limited with retry-after 600 ms: the retry waits at least that; two attempts, then
    // the job fails saying so.
    let failed = svc.wait(&acme, &limited).await;
    assert_eq!(failed["status"], "failed");
    assert!(failed["error"].as_str().unwrap().contains("gave up after 2 attempts"), "{failed}");
    let evs = events(&svc, &acme_id, &limited).await;
    let retry = evs.iter().find(|e| e.kind == "retrying").unwrap();
    assert!(retry.data["delay_ms"].as_i64().unwrap() >= 600, "{retry:?}");
    svc.stop().await;
}

/// After three failures in a row the plugin's circuit opens for the tenant: its next attempt
/// waits out the cool-down (longer than the backoff), a probe goes half-open, and once the
/// plugin recovers the circuit closes. Another tenant's install of the same plugin is not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_plugin_opens_its_circuit_and_a_probe_closes_it() {
    let svc = service(Backend::Sqlite, true, |c| {
        c.jobs.retry_base_ms = 20;
        c.jobs.retry_max_ms = 40;
        c.jobs.breaker_failures = 3;
        c.jobs.breaker_cooldown_ms = 1_000;
    })
    .await;
    let [(acme_id, acme), (_, beta)] = <[_; 2]>::try_from(tenants_with_hostile(&svc, &["acme", "beta"]).await).unwrap();
    let mut body = call(&format!("fail-until {}", now_ms() + 1_500));
    body["max_attempts"] = json!(20);
    let flaky = submit(&svc, &acme, body).await;
    // Wait for the circuit to open, then call the same plugin as beta: it is not held back.
    let opened_at = loop {
        let evs = events(&svc, &acme_id, &flaky).await;
        if let Some(e) = evs.iter().find(|e| !e.data["circuit_open_until"].is_null()) {
            break e.data["circuit_open_until"].as_i64().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let beta_job = submit(&svc, &beta, call("echo")).await;
    let beta_done = svc.wait(&beta, &beta_job).await;
    assert_eq!(beta_done["output"], "echo");
    assert!(beta_done["finished_at"].as_i64().unwrap() < opened_at, "beta ran while acme's circuit was open");

    let done = svc.wait(&acme, &flaky).await;
    assert_eq!(done["output"], "recovered", "{done}");
    let evs = events(&svc, &acme_id, &flaky).await;
    let starts: Vec<i64> = evs.iter().filter(|e| e.kind == "started").map(|e| e.at).collect();
    let retries: Vec<&qlayer_db::JobEvent> = evs.iter().filter(|e| e.kind == "retrying").collect();
    let open = retries.iter().position(|e| !e.data["circuit_open_until"].is_null()).unwrap();
    assert_eq!(open, 2, "it opened at the third failure in a row: {evs:?}");
    // The attempt after the opening waited for the cool-down, not just the 40 ms backoff.
    let gap = starts[open + 1] - starts[open];
    assert!(gap >= 1_000, "the probe waited for the cool-down ({gap} ms)");
    // Probes: each failed one re-opens for longer; the last one succeeded and closed it.
    assert!(retries.len() >= 3, "{evs:?}");
    let metrics = svc.get("/metrics", ADMIN).await;
    assert!(metrics.text.contains("qlayer_circuit_opened_total"), "{}", metrics.text);
    svc.stop().await;
}

/// A job's deadline reaches a plugin that loops forever (its own limit is 60 s): the call is
/// stopped at the deadline, the job fails saying so, and the slot is free for the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_stops_a_plugin_that_loops_forever() {
    let svc = service(Backend::Sqlite, true, |c| c.jobs.concurrency = 1).await;
    let (_, acme) = svc.tenant("acme").await;
    assert_eq!(svc.install(&acme, "test/hostile", &hostile(64, 60_000)).await.status, 201);
    let mut body = call("loop");
    body["deadline_ms"] = json!(400);
    let looping = submit(&svc, &acme, body).await;
    let next = submit(&svc, &acme, call("after")).await;
    let failed = svc.wait(&acme, &looping).await;
    assert_eq!(failed["status"], "failed");
    assert!(failed["error"].as_str().unwrap().contains("deadline"), "{failed}");
    let took = failed["finished_at"].as_i64().unwrap() - failed["created_at"].as_i64().unwrap();
    assert!(took < 60_000, "stopped at its deadline, not at the plugin's 60 s limit ({took} ms)");
    assert_eq!(svc.wait(&acme, &next).await["output"], "after");
    // Out-of-range limits are refused and named.
    let mut bad = call("x");
    bad["deadline_ms"] = json!(0);
    let r = svc.post("/v1/jobs", &acme, bad).await;
    assert_eq!((r.status, r.code()), (400, "invalid_request"));
    assert!(r.body["error"]["message"].as_str().unwrap().contains("deadline_ms"), "{r:?}");
    let mut bad = call("x");
    bad["max_attempts"] = json!(99);
    let r = svc.post("/v1/jobs", &acme, bad).await;
    assert!(r.body["error"]["message"].as_str().unwrap().contains("max_attempts"), "{r:?}");
    svc.stop().await;
}

/// Tenant A floods the host with 300 jobs, then B submits 20: B's jobs finish while A's backlog
/// is still there, because capacity is shared by weight, not by arrival (first come, first
/// served would run all 300 of A's first). A tenant over its open-task limit is refused with 429
/// `queue_full`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_does_not_starve_another() {
    let svc = service(Backend::Sqlite, true, |c| {
        c.jobs.concurrency = 1;
        c.jobs.max_open_per_tenant = 320;
    })
    .await;
    let [(a_id, a), (_, b)] = <[_; 2]>::try_from(tenants_with_hostile(&svc, &["flood", "quiet"]).await).unwrap();
    let mut a_jobs = Vec::new();
    for _ in 0..300 {
        a_jobs.push(submit(&svc, &a, call("sleep-ms 40")).await);
    }
    let b_start = now_ms();
    let mut b_jobs = Vec::new();
    for _ in 0..20 {
        b_jobs.push(submit(&svc, &b, call("sleep-ms 40")).await);
    }
    let mut b_last = 0;
    for id in &b_jobs {
        let done = svc.wait(&b, id).await;
        assert_eq!(done["status"], "succeeded");
        b_last = b_last.max(done["finished_at"].as_i64().unwrap());
    }
    let (mut a_before, mut a_during) = (0, 0);
    for id in &a_jobs {
        let job = svc.db().job(&a_id, id).await.unwrap().unwrap();
        if let Some(f) = job.finished_at.filter(|f| *f <= b_last) {
            a_before += 1;
            if f >= b_start {
                a_during += 1;
            }
        }
    }
    let b_share = 20.0 / (20.0 + a_during as f64);
    eprintln!(
        "fairness: while both had work, quiet got {b_share:.2} of the slot ({a_during} flood jobs ran beside its 20); flood finished {a_before} in all by then"
    );
    assert!(a_before < 200, "A finished {a_before} of its 300 before B's last: B waited behind A's backlog");
    assert!(b_share >= 0.35, "equal weights share about equally while both have work: {b_share:.2}");

    // Admission: over the open-task limit → 429 queue_full, naming the limit.
    let mut refused = None;
    for _ in 0..400 {
        let r = svc.post("/v1/jobs", &a, call("sleep-ms 1")).await;
        if r.status == 429 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("the flood hit its open-task limit");
    assert_eq!(r.code(), "queue_full", "{r:?}");
    assert!(r.body["error"]["message"].as_str().unwrap().contains("320"), "{r:?}");
    assert!(r.headers.contains_key("retry-after"));
    svc.stop().await;
}

/// A DAG job: `a` first, then `b` and `c` (in parallel), then `d`, which has no input of its own
/// and gets `b`'s and `c`'s outputs by name. A cycle and an unknown dependency are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dag_job_runs_its_tasks_in_dependency_order() {
    let svc = service(Backend::Sqlite, true, |c| c.jobs.concurrency = 4).await;
    let [(acme_id, acme)] = <[_; 1]>::try_from(tenants_with_hostile(&svc, &["acme"]).await).unwrap();
    let graph = json!({"kind": "call", "input": {"tasks": [
        {"name": "a", "plugin": "hostile", "input": "first"},
        {"name": "b", "plugin": "hostile", "input": "sleep-ms 300", "after": ["a"]},
        {"name": "c", "plugin": "hostile", "input": "sleep-ms 300", "after": ["a"]},
        {"name": "d", "plugin": "hostile", "after": ["b", "c"]},
    ]}});
    let id = submit(&svc, &acme, graph).await;
    let done = svc.wait(&acme, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["task_count"], 4);
    assert_eq!(done["output"]["a"], "first");
    // d echoes its input: the outputs of b and c.
    assert_eq!(done["output"]["d"], json!({"b": "slept", "c": "slept"}), "{done}");
    let evs = events(&svc, &acme_id, &id).await;
    let started = |task: &str| evs.iter().find(|e| e.kind == "started" && e.data["task"] == task).unwrap().seq;
    let finished = |task: &str| {
        evs.iter()
            .find(|e| e.kind == "progress" && e.data["task"] == task && e.data["state"] == "succeeded")
            .map(|e| e.seq)
    };
    assert!(started("b") > finished("a").unwrap() && started("c") > finished("a").unwrap(), "{evs:?}");
    assert!(started("d") > finished("b").unwrap().max(finished("c").unwrap()), "{evs:?}");
    // b and c ran at the same time: both started before either finished.
    assert!(started("b").max(started("c")) < finished("b").unwrap().min(finished("c").unwrap()), "{evs:?}");

    // Per-task state, for the job's tenant only.
    let tasks = svc.get(&format!("/v1/jobs/{id}/tasks"), &acme).await;
    assert_eq!(tasks.status, 200, "{tasks:?}");
    let items = tasks.body["items"].as_array().unwrap();
    let names: Vec<&str> = items.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
    assert!(items.iter().all(|t| t["status"] == "succeeded" && t["attempts"] == 1), "{tasks:?}");
    assert_eq!(items[3]["depends_on"], json!(["b", "c"]));
    assert!(items[0].get("lease_owner").is_none(), "lease internals are not shown");
    let (_, other) = svc.tenant("other").await;
    let hidden = svc.get(&format!("/v1/jobs/{id}/tasks"), &other).await;
    let missing = svc.get("/v1/jobs/job_000000000000000000000000000000/tasks", &other).await;
    assert_eq!((hidden.status, hidden.code()), (404, "not_found"));
    assert_eq!(
        hidden.text.replace(&id, "ID"),
        missing.text.replace("job_000000000000000000000000000000", "ID"),
        "another tenant's job looks exactly like a missing one"
    );

    for (tasks, words) in [
        (
            json!([{"name": "x", "plugin": "hostile", "after": ["y"]}, {"name": "y", "plugin": "hostile", "after": ["x"]}]),
            "cycle",
        ),
        (json!([{"name": "x", "plugin": "hostile", "after": ["nope"]}]), "no task is named `nope`"),
        (json!([{"name": "x", "plugin": "hostile"}, {"name": "x", "plugin": "hostile"}]), "used twice"),
        (json!([{"name": "x", "plugin": "missing"}]), "not installed"),
        (json!([]), "1 to 64 tasks"),
    ] {
        let r = svc.post("/v1/jobs", &acme, json!({"kind": "call", "input": {"tasks": tasks}})).await;
        // A plugin that is not installed is missing (404); the rest is an invalid graph.
        let expected = if words == "not installed" { (404, "not_found") } else { (400, "invalid_request") };
        assert_eq!((r.status, r.code()), expected, "{r:?}");
        assert!(r.body["error"]["message"].as_str().unwrap().contains(words), "{words}: {r:?}");
    }
    svc.stop().await;
}

/// An operator gives one tenant weight 3 and another weight 1 (`PUT /v1/tenants/{id}/share`);
/// with both backlogged on one slot, the first gets about three quarters of it. The route
/// refuses bad values (naming the field), non-operators (403) and unknown tenants (404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_weights_split_capacity_and_only_operators_set_them() {
    let svc = service(Backend::Sqlite, true, |c| c.jobs.concurrency = 1).await;
    let [(heavy_id, heavy), (light_id, light), (_, other)] =
        <[_; 3]>::try_from(tenants_with_hostile(&svc, &["heavy", "light", "other"]).await).unwrap();
    let r = svc
        .send("PUT", &format!("/v1/tenants/{heavy_id}/share"), Some(ADMIN), Some(json!({"weight": 3}).to_string()))
        .await;
    assert_eq!((r.status, r.body["weight"].as_i64()), (200, Some(3)), "{r:?}");
    // Both backlogged: a third tenant's long job holds the slot while the backlogs are stored
    // (a tenant's own earlier use would count against its share).
    let blocker = submit(&svc, &other, call("sleep-ms 400")).await;
    let (mut heavy_jobs, mut light_jobs) = (Vec::new(), Vec::new());
    for _ in 0..40 {
        heavy_jobs.push(submit(&svc, &heavy, call("sleep-ms 15")).await);
        light_jobs.push(submit(&svc, &light, call("sleep-ms 15")).await);
    }
    svc.wait(&other, &blocker).await;
    // Count completions while both still had work: up to the end of the first 30 of heavy's.
    let mut heavy_ends = Vec::new();
    for id in &heavy_jobs {
        heavy_ends.push(svc.wait(&heavy, id).await["finished_at"].as_i64().unwrap());
    }
    heavy_ends.sort();
    let window_end = heavy_ends[29];
    let mut light_in_window = 0;
    for id in &light_jobs {
        let job = svc.db().job(&light_id, id).await.unwrap().unwrap();
        if job.finished_at.is_some_and(|f| f <= window_end) {
            light_in_window += 1;
        }
    }
    let share = 30.0 / (30.0 + light_in_window as f64);
    eprintln!("weights 3:1 on one slot: heavy got {share:.2} of the completions (30 vs {light_in_window})");
    assert!((0.6..=0.9).contains(&share), "weight 3 against 1 gets about 0.75: {share:.2}");

    let put = |id: String, key: String, body: Value| {
        let svc = &svc;
        async move { svc.send("PUT", &format!("/v1/tenants/{id}/share"), Some(&key), Some(body.to_string())).await }
    };
    let r = put(heavy_id.clone(), ADMIN.into(), json!({"weight": 0})).await;
    assert_eq!((r.status, r.code()), (400, "invalid_request"), "{r:?}");
    assert!(r.body["error"]["message"].as_str().unwrap().contains("weight"), "{r:?}");
    let r = put(heavy_id.clone(), ADMIN.into(), json!({"weight": 2, "max_running": -1})).await;
    assert!(r.body["error"]["message"].as_str().unwrap().contains("max_running"), "{r:?}");
    let r = put(heavy_id.clone(), ADMIN.into(), json!({"weight": 2, "colour": "red"})).await;
    assert_eq!(r.status, 400, "unknown fields are refused: {r:?}");
    let r = put(heavy_id.clone(), heavy.clone(), json!({"weight": 1000})).await;
    assert_eq!((r.status, r.code()), (403, "forbidden"), "a tenant cannot raise its own share");
    let r = put("tn_missing".into(), ADMIN.into(), json!({"weight": 2})).await;
    assert_eq!((r.status, r.code()), (404, "not_found"));
    svc.stop().await;
}

/// A factory run is a DAG of its steps: product manager → architect → developer and devops →
/// QA engineer → reviewer → validators → review, and the review adds a repair round only while
/// errors remain and rounds are left. Every
/// step runs once, its output is stored with its task, and the report and capsule end the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_factory_run_is_a_dag_of_its_steps_with_repair_rounds_added_as_needed() {
    let svc = service(Backend::Sqlite, false, |_| {}).await;
    let (_, acme) = svc.tenant("acme").await;
    // The first developer reply does not parse; the repair (its prompt carries the finding) does.
    let script = json!({"rules": [
        {"role": "developer", "contains": "rust-syntax", "reply": files_json("fn main() {}\n")},
        {"role": "developer", "reply": files_json("fn main() {\n    let x = ;\n}\n")},
    ]});
    // The script as JSON (its JSON text is taken too, as below).
    let r = svc.post("/v1/runs", &acme, json!({"requirement": "a CLI", "script": script})).await;
    assert_eq!(r.status, 201, "{r:?}");
    let run = r.body["id"].as_str().unwrap().to_string();
    let done = svc.wait(&acme, &run).await;
    assert_eq!(
        (done["status"].as_str(), done["output"]["status"].as_str()),
        (Some("succeeded"), Some("passed")),
        "{done}"
    );
    assert_eq!(done["output"]["repair_rounds"], 1);
    let steps: Vec<&str> =
        done["output"]["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
    let validators = ["validate: syntax", "validate: tests", "validate: secrets", "validate: deps", "validate: hap"];
    let roles = ["product-manager", "architect", "developer", "devops", "qa-engineer", "reviewer"];
    let repaired = ["developer (repair 1)", "qa-engineer (repair 1)", "reviewer (repair 1)"];
    assert_eq!(steps, [&roles[..], &validators[..], &repaired[..], &validators[..]].concat());
    assert_eq!(done["task_count"], 21);
    let tasks = svc.get(&format!("/v1/jobs/{run}/tasks"), &acme).await;
    let items = tasks.body["items"].as_array().unwrap();
    let names: Vec<&str> = items.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "product-manager",
            "architect",
            "developer",
            "devops",
            "qa-engineer",
            "reviewer",
            "validate-syntax",
            "validate-tests",
            "validate-secrets",
            "validate-deps",
            "validate-hap",
            "review",
            "developer-repair-1",
            "qa-engineer-repair-1",
            "reviewer-repair-1",
            "validate-syntax-repair-1",
            "validate-tests-repair-1",
            "validate-secrets-repair-1",
            "validate-deps-repair-1",
            "validate-hap-repair-1",
            "review-repair-1"
        ]
    );
    assert!(items.iter().all(|t| t["status"] == "succeeded" && t["attempts"] == 1), "{tasks:?}");
    assert_eq!(items[11]["output"]["errors"], 1, "the review names what goes back to the developer");
    assert_eq!(items[12]["depends_on"], json!(["architect", "developer", "review"]));
    // The capsule holds the repaired file and the report.
    let files = svc.capsule(&acme, &run).await;
    assert_eq!(files[&format!("{run}/src/main.rs")], "fn main() {}\n");
    let report: Value = serde_json::from_str(&files[&format!("{run}/qlayer-run.json")]).unwrap();
    assert_eq!(report, done["output"], "the capsule's report is the job's output");

    // Rounds are bounded: a developer that never gets it right stops after max_repair_rounds.
    let broken = json!({"rules": [{"role": "developer", "reply": files_json("fn main( {")}]});
    let r = svc
        .post("/v1/runs", &acme, json!({"requirement": "a CLI", "script": broken.to_string(), "max_repair_rounds": 1}))
        .await;
    let done = svc.wait(&acme, r.body["id"].as_str().unwrap()).await;
    assert_eq!(done["output"]["status"], "failed-validation", "{done}");
    assert_eq!((done["output"]["repair_rounds"].as_u64(), done["task_count"].as_u64()), (Some(1), Some(21)));
    assert!(done["output"]["stop_reason"].as_str().unwrap().contains("after 1 repair rounds"), "{done}");

    // The run's token budget counts every step: once the product manager has spent it, the next
    // step does not start and the run fails naming the budget.
    let r = svc.post("/v1/runs", &acme, json!({"requirement": "a CLI", "token_budget": 1})).await;
    assert_eq!(r.status, 201, "{r:?}");
    let done = svc.wait(&acme, r.body["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(done["error"].as_str().unwrap().contains("token budget of 1 is spent"), "{done}");
    let r = svc.post("/v1/runs", &acme, json!({"requirement": "a CLI", "token_budget": 0})).await;
    assert_eq!((r.status, r.code()), (400, "invalid_request"), "{r:?}");
    assert!(r.text.contains("token_budget must be 1 to"), "{r:?}");
    let r = svc.post("/v1/runs", &acme, json!({"requirement": "a CLI", "token_budget": 1u64 << 63})).await;
    assert_eq!((r.status, r.code()), (400, "invalid_request"), "over the documented maximum: {r:?}");
}
