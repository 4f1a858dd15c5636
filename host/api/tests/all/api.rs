//! The REST API of `qlayer serve`, started in process on a free port with a real HTTP client
//! (reqwest): tenants, keys and roles; plugins installed from a real registry; jobs, runs, their
//! server-sent events and capsules; bad input on every route; the cross-tenant matrix; limits,
//! metrics, the audit trail and the OpenAPI document. The main flows run on SQLite and on the
//! machine's PostgreSQL (a fresh database per test).

use qlayer_api::serve::{Running, ServeConfig};
use qlayer_db::Backend;
use qlayer_tests::{ADMIN, PgDb, TestRegistry, fresh_postgres, hostile, marketplace_plugin};
use serde_json::{Value, json};
use std::time::Duration;

/// A service for one test.
pub(crate) struct Svc {
    pub(crate) running: Option<Running>,
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
    pub(crate) registry: Option<TestRegistry>,
    pub(crate) _pg: Option<PgDb>,
    pub(crate) _dir: tempfile::TempDir,
}

pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Value,
    pub(crate) text: String,
    pub(crate) headers: reqwest::header::HeaderMap,
}

impl Reply {
    pub(crate) fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.text)
    }
}

pub(crate) async fn service(backend: Backend, with_registry: bool, tweak: impl FnOnce(&mut ServeConfig)) -> Svc {
    let dir = tempfile::tempdir().unwrap();
    let registry = with_registry.then(TestRegistry::start);
    if let Some(r) = &registry {
        // Tenant `acme` may name `PATH` in secret grants: a variable every process has, standing
        // in for an operator's API key variable.
        let config = format!("insecure-registries = [\"{}\"]\n\n[tenants.acme]\nsecret-env = [\"PATH\"]\n", r.addr);
        std::fs::write(dir.path().join("marketplace.toml"), config).unwrap();
    }
    let mut config = ServeConfig::default();
    config.server.rest_addr = "127.0.0.1:0".parse().unwrap();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.shutdown_grace_ms = 2_000;
    config.auth.admin_key = Some(ADMIN.into());
    config.limits.requests_per_second = 0.0;
    // The tests send many bad keys on purpose; the one test of this limit turns it back on.
    config.limits.auth_failures_per_second = 0.0;
    let pg = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            let (url, pg) = fresh_postgres().await;
            config.database.url = Some(url);
            Some(pg)
        }
    };
    tweak(&mut config);
    // `{registry}` in `[capsules] publish-to` stands for the test registry's address.
    if let Some(r) = &registry {
        for prefix in &mut config.capsules.publish_to {
            *prefix = prefix.replace("{registry}", &r.addr);
        }
    }
    let running = qlayer_api::serve::start(config, dir.path().to_path_buf()).await.unwrap();
    let base = format!("http://{}", running.rest_addr);
    Svc {
        running: Some(running),
        base,
        http: {
            qlayer_registry::install_tls_provider();
            reqwest::Client::builder().no_proxy().build().unwrap()
        },
        registry,
        _pg: pg,
        _dir: dir,
    }
}

impl Svc {
    pub(crate) async fn send(&self, method: &str, path: &str, key: Option<&str>, body: Option<String>) -> Reply {
        let mut req = self.http.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply { status, body, text, headers }
    }

    pub(crate) async fn get(&self, path: &str, key: &str) -> Reply {
        self.send("GET", path, Some(key), None).await
    }

    pub(crate) async fn post(&self, path: &str, key: &str, body: Value) -> Reply {
        self.send("POST", path, Some(key), Some(body.to_string())).await
    }

    pub(crate) async fn put(&self, path: &str, key: &str, body: Value) -> Reply {
        self.send("PUT", path, Some(key), Some(body.to_string())).await
    }

    pub(crate) async fn delete(&self, path: &str, key: &str) -> Reply {
        self.send("DELETE", path, Some(key), None).await
    }

    /// Creates a tenant; returns (id, admin key).
    pub(crate) async fn tenant(&self, name: &str) -> (String, String) {
        let r = self.post("/v1/tenants", ADMIN, json!({"name": name})).await;
        assert_eq!(r.status, 201, "{r:?}");
        (r.body["tenant"]["id"].as_str().unwrap().into(), r.body["api_key"].as_str().unwrap().into())
    }

    pub(crate) async fn key(&self, admin: &str, role: &str) -> (String, String) {
        let r = self.post("/v1/keys", admin, json!({"name": format!("{role} key"), "role": role})).await;
        assert_eq!(r.status, 201, "{r:?}");
        (r.body["key"]["id"].as_str().unwrap().into(), r.body["api_key"].as_str().unwrap().into())
    }

    /// Pushes a plugin to the test registry and installs it for the key's tenant.
    pub(crate) async fn install(&self, key: &str, repo: &str, wasm: &[u8]) -> Reply {
        self.install_with(key, repo, wasm, None).await
    }

    /// [`Svc::install`] with grants.
    pub(crate) async fn install_with(&self, key: &str, repo: &str, wasm: &[u8], grants: Option<Value>) -> Reply {
        let reference = self.push(repo, wasm).await;
        let mut body = json!({"reference": reference});
        if let Some(grants) = grants {
            body["grants"] = grants;
        }
        self.post("/v1/plugins", key, body).await
    }

    /// Pushes a plugin to the test registry as `<repo>:1.0.0`; returns the reference.
    pub(crate) async fn push(&self, repo: &str, wasm: &[u8]) -> String {
        let registry = self.registry.as_ref().unwrap();
        let reference = format!("{}/{repo}:1.0.0", registry.addr);
        let market = qlayer_marketplace::Marketplace::open_local(
            self._dir.path().join("pusher"),
            qlayer_marketplace::MarketplaceConfig {
                insecure_registries: vec![registry.addr.clone()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        market.push(wasm, &reference, None).await.unwrap();
        reference
    }

    /// Polls a job until it is over (the bound only keeps a broken build from hanging CI).
    pub(crate) async fn wait(&self, key: &str, id: &str) -> Value {
        for _ in 0..1200 {
            let r = self.get(&format!("/v1/jobs/{id}"), key).await;
            assert_eq!(r.status, 200, "{r:?}");
            if matches!(r.body["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                return r.body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {id} did not finish");
    }

    pub(crate) async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.unwrap();
        }
    }

    /// A run's capsule, fetched over HTTP (it must be a tar.gz): its files by path, as text.
    pub(crate) async fn capsule(&self, key: &str, run: &str) -> std::collections::BTreeMap<String, String> {
        let res = self
            .http
            .get(format!("{}/v1/runs/{run}/capsule", self.base))
            .header("authorization", format!("Bearer {key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "application/gzip");
        let bytes = res.bytes().await.unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        let mut files = std::collections::BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().to_string();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
            files.insert(path, text);
        }
        files
    }

    pub(crate) fn db(&self) -> &qlayer_db::Db {
        &self.running.as_ref().unwrap().db
    }
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

on_both!(
    tenants_keys_and_roles,
    plugins_jobs_runs_events_and_capsules,
    nul_bytes_and_bad_utf8_are_bad_input_on_every_database
);

/// Issue 14 items 13 and 14: a NUL byte (which PostgreSQL cannot store) or invalid UTF-8 in a path
/// parameter, or `\u0000` in a body, is a 400 in the one error shape on both databases, not a 500
/// or axum's text/plain.
async fn nul_bytes_and_bad_utf8_are_bad_input_on_every_database(backend: Backend) {
    let svc = service(backend, false, |_| {}).await;
    let (_, acme) = svc.tenant("acme").await;
    for (method, path) in [
        ("GET", "/v1/jobs/job_%00"),
        ("GET", "/v1/runs/%00/capsule"),
        ("POST", "/v1/jobs/%00/cancel"),
        ("GET", "/v1/plugins/%00"),
        ("GET", "/v1/tenants/tn_%00"),
        ("DELETE", "/v1/keys/key_%00"),
        ("GET", "/v1/jobs/%FF%FE"),
        ("GET", "/v1/runs/%C3%28/capsule"),
    ] {
        let key = if path.starts_with("/v1/tenants") { ADMIN } else { acme.as_str() };
        let r = svc.send(method, path, Some(key), None).await;
        assert_eq!(r.status, 400, "{method} {path}: {r:?}");
        assert_eq!(r.headers["content-type"], "application/json", "{method} {path}");
        assert_eq!(r.body["error"]["code"], "invalid_request", "{method} {path}: {r:?}");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("control character") || message.contains("UTF-8"), "{message}");
    }
    let r = svc.post("/v1/tenants", ADMIN, json!({"name": "nul\u{0}name"})).await;
    assert_ne!(r.status, 500, "{r:?}");
    let r =
        svc.post("/v1/jobs", &acme, json!({"kind": "call", "input": {"plugin": "p\u{0}", "input": "x\u{0}"}})).await;
    assert_ne!(r.status, 500, "{r:?}");
}

async fn tenants_keys_and_roles(backend: Backend) {
    let svc = service(backend, false, |_| {}).await;
    assert_eq!(svc.send("GET", "/healthz", None, None).await.status, 200);
    let ready = svc.send("GET", "/readyz", None, None).await;
    assert_eq!((ready.status, ready.body["database"].as_str()), (200, Some("ok")));

    let (acme, acme_admin) = svc.tenant("acme").await;
    let (beta, _) = svc.tenant("beta").await;
    assert!(acme.starts_with("tn_") && acme_admin.starts_with("ql_"));
    let dup = svc.post("/v1/tenants", ADMIN, json!({"name": "acme"})).await;
    assert_eq!((dup.status, dup.code()), (409, "conflict"), "{dup:?}");
    let bad = svc.post("/v1/tenants", ADMIN, json!({"name": "Not Valid"})).await;
    assert_eq!((bad.status, bad.code()), (400, "invalid_request"));
    assert!(bad.body["error"]["message"].as_str().unwrap().contains("tenant name"), "{bad:?}");

    // Operators list tenants in pages.
    let page = svc.get("/v1/tenants?limit=2", ADMIN).await;
    assert_eq!(page.body["items"].as_array().unwrap().len(), 2, "{page:?}");
    let next = page.body["next"].as_str().unwrap();
    let rest = svc.get(&format!("/v1/tenants?limit=2&after={next}"), ADMIN).await;
    assert_eq!(rest.body["items"].as_array().unwrap().len(), 1, "system, acme, beta: {rest:?}");

    // A tenant's admin is not an operator, and sees only its own tenant.
    let r = svc.post("/v1/tenants", &acme_admin, json!({"name": "gamma"})).await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    assert_eq!(svc.get("/v1/tenants", &acme_admin).await.status, 403);
    let own = svc.get(&format!("/v1/tenants/{acme}"), &acme_admin).await;
    assert_eq!((own.status, own.body["name"].as_str()), (200, Some("acme")));
    let other = svc.get(&format!("/v1/tenants/{beta}"), &acme_admin).await;
    let missing = svc.get("/v1/tenants/tn_000000000000000000000000", &acme_admin).await;
    assert_eq!((other.status, missing.status), (404, 404));
    assert_eq!(other.text.replace(&beta, "ID"), missing.text.replace("tn_000000000000000000000000", "ID"));

    // Roles.
    let (dev_id, dev) = svc.key(&acme_admin, "developer").await;
    let (viewer_id, viewer) = svc.key(&acme_admin, "viewer").await;
    let r = svc.post("/v1/keys", &dev, json!({"name": "x", "role": "admin"})).await;
    assert_eq!((r.status, r.code()), (403, "forbidden"), "developers do not manage keys");
    let r = svc.post("/v1/jobs", &viewer, json!({"kind": "run", "input": {"requirement": "a CLI"}})).await;
    assert_eq!((r.status, r.code()), (403, "forbidden"), "{r:?}");
    assert!(r.body["error"]["message"].as_str().unwrap().contains("viewer"));
    assert_eq!(svc.get("/v1/jobs", &viewer).await.status, 200, "viewers read");
    let keys = svc.get("/v1/keys", &acme_admin).await;
    let listed: Vec<&str> = keys.body["items"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert!(listed.contains(&dev_id.as_str()) && listed.contains(&viewer_id.as_str()));
    assert!(!keys.text.contains(&dev), "key records never hold the key");

    // Revoked keys stop working; revoking twice is a 404.
    assert_eq!(svc.delete(&format!("/v1/keys/{viewer_id}"), &acme_admin).await.status, 204);
    let r = svc.get("/v1/jobs", &viewer).await;
    assert_eq!((r.status, r.code()), (401, "unauthenticated"));
    assert_eq!(svc.delete(&format!("/v1/keys/{viewer_id}"), &acme_admin).await.status, 404);

    // Every change is in the audit chain, with who and how it ended.
    let records = svc.db().audit_records(None, 0, 1000).await.unwrap();
    let find = |action: &str, outcome: &str| records.iter().any(|r| r.action == action && r.outcome == outcome);
    assert!(find("tenant.create", "ok") && find("tenant.create", "error: conflict"));
    assert!(find("key.create", "ok") && find("key.revoke", "ok") && find("key.revoke", "error: not_found"));
    assert!(records.iter().filter(|r| r.action == "tenant.create" && r.outcome == "ok").all(|r| r.tenant_id != acme));
    assert!(matches!(svc.db().verify_audit().await.unwrap(), qlayer_db::AuditCheck::Intact { .. }));
    svc.stop().await;
}

async fn plugins_jobs_runs_events_and_capsules(backend: Backend) {
    let svc = service(backend, true, |_| {}).await;
    let (_, acme) = svc.tenant("acme").await;

    // Install from the registry, list, get.
    let r = svc.install(&acme, "tools/text-stats", &marketplace_plugin("text-stats")).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["plugin"]["name"], "text-stats");
    assert!(r.body["plugin"]["digest"].as_str().unwrap().starts_with("sha256:"));
    let again = svc.install(&acme, "tools/text-stats", &marketplace_plugin("text-stats")).await;
    assert_eq!((again.status, again.code()), (409, "conflict"), "{again:?}");
    let list = svc.get("/v1/plugins", &acme).await;
    assert_eq!(list.body["items"][0]["name"], "text-stats", "{list:?}");
    assert_eq!(svc.get("/v1/plugins/text-stats", &acme).await.status, 200);
    let missing = svc
        .post(
            "/v1/plugins",
            &acme,
            json!({"reference": format!("{}/tools/nothing:1.0.0", svc.registry.as_ref().unwrap().addr)}),
        )
        .await;
    assert_eq!((missing.status, missing.code()), (404, "not_found"), "{missing:?}");

    // A call job through the installed tool.
    let submit = json!({"kind": "call", "input": {"plugin": "text-stats", "input": {"text": "one two three"}}, "idempotency_key": "k1"});
    let r = svc.post("/v1/jobs", &acme, submit.clone()).await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(r.headers["location"], format!("/v1/jobs/{id}").as_str());
    let done = svc.wait(&acme, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"]["words"], 3, "{done}");
    // Idempotent: same key and request → the same job (200); same key, other request → 409.
    let replay = svc.post("/v1/jobs", &acme, submit.clone()).await;
    assert_eq!((replay.status, replay.body["id"].as_str()), (200, Some(id.as_str())));
    let clash = svc
        .post("/v1/jobs", &acme, json!({"kind": "call", "input": {"plugin": "text-stats", "input": {"text": "other"}}, "idempotency_key": "k1"}))
        .await;
    assert_eq!((clash.status, clash.code()), (409, "conflict"));
    assert!(clash.text.contains("idempotency_key was used for a different request; use a new key"), "{clash:?}");
    assert!(!clash.text.contains("already exists"), "{clash:?}");
    // A deadline is part of the request: the same call with one added is a different request.
    let mut with_deadline = submit.clone();
    with_deadline["deadline_ms"] = json!(5);
    let clash = svc.post("/v1/jobs", &acme, with_deadline).await;
    assert_eq!((clash.status, clash.code()), (409, "conflict"), "{clash:?}");
    // Only installed tools can be called.
    let r = svc.post("/v1/jobs", &acme, json!({"kind": "call", "input": {"plugin": "nope", "input": 1}})).await;
    assert_eq!((r.status, r.code()), (404, "not_found"), "a plugin that is not installed is missing: {r:?}");
    assert!(r.body["error"]["message"].as_str().unwrap().contains("input.plugin"), "{r:?}");

    // A factory run, followed as server-sent events with a real HTTP client.
    let r = svc.post("/v1/runs", &acme, json!({"requirement": "a command-line todo list in Python"})).await;
    assert_eq!(r.status, 201, "{r:?}");
    let run = r.body["id"].as_str().unwrap().to_string();
    let mut res = svc
        .http
        .get(format!("{}/v1/jobs/{run}/events", svc.base))
        .header("authorization", format!("Bearer {acme}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut sse = String::new();
    while let Some(chunk) = res.chunk().await.unwrap() {
        sse.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events: Vec<Value> =
        sse.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| serde_json::from_str(d.trim()).unwrap()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"queued"), "{sse}");
    assert_eq!(kinds.last(), Some(&"succeeded"), "the stream ends with the job: {sse}");
    assert!(kinds.contains(&"started") && kinds.iter().filter(|k| **k == "progress").count() >= 4, "{sse}");
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "in order, none lost: {seqs:?}");
    // Resuming with Last-Event-ID replays only what came after.
    let resumed = svc
        .http
        .get(format!("{}/v1/jobs/{run}/events", svc.base))
        .header("authorization", format!("Bearer {acme}"))
        .header("last-event-id", (seqs.len() as i64 - 1).to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(resumed.lines().filter(|l| l.starts_with("data:")).count(), 1, "{resumed}");

    let got = svc.get(&format!("/v1/runs/{run}"), &acme).await;
    assert_eq!(got.body["output"]["status"], "passed", "{got:?}");
    assert_eq!(svc.get(&format!("/v1/runs/{id}"), &acme).await.status, 404, "a call job is not a run");
    // The capsule: a tar.gz of the generated project and its report.
    let files = svc.capsule(&acme, &run).await;
    assert!(files[&format!("{run}/qlayer-run.json")].contains("\"passed\""), "{files:?}");
    let names: Vec<&String> = files.keys().collect();
    assert!(names.iter().all(|n| n.starts_with(&format!("{run}/"))), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with("qlayer-run.json")) && names.len() >= 2, "{names:?}");

    // Lists page newest first; filters by kind.
    let page = svc.get("/v1/jobs?limit=1", &acme).await;
    assert_eq!(page.body["items"][0]["id"].as_str(), Some(run.as_str()));
    let older = svc.get(&format!("/v1/jobs?limit=1&after={}", page.body["next"].as_str().unwrap()), &acme).await;
    assert_eq!(older.body["items"][0]["id"].as_str(), Some(id.as_str()));
    let runs = svc.get("/v1/jobs?kind=run", &acme).await;
    assert_eq!(runs.body["items"].as_array().unwrap().len(), 1);

    // Removal.
    assert_eq!(svc.delete("/v1/plugins/text-stats", &acme).await.status, 204);
    assert_eq!(svc.get("/v1/plugins/text-stats", &acme).await.status, 404);
    let records = svc.db().audit_records(None, 0, 1000).await.unwrap();
    for action in ["plugin.install", "job.submit", "run.submit", "plugin.remove"] {
        assert!(records.iter().any(|r| r.action == action && r.outcome == "ok"), "{action} audited");
    }
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_a_running_plugin_and_a_queued_job_never_starts() {
    let svc = service(Backend::Sqlite, true, |c| c.jobs.concurrency = 1).await;
    let (_, acme) = svc.tenant("acme").await;
    let r = svc.install(&acme, "test/hostile", &hostile(64, 60_000)).await;
    assert_eq!(r.status, 201, "{r:?}");
    let call = |input: &str| json!({"kind": "call", "input": {"plugin": "hostile", "input": input}});
    let looping = svc.post("/v1/jobs", &acme, call("loop")).await.body["id"].as_str().unwrap().to_string();
    let queued = svc.post("/v1/jobs", &acme, call("echo")).await.body["id"].as_str().unwrap().to_string();
    // Wait until the loop is running (one slot: the echo job stays queued behind it).
    for _ in 0..600 {
        if svc.get(&format!("/v1/jobs/{looping}"), &acme).await.body["status"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = svc.post(&format!("/v1/jobs/{queued}/cancel"), &acme, json!({})).await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("cancelled")), "{r:?}");
    let r = svc.post(&format!("/v1/jobs/{looping}/cancel"), &acme, json!({})).await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("cancelled")), "{r:?}");
    // The slot frees at once: a new job runs long before the loop's 60 s deadline.
    let next = svc.post("/v1/jobs", &acme, call("after")).await.body["id"].as_str().unwrap().to_string();
    let done = svc.wait(&acme, &next).await;
    assert_eq!(done["output"], "after");
    let events = svc.db().job_events(done["tenant_id"].as_str().unwrap(), &looping, 0).await.unwrap();
    let cancelled_at = events.iter().find(|e| e.kind == "cancelled").unwrap().at;
    assert!(done["finished_at"].as_i64().unwrap() - cancelled_at < 60_000, "the loop was stopped, not waited for");
    // Both stay cancelled; the queued one never started.
    for id in [&looping, &queued] {
        let job = svc.get(&format!("/v1/jobs/{id}"), &acme).await;
        assert_eq!(job.body["status"], "cancelled", "{job:?}");
    }
    let tenant = done["tenant_id"].as_str().unwrap().to_string();
    let kinds: Vec<String> =
        svc.db().job_events(&tenant, &queued, 0).await.unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, ["queued", "cancelled"]);
    let again = svc.post(&format!("/v1/jobs/{looping}/cancel"), &acme, json!({})).await;
    assert_eq!((again.status, again.code()), (409, "conflict"));
    svc.stop().await;
}

/// Every route, with each kind of bad input; every answer is the one JSON error shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_rejects_bad_input_with_a_clear_error() {
    let svc = service(Backend::Sqlite, false, |c| c.limits.max_body_bytes = 64 * 1024).await;
    let (_, acme) = svc.tenant("acme").await;
    let bad_key = "ql_ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";
    let routes: &[(&str, &str)] = &[
        ("POST", "/v1/tenants"),
        ("GET", "/v1/tenants"),
        ("GET", "/v1/tenants/tn_x"),
        ("POST", "/v1/keys"),
        ("GET", "/v1/keys"),
        ("DELETE", "/v1/keys/key_x"),
        ("GET", "/v1/plugins"),
        ("POST", "/v1/plugins"),
        ("GET", "/v1/plugins/x"),
        ("DELETE", "/v1/plugins/x"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/job_x"),
        ("POST", "/v1/jobs/job_x/cancel"),
        ("GET", "/v1/jobs/job_x/events"),
        ("POST", "/v1/runs"),
        ("GET", "/v1/runs/job_x"),
        ("GET", "/v1/runs/job_x/capsule"),
        ("GET", "/metrics"),
    ];
    for (method, path) in routes {
        for (key, what) in [(None, "missing"), (Some(bad_key), "unknown"), (Some("not-a-key"), "malformed")] {
            let r = svc.send(method, path, key, None).await;
            assert_eq!((r.status, r.code()), (401, "unauthenticated"), "{method} {path} with a {what} key: {r:?}");
            assert!(r.headers.contains_key("x-request-id"));
        }
        let basic = svc
            .http
            .request(method.parse().unwrap(), format!("{}{path}", svc.base))
            .basic_auth("u", Some("p"))
            .send()
            .await
            .unwrap();
        assert_eq!(basic.status(), 401, "{method} {path} with basic auth");
    }

    // Bodies: malformed, wrong types, unknown fields, too large, not JSON.
    let bodies: &[(&str, &str, Value, Value)] = &[
        ("/v1/tenants", "name", json!({"name": 5}), json!({"name": "x", "colour": "red"})),
        ("/v1/keys", "role", json!({"name": "k", "role": "root"}), json!({"name": "k", "role": "viewer", "scope": 1})),
        ("/v1/plugins", "reference", json!({"reference": []}), json!({"reference": "r", "force": true})),
        ("/v1/jobs", "kind", json!({"kind": "dance", "input": {}}), json!({"kind": "run", "input": {}, "when": 1})),
        ("/v1/runs", "requirement", json!({"requirement": 7}), json!({"requirement": "x", "languages": []})),
    ];
    for (path, field, wrong, unknown) in bodies {
        let r = svc.send("POST", path, Some(ADMIN), Some("{]".into())).await;
        assert_eq!((r.status, r.code()), (400, "malformed_json"), "{path}: {r:?}");
        let r = svc.send("POST", path, Some(ADMIN), Some(wrong.to_string())).await;
        assert_eq!((r.status, r.code()), (400, "invalid_request"), "{path}: {r:?}");
        assert!(r.body["error"]["message"].as_str().unwrap().contains(field), "{path} names `{field}`: {r:?}");
        let r = svc.send("POST", path, Some(ADMIN), Some(unknown.to_string())).await;
        assert_eq!((r.status, r.code()), (400, "invalid_request"), "{path}: {r:?}");
        assert!(r.body["error"]["message"].as_str().unwrap().contains("unknown field"), "{path}: {r:?}");
        let huge = json!({"name": "x".repeat(100 * 1024)}).to_string();
        let r = svc.send("POST", path, Some(ADMIN), Some(huge)).await;
        assert_eq!((r.status, r.code()), (413, "body_too_large"), "{path}: {r:?}");
        let r = svc
            .http
            .post(format!("{}{path}", svc.base))
            .header("authorization", format!("Bearer {ADMIN}"))
            .body("name=x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415, "{path} without a JSON content type");
    }
    // Values that parse but are not acceptable.
    for (path, body, needle) in [
        ("/v1/jobs", json!({"kind": "run", "input": {"requirement": ""}}), "requirement"),
        ("/v1/jobs", json!({"kind": "run", "input": {"requirement": "x"}, "priority": 99}), "priority"),
        (
            "/v1/jobs",
            json!({"kind": "run", "input": {"requirement": "x", "max_repair_rounds": 50}}),
            "max_repair_rounds",
        ),
        ("/v1/jobs", json!({"kind": "call", "input": {"input": 1}}), "plugin"),
        ("/v1/jobs", json!({"kind": "run", "input": {"requirement": "x"}, "idempotency_key": ""}), "idempotency_key"),
        ("/v1/runs", json!({"requirement": "x".repeat(17 * 1024)}), "limit"),
        ("/v1/runs", json!({"requirement": "x", "script": "not json"}), "script is not a script"),
        ("/v1/runs", json!({"requirement": "x", "script": "{\"rules\": [{\"reply\": 1}]}"}), "reply"),
        ("/v1/runs", json!({"requirement": "x", "script": "{\"rules\": [], \"extra\": 1}"}), "extra"),
        ("/v1/runs", json!({"requirement": "x", "script": {"rules": [{"reply": 1}]}}), "rules[0].reply"),
        ("/v1/plugins", json!({"reference": "not a reference!"}), "reference"),
        ("/v1/plugins", json!({"reference": "r/x:1", "grants": {"hosts": ["bad host/x"]}}), "grants"),
    ] {
        let r = svc.post(path, &acme, body.clone()).await;
        assert_eq!((r.status, r.code()), (400, "invalid_request"), "{body}: {r:?}");
        assert!(r.body["error"]["message"].as_str().unwrap().contains(needle), "{body} names `{needle}`: {r:?}");
    }
    let r = svc.post("/v1/runs", &acme, json!({"requirement": "x", "provider": "ghost"})).await;
    assert_eq!((r.status, r.code()), (404, "not_found"), "a provider that is not installed is missing: {r:?}");
    assert!(r.text.contains("provider: plugin `ghost` is not installed"), "{r:?}");
    let r = svc
        .post("/v1/plugins", &acme, json!({"reference": "r/x:1", "grants": {"secrets": {"k": "QLAYER_ADMIN_KEY"}}}))
        .await;
    assert_eq!((r.status, r.code()), (403, "forbidden"), "a tenant cannot read the host's environment: {r:?}");
    // Query strings.
    for query in ["limit=1000", "limit=0", "limit=abc", "colour=red", "kind=dance"] {
        let r = svc.get(&format!("/v1/jobs?{query}"), &acme).await;
        assert_eq!((r.status, r.code()), (400, "invalid_request"), "?{query}: {r:?}");
    }
    // Unknown routes and methods.
    let r = svc.get("/v1/nothing", &acme).await;
    assert_eq!((r.status, r.code()), (404, "not_found"));
    let r = svc.send("PUT", "/v1/jobs", Some(&acme), None).await;
    assert_eq!((r.status, r.code()), (405, "method_not_allowed"));
    svc.stop().await;
}

/// Every route called with another tenant's key: zero successes, no changes, and nothing in any
/// answer that names the other tenant's objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_tenant_matrix() {
    let svc = service(Backend::Sqlite, true, |_| {}).await;
    let (acme_id, acme) = svc.tenant("acme").await;
    let (beta_id, beta) = svc.tenant("beta").await;
    let (acme_key_id, _) = svc.key(&acme, "developer").await;
    assert_eq!(svc.install(&acme, "tools/text-stats", &marketplace_plugin("text-stats")).await.status, 201);
    let job = svc
        .post("/v1/jobs", &acme, json!({"kind": "call", "input": {"plugin": "text-stats", "input": {"text": "a b"}}}))
        .await;
    let job = job.body["id"].as_str().unwrap().to_string();
    let run = svc.post("/v1/runs", &acme, json!({"requirement": "a Python CLI that greets"})).await;
    let run = run.body["id"].as_str().unwrap().to_string();
    svc.wait(&acme, &job).await;
    svc.wait(&acme, &run).await;
    let secrets = [acme_id.as_str(), "acme", acme_key_id.as_str(), job.as_str(), run.as_str(), "text-stats"];

    let routes: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", format!("/v1/tenants/{acme_id}"), None),
        ("DELETE", format!("/v1/keys/{acme_key_id}"), None),
        ("GET", "/v1/plugins/text-stats".into(), None),
        ("DELETE", "/v1/plugins/text-stats".into(), None),
        ("GET", format!("/v1/jobs/{job}"), None),
        ("POST", format!("/v1/jobs/{job}/cancel"), Some(json!({}))),
        ("GET", format!("/v1/jobs/{job}/events"), None),
        ("GET", format!("/v1/runs/{run}"), None),
        ("GET", format!("/v1/runs/{run}/capsule"), None),
        ("GET", format!("/v1/jobs/{run}/events"), None),
    ];
    for (method, path, body) in &routes {
        let r = svc.send(method, path, Some(&beta), body.as_ref().map(|b| b.to_string())).await;
        assert_eq!((r.status, r.code()), (404, "not_found"), "{method} {path}: {r:?}");
        // Exactly what a missing object of the same form gets.
        let fakes = [
            (acme_id.as_str(), "tn_000000000000000000000000"),
            (acme_key_id.as_str(), "key_000000000000000000000000"),
            (job.as_str(), "job_0000000000000000000000000000"),
            (run.as_str(), "job_0000000000000000000000000000"),
            ("text-stats", "text-stuff"),
        ];
        let mut fake = path.clone();
        for (real, stand_in) in fakes {
            fake = fake.replace(real, stand_in);
        }
        let m = svc.send(method, &fake, Some(&beta), body.as_ref().map(|b| b.to_string())).await;
        let (mut seen, mut expected) = (r.text.clone(), m.text.clone());
        for (real, stand_in) in fakes {
            seen = seen.replace(real, "X");
            expected = expected.replace(stand_in, "X");
        }
        assert_eq!(seen, expected, "{method} {path} answers like a missing object");
    }
    // Lists hold only beta's own objects.
    for path in ["/v1/plugins", "/v1/jobs", "/v1/keys", "/v1/jobs?kind=run"] {
        let r = svc.get(path, &beta).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        for s in secrets {
            assert!(!r.text.contains(s), "{path} leaks `{s}`: {r:?}");
        }
    }
    let own = svc.get(&format!("/v1/tenants/{beta_id}"), &beta).await;
    assert_eq!(own.status, 200);
    // Nothing of acme's changed.
    assert_eq!(svc.get("/v1/plugins/text-stats", &acme).await.status, 200);
    assert_eq!(svc.get(&format!("/v1/tenants/{acme_id}"), ADMIN).await.body["weight"], 1, "its share is unchanged");
    assert_eq!(svc.get(&format!("/v1/jobs/{job}"), &acme).await.body["status"], "succeeded");
    assert!(svc.get("/v1/keys", &acme).await.text.contains(&acme_key_id));
    assert!(
        !svc.get("/v1/keys", &acme).await.body["items"].as_array().unwrap().iter().any(|k| k["revoked_at"].is_i64())
    );
    assert_eq!(svc.get(&format!("/v1/runs/{run}/capsule"), &acme).await.status, 200);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_per_tenant_and_metrics_are_for_operators() {
    let svc = service(Backend::Sqlite, false, |c| {
        c.limits.requests_per_second = 0.5;
        c.limits.burst = 3.0;
    })
    .await;
    let (_, acme) = svc.tenant("acme").await;
    let (_, beta) = svc.tenant("beta").await;
    for _ in 0..3 {
        assert_eq!(svc.get("/v1/jobs", &acme).await.status, 200);
    }
    let r = svc.get("/v1/jobs", &acme).await;
    assert_eq!((r.status, r.code()), (429, "rate_limited"), "{r:?}");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(svc.get("/v1/jobs", &beta).await.status, 200, "another tenant is not limited by acme's traffic");

    let r = svc.send("GET", "/metrics", None, None).await;
    assert_eq!(r.status, 401);
    assert_eq!(svc.get("/metrics", &beta).await.status, 403);
    let r = svc.get("/metrics", ADMIN).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.text.contains("qlayer_http_requests_total{method=\"GET\",route=\"/v1/jobs\",status=\"429\"}"),
        "{}",
        r.text
    );
    assert!(r.text.contains("qlayer_http_request_duration_seconds_bucket"), "{}", r.text);
    assert!(r.text.contains("qlayer_jobs_queued"), "{}", r.text);
    assert!(r.text.contains("qlayer_http_errors_total{code=\"rate_limited\"}"), "{}", r.text);
    svc.stop().await;
}

/// `/openapi.json` is generated from the handlers; docs/openapi.json must be the same document.
/// `QLAYER_UPDATE_OPENAPI=1 cargo test -p qlayer-api openapi` rewrites it.
#[tokio::test]
async fn the_openapi_document_is_current() {
    let generated = qlayer_api::openapi_json();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    if std::env::var_os("QLAYER_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/openapi.json is stale: run `QLAYER_UPDATE_OPENAPI=1 cargo test -p qlayer-api openapi` and commit it"
    );
    let doc: Value = serde_json::from_str(&generated).unwrap();
    for path in [
        "/v1/tenants",
        "/v1/tenants/{id}",
        "/v1/keys",
        "/v1/keys/{id}",
        "/v1/plugins",
        "/v1/plugins/{name}",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/events",
        "/v1/runs",
        "/v1/runs/{id}",
        "/v1/runs/{id}/capsule",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is documented");
    }
    let svc = service(Backend::Sqlite, false, |_| {}).await;
    let served = svc.send("GET", "/openapi.json", None, None).await;
    assert_eq!(served.text, generated);
    svc.stop().await;
}

/// Issue 14 item 18: schemathesis (from PyPI) against a live server, with every check on: the
/// statuses, content types, headers and bodies the server answers are the ones the document
/// declares, schema-valid requests are accepted and invalid ones refused, in every phase
/// (examples, coverage, fuzzing, stateful). Both a tenant's key and an operator's are tried,
/// since their routes differ. Fails with schemathesis's report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_the_server_doing_what_the_openapi_document_says() {
    let st = qlayer_tests::python_tool("st", &["schemathesis==4.32.5"]);
    let dir = tempfile::tempdir().unwrap();
    // Rules the schema cannot state, each allowed for its operations: no registry is reachable
    // from the test machine, so a well-formed install reference gets the documented 502
    // `registry_unavailable`; a call graph's `after` must name tasks of the same graph, without
    // a cycle (a rule between fields), else 400; and the gateway's requests have rules between
    // fields (message order, `stream_options` only with `stream`, a model entry's deployments
    // naming installed providers, which no run has), else 400; a budget's currency must be the
    // server's and a key's limits within its tenant's, else 400; a run's `script` is only for
    // the `scripted` provider, else 400; a pipeline's `after` and `repair.steps` must name its
    // own steps without a cycle, and the plugins it names must be bundled or installed, of the
    // right kind, else 400.
    std::fs::write(
        dir.path().join("schemathesis.toml"),
        "[[operations]]\ninclude-name = \"POST /v1/plugins\"\n\
         checks.not_a_server_error.expected-statuses = [\"2xx\", \"3xx\", \"4xx\", \"502\"]\n\n\
         [[operations]]\ninclude-name = \"POST /v1/jobs\"\n\
         checks.positive_data_acceptance.expected-statuses = \
         [\"2xx\", \"3xx\", \"400\", \"401\", \"403\", \"404\", \"409\", \"429\", \"5xx\"]\n\n\
         [[operations]]\ninclude-name = \"POST /v1/runs\"\n\
         checks.positive_data_acceptance.expected-statuses = [\"2xx\", \"400\", \"401\", \"403\", \"404\", \"409\", \"429\"]\n\n\
         [[operations]]\ninclude-name = \"POST /v1/chat/completions\"\n\
         checks.positive_data_acceptance.expected-statuses = [\"2xx\", \"400\", \"401\", \"403\", \"404\"]\n\
         checks.negative_data_rejection.expected-statuses = [\"400\", \"401\", \"403\", \"404\", \"413\", \"422\"]\n\n\
         [[operations]]\ninclude-name = \"POST /v1/messages\"\n\
         checks.positive_data_acceptance.expected-statuses = [\"2xx\", \"400\", \"401\", \"403\", \"404\"]\n\
         checks.negative_data_rejection.expected-statuses = [\"400\", \"401\", \"403\", \"404\", \"413\", \"422\"]\n\n\
         [[operations]]\ninclude-name = \"POST /v1/messages/count_tokens\"\n\
         checks.positive_data_acceptance.expected-statuses = [\"2xx\", \"400\", \"401\", \"403\", \"404\"]\n\
         checks.negative_data_rejection.expected-statuses = [\"400\", \"401\", \"403\", \"404\", \"413\", \"422\"]\n\n\
         [[operations]]\ninclude-name = \"POST /v1/embeddings\"\n\
         checks.positive_data_acceptance.expected-statuses = [\"2xx\", \"400\", \"401\", \"403\", \"404\"]\n\n\
         [[operations]]\ninclude-name = \"PUT /v1/models/{name}\"\n\
         checks.positive_data_acceptance.expected-statuses = [\"2xx\", \"400\", \"401\", \"403\", \"404\"]\n\n\
         [[operations]]\ninclude-name = \"PUT /v1/pipelines/{name}\"\n\
         checks.positive_data_acceptance.expected-statuses = [\"2xx\", \"400\", \"401\", \"403\"]\n\n\
         [[operations]]\ninclude-name = \"PUT /v1/tenants/{id}/limits\"\n\
         checks.positive_data_acceptance.expected-statuses = [\"2xx\", \"400\", \"401\", \"403\", \"404\"]\n\n\
         [[operations]]\ninclude-name = \"PUT /v1/keys/{id}/limits\"\n\
         checks.positive_data_acceptance.expected-statuses = [\"2xx\", \"400\", \"401\", \"403\", \"404\"]\n",
    )
    .unwrap();
    for operator in [false, true] {
        // A server per key: the operator's run creates, shares and revokes keys and tenants.
        let svc = service(Backend::Sqlite, false, |_| {}).await;
        let key = if operator { ADMIN.to_string() } else { svc.tenant("acme").await.1 };
        let (st, base, dir) = (st.clone(), svc.base.clone(), dir.path().to_path_buf());
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(st)
                .current_dir(&dir)
                .args(["run", &format!("{base}/openapi.json"), "--checks", "all"])
                .args(["--header", &format!("Authorization: Bearer {key}")])
                .args(["--max-examples", "25", "--seed", "14", "--workers", "2", "--request-timeout", "30"])
                .env("NO_COLOR", "1")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "schemathesis found the server and its document apart (operator key: {operator}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        svc.stop().await;
    }
}

/// gRPC through a real tonic client: the same operations, checks and tenant isolation as REST,
/// the job event stream, and server reflection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_with_a_real_tonic_client() {
    use qlayer_api::grpc::proto::{
        self, jobs_client::JobsClient, runs_client::RunsClient, tenants_client::TenantsClient,
    };
    use tonic::Code;
    let svc = service(Backend::Sqlite, false, |_| {}).await;
    let endpoint = format!("http://{}", svc.running.as_ref().unwrap().grpc_addr);
    let channel = tonic::transport::Endpoint::from_shared(endpoint).unwrap().connect().await.unwrap();
    let with_key = |key: Option<String>| {
        move |mut req: tonic::Request<()>| {
            if let Some(key) = &key {
                req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
            }
            Ok(req)
        }
    };
    let mut tenants = TenantsClient::with_interceptor(channel.clone(), with_key(Some(ADMIN.into())));
    let acme = tenants.create_tenant(proto::CreateTenantRequest { name: "acme".into() }).await.unwrap().into_inner();
    let acme_key = acme.api_key.clone();
    let beta = tenants.create_tenant(proto::CreateTenantRequest { name: "beta".into() }).await.unwrap().into_inner();
    let dup = tenants.create_tenant(proto::CreateTenantRequest { name: "acme".into() }).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");
    assert_eq!(dup.metadata().get("x-qlayer-code").unwrap(), "conflict");

    // Credentials: none, unknown, and a tenant key on an operator method.
    let mut anonymous = TenantsClient::with_interceptor(channel.clone(), with_key(None));
    let e = anonymous.list_tenants(proto::ListRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let mut stranger =
        TenantsClient::with_interceptor(channel.clone(), with_key(Some(format!("ql_{}", "e".repeat(64)))));
    assert_eq!(stranger.list_tenants(proto::ListRequest::default()).await.unwrap_err().code(), Code::Unauthenticated);
    let mut as_acme = TenantsClient::with_interceptor(channel.clone(), with_key(Some(acme_key.clone())));
    let e = as_acme.list_tenants(proto::ListRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = as_acme.get_tenant(proto::IdRequest { id: beta.tenant.as_ref().unwrap().id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // A run, watched as a server stream until it ends, then its capsule.
    let mut runs = RunsClient::with_interceptor(channel.clone(), with_key(Some(acme_key.clone())));
    let run = runs
        .submit_run(proto::SubmitRunRequest { requirement: "a Python CLI that greets".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((run.kind.as_str(), run.status.as_str()), ("run", "queued"));
    let mut jobs = JobsClient::with_interceptor(channel.clone(), with_key(Some(acme_key.clone())));
    let mut stream =
        jobs.watch_job(proto::WatchJobRequest { id: run.id.clone(), after_seq: 0 }).await.unwrap().into_inner();
    let mut kinds = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        serde_json::from_str::<Value>(&event.data_json).unwrap();
        kinds.push(event.kind);
    }
    assert_eq!(kinds.first().map(String::as_str), Some("queued"));
    assert_eq!(kinds.last().map(String::as_str), Some("succeeded"), "{kinds:?}");
    let capsule = runs.get_capsule(proto::IdRequest { id: run.id.clone() }).await.unwrap().into_inner();
    assert_eq!(capsule.media_type, "application/gzip");
    assert_eq!(&capsule.data[..2], &[0x1f, 0x8b], "gzip magic");
    let page = jobs.list_jobs(proto::ListJobsRequest { limit: 10, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(page.items.len(), 1);

    // Bad input names what is wrong.
    let e = jobs
        .submit_job(proto::SubmitJobRequest { kind: "call".into(), input_json: "{".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("input_json"), "{e:?}");
    let e = jobs
        .submit_job(proto::SubmitJobRequest { kind: "dance".into(), input_json: "{}".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("dance"), "{e:?}");
    let e = jobs.list_jobs(proto::ListJobsRequest { limit: 1000, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Another tenant: NOT_FOUND exactly like a missing job, and nothing changes.
    let mut as_beta = JobsClient::with_interceptor(channel.clone(), with_key(Some(beta.api_key.clone())));
    let theirs = as_beta.get_job(proto::IdRequest { id: run.id.clone() }).await.unwrap_err();
    let missing = as_beta.get_job(proto::IdRequest { id: "job_missing".into() }).await.unwrap_err();
    assert_eq!((theirs.code(), missing.code()), (Code::NotFound, Code::NotFound));
    assert_eq!(theirs.message().replace(&run.id, "X"), missing.message().replace("job_missing", "X"));
    let e = as_beta.cancel_job(proto::IdRequest { id: run.id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let mut beta_runs = RunsClient::with_interceptor(channel.clone(), with_key(Some(beta.api_key.clone())));
    assert_eq!(
        beta_runs.get_capsule(proto::IdRequest { id: run.id.clone() }).await.unwrap_err().code(),
        Code::NotFound
    );
    let e = as_beta.watch_job(proto::WatchJobRequest { id: run.id.clone(), after_seq: 0 }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(as_beta.list_jobs(proto::ListJobsRequest::default()).await.unwrap().into_inner().items.is_empty());

    // Reflection lists the services.
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    let expected = ["qlayer.v1.Tenants", "qlayer.v1.Keys", "qlayer.v1.Plugins", "qlayer.v1.Jobs", "qlayer.v1.Runs"];
    for service in expected.iter().chain(&["grpc.health.v1.Health"]) {
        assert!(names.iter().any(|n| n == service), "{service} in {names:?}");
    }
    // The same through reflection v1alpha, all older clients speak.
    {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut reflection = ServerReflectionClient::new(channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers =
            reflection.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.message().await.unwrap().unwrap().message_response
        else {
            panic!("no service list over v1alpha")
        };
        let alpha: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for service in expected {
            assert!(alpha.iter().any(|n| n == service), "{service} in {alpha:?}");
        }
    }
    // grpc.health.v1.Health, as Kubernetes' gRPC probe and grpc_health_probe ask it (no key).
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let mut health = HealthClient::new(channel);
    let status = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status;
    assert_eq!(status, ServingStatus::Serving as i32);
    svc.stop().await;
}

/// Stopping hands unfinished work back: a job running at shutdown is picked up by the next
/// start, and one queued behind it completes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_jobs_are_handed_back_and_resumed_at_the_next_start() {
    let mut svc = service(Backend::Sqlite, true, |c| c.jobs.concurrency = 1).await;
    let (acme_id, acme) = svc.tenant("acme").await;
    assert_eq!(svc.install(&acme, "test/hostile", &hostile(64, 60_000)).await.status, 201);
    let call = |input: &str| json!({"kind": "call", "input": {"plugin": "hostile", "input": input}});
    let looping = svc.post("/v1/jobs", &acme, call("loop")).await.body["id"].as_str().unwrap().to_string();
    let waiting = svc.post("/v1/jobs", &acme, call("hello")).await.body["id"].as_str().unwrap().to_string();
    for _ in 0..600 {
        if svc.get(&format!("/v1/jobs/{looping}"), &acme).await.body["status"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stop with a short grace: the loop cannot finish in it.
    let dir = svc._dir.path().to_path_buf();
    let running = svc.running.take().unwrap();
    running.stop().await.unwrap();

    let mut config = ServeConfig::default();
    config.server.rest_addr = "127.0.0.1:0".parse().unwrap();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.auth.admin_key = Some(ADMIN.into());
    config.limits.requests_per_second = 0.0;
    config.jobs.concurrency = 2;
    let restarted = qlayer_api::serve::start(config, dir).await.unwrap();
    svc.base = format!("http://{}", restarted.rest_addr);
    svc.running = Some(restarted);
    let done = svc.wait(&acme, &waiting).await;
    assert_eq!((done["status"].as_str(), done["output"].as_str()), (Some("succeeded"), Some("hello")), "{done}");
    let events = svc.db().job_events(&acme_id, &looping, 0).await.unwrap();
    assert!(
        events.iter().any(|e| e.kind == "started" && e.data["resumed"] == true),
        "the running job was resumed: {events:?}"
    );
    let r = svc.post(&format!("/v1/jobs/{looping}/cancel"), &acme, json!({})).await;
    assert_eq!(r.body["status"], "cancelled");
    svc.stop().await;
}

/// A request that outlives `request-timeout-ms` is stopped and answered 503 `timeout` (an install
/// pulls from the registry: far more than the 1 ms allowed here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_its_deadline_is_stopped_with_503_timeout() {
    let svc = service(Backend::Sqlite, true, |c| c.limits.request_timeout_ms = 1).await;
    let tenant = svc.db().create_tenant("acme").await.unwrap();
    let (_, key) = svc.db().create_key(&tenant.id, "dev", qlayer_db::Role::Developer).await.unwrap().unwrap();
    let r = svc.install(key.expose(), "tools/text-stats", &marketplace_plugin("text-stats")).await;
    assert_eq!((r.status, r.code()), (503, "timeout"), "{r:?}");
    assert!(r.body["error"]["message"].as_str().unwrap().contains("1 ms"), "{r:?}");
    svc.stop().await;
}

/// Every gRPC method: no key and an unknown key are UNAUTHENTICATED; with another tenant's key,
/// every method on that tenant's objects is NOT_FOUND and changes nothing; a message over the
/// size limit is refused before it is decoded (OUT_OF_RANGE, tonic's code for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_every_method_checks_the_caller_and_the_other_tenant_sees_nothing() {
    use qlayer_api::grpc::proto::{
        self, jobs_client::JobsClient, keys_client::KeysClient, plugins_client::PluginsClient, runs_client::RunsClient,
        tenants_client::TenantsClient,
    };
    use tonic::Code;
    let svc = service(Backend::Sqlite, true, |c| c.limits.max_body_bytes = 64 * 1024).await;
    let (acme_id, acme) = svc.tenant("acme").await;
    let (_, beta) = svc.tenant("beta").await;
    let (acme_key_id, _) = svc.key(&acme, "viewer").await;
    assert_eq!(svc.install(&acme, "tools/text-stats", &marketplace_plugin("text-stats")).await.status, 201);
    let run = svc.post("/v1/runs", &acme, json!({"requirement": "a Python CLI that greets"})).await;
    let run = run.body["id"].as_str().unwrap().to_string();
    svc.wait(&acme, &run).await;

    let endpoint = format!("http://{}", svc.running.as_ref().unwrap().grpc_addr);
    let channel = tonic::transport::Endpoint::from_shared(endpoint).unwrap().connect().await.unwrap();
    let as_key = |key: Option<String>| {
        move |mut req: tonic::Request<()>| {
            if let Some(key) = &key {
                req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
            }
            Ok(req)
        }
    };
    // Calls every method as `key`; returns (method, code) for each.
    let call_all = |key: Option<String>| {
        let channel = channel.clone();
        let (acme_id, acme_key_id, run) = (acme_id.clone(), acme_key_id.clone(), run.clone());
        async move {
            let i = || as_key(key.clone());
            let mut t = TenantsClient::with_interceptor(channel.clone(), i());
            let mut k = KeysClient::with_interceptor(channel.clone(), i());
            let mut p = PluginsClient::with_interceptor(channel.clone(), i());
            let mut j = JobsClient::with_interceptor(channel.clone(), i());
            let mut r = RunsClient::with_interceptor(channel.clone(), i());
            let id = |s: &str| proto::IdRequest { id: s.to_string() };
            let code = |r: Result<(), tonic::Status>| r.err().map(|e| e.code()).unwrap_or(Code::Ok);
            vec![
                (
                    "CreateTenant",
                    code(t.create_tenant(proto::CreateTenantRequest { name: "x".into() }).await.map(drop)),
                ),
                ("ListTenants", code(t.list_tenants(proto::ListRequest::default()).await.map(drop))),
                ("GetTenant", code(t.get_tenant(id(&acme_id)).await.map(drop))),
                (
                    "SetTenantShare",
                    code(
                        t.set_tenant_share(proto::SetTenantShareRequest {
                            id: acme_id.clone(),
                            weight: 1000,
                            max_running: 0,
                        })
                        .await
                        .map(drop),
                    ),
                ),
                (
                    "SetTenantLimits",
                    code(
                        t.set_tenant_limits(proto::SetLimitsRequest {
                            id: acme_id.clone(),
                            rpm: Some(1),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    ),
                ),
                (
                    "SetKeyLimits",
                    code(
                        k.set_key_limits(proto::SetLimitsRequest {
                            id: acme_key_id.clone(),
                            rpm: Some(1),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    ),
                ),
                (
                    "CreateKey",
                    code(
                        k.create_key(proto::CreateKeyRequest {
                            name: "x".into(),
                            role: "viewer".into(),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    ),
                ),
                ("ListKeys", code(k.list_keys(proto::Empty {}).await.map(drop))),
                ("RevokeKey", code(k.revoke_key(id(&acme_key_id)).await.map(drop))),
                ("ListPlugins", code(p.list_plugins(proto::Empty {}).await.map(drop))),
                ("GetPlugin", code(p.get_plugin(proto::NameRequest { name: "text-stats".into() }).await.map(drop))),
                (
                    "InstallPlugin",
                    code(
                        p.install_plugin(proto::InstallPluginRequest { reference: "not a ref!".into(), grants: None })
                            .await
                            .map(drop),
                    ),
                ),
                (
                    "RemovePlugin",
                    code(p.remove_plugin(proto::NameRequest { name: "text-stats".into() }).await.map(drop)),
                ),
                (
                    "SubmitJob",
                    code(
                        j.submit_job(proto::SubmitJobRequest {
                            kind: "run".into(),
                            input_json: "{}".into(),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    ),
                ),
                ("GetJob", code(j.get_job(id(&run)).await.map(drop))),
                ("ListJobs", code(j.list_jobs(proto::ListJobsRequest::default()).await.map(drop))),
                ("CancelJob", code(j.cancel_job(id(&run)).await.map(drop))),
                ("ListJobTasks", code(j.list_job_tasks(id(&run)).await.map(drop))),
                (
                    "WatchJob",
                    code(j.watch_job(proto::WatchJobRequest { id: run.clone(), after_seq: 0 }).await.map(drop)),
                ),
                ("SubmitRun", code(r.submit_run(proto::SubmitRunRequest::default()).await.map(drop))),
                ("GetRun", code(r.get_run(id(&run)).await.map(drop))),
                ("GetCapsule", code(r.get_capsule(id(&run)).await.map(drop))),
                (
                    "ApproveRun",
                    code(r.approve_run(proto::GateRequest { id: run.clone(), comment: None }).await.map(drop)),
                ),
                (
                    "RejectRun",
                    code(
                        r.reject_run(proto::GateRequest { id: run.clone(), comment: Some("x".into()) }).await.map(drop),
                    ),
                ),
                (
                    "PublishRun",
                    code(
                        r.publish_run(proto::PublishRequest {
                            id: run.clone(),
                            reference: "127.0.0.1:1/capsules/x:1".into(),
                        })
                        .await
                        .map(drop),
                    ),
                ),
            ]
        }
    };
    for key in [None, Some(format!("ql_{}", "b".repeat(64))), Some("not-a-key".to_string())] {
        for (method, code) in call_all(key.clone()).await {
            assert_eq!(code, Code::Unauthenticated, "{method} with key {key:?}");
        }
    }
    // With beta's admin key: operator methods are refused, lists are beta's own (empty), and every
    // method on acme's objects is NOT_FOUND.
    let expected = |method: &str| match method {
        "CreateTenant" | "ListTenants" | "SetTenantShare" | "SetTenantLimits" => Code::PermissionDenied,
        "ListKeys" | "ListPlugins" | "ListJobs" | "CreateKey" => Code::Ok,
        "InstallPlugin" | "SubmitJob" | "SubmitRun" => Code::InvalidArgument,
        _ => Code::NotFound,
    };
    for (method, code) in call_all(Some(beta.clone())).await {
        assert_eq!(code, expected(method), "{method} with another tenant's key");
    }
    let mut beta_jobs = JobsClient::with_interceptor(channel.clone(), as_key(Some(beta.clone())));
    assert!(beta_jobs.list_jobs(proto::ListJobsRequest::default()).await.unwrap().into_inner().items.is_empty());
    let mut beta_plugins = PluginsClient::with_interceptor(channel.clone(), as_key(Some(beta.clone())));
    assert!(beta_plugins.list_plugins(proto::Empty {}).await.unwrap().into_inner().items.is_empty());
    // Nothing of acme's changed.
    assert_eq!(svc.get("/v1/plugins/text-stats", &acme).await.status, 200);
    assert_eq!(svc.get(&format!("/v1/tenants/{acme_id}"), ADMIN).await.body["weight"], 1, "its share is unchanged");
    assert_eq!(svc.get(&format!("/v1/runs/{run}"), &acme).await.body["status"], "succeeded");
    let keys = svc.get("/v1/keys", &acme).await;
    assert!(keys.body["items"].as_array().unwrap().iter().all(|k| k["revoked_at"].is_null()), "{keys:?}");
    let limits = svc.get("/v1/usage", &acme).await;
    assert_eq!(limits.body["limits"], json!([]), "no limit was set on acme or its keys: {limits:?}");

    // A message over the limit.
    let mut acme_jobs = JobsClient::with_interceptor(channel, as_key(Some(acme.clone())));
    let huge = json!({"requirement": "x".repeat(100 * 1024)}).to_string();
    let e = acme_jobs
        .submit_job(proto::SubmitJobRequest { kind: "run".into(), input_json: huge, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "an oversized message: {e:?}");
    assert!(e.message().contains("too large"), "{e:?}");
    svc.stop().await;
}

/// Issue 14 item 11: a tenant cannot point the host, or a plugin, at the operator's network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_reach_the_operators_network_through_grants_or_install_references() {
    let svc = service(Backend::Sqlite, true, |_| {}).await;
    let (_, acme) = svc.tenant("acme").await;
    let registry = svc.registry.as_ref().unwrap().addr.clone();
    // Push the fetcher (asks for `*`) so that installs below only differ in their grants.
    let reference = format!("{registry}/test/fetcher:1.0.0");
    let pusher = qlayer_marketplace::Marketplace::open_local(
        svc._dir.path().join("pusher"),
        qlayer_marketplace::MarketplaceConfig { insecure_registries: vec![registry.clone()], ..Default::default() },
    )
    .await
    .unwrap();
    pusher.push(&qlayer_tests::fetcher(), &reference, None).await.unwrap();
    let own = svc.base.trim_start_matches("http://").to_string();
    for host in [own.as_str(), "169.254.169.254", "10.0.0.1", "[::1]:5432", "127.0.0.1:6379", "0.0.0.0:80"] {
        let r = svc.post("/v1/plugins", &acme, json!({"reference": reference, "grants": {"hosts": [host]}})).await;
        assert_eq!(r.status, 403, "refused by the operator's policy: {host}: {r:?}");
        assert_eq!(r.body["error"]["code"], "forbidden", "{r:?}");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("network policy does not allow") && message.contains(host.trim_matches(['[', ']'])),
            "{message}"
        );
    }
    // `*` cannot be granted: a 400 naming the grant, not a 500.
    let r = svc.post("/v1/plugins", &acme, json!({"reference": reference, "grants": {"hosts": ["*"]}})).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.text.contains("`*` cannot be granted"), "{r:?}");
    // An install reference on an internal address is refused before any connection, with the
    // same words whether the port is open (the service's own) or closed.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut messages = Vec::new();
    for target in [own.clone(), format!("127.0.0.1:{closed}")] {
        let r = svc.post("/v1/plugins", &acme, json!({"reference": format!("{target}/x:1")})).await;
        assert_eq!((r.status, r.code()), (403, "forbidden"), "{target}: {r:?}");
        let message = r.body["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("loopback address, which the operator's network policy does not allow"), "{message}");
        messages.push(message.replace(&target, "TARGET"));
    }
    assert_eq!(messages[0], messages[1], "an open and a closed port must look the same");
    // Nothing was installed.
    let r = svc.get("/v1/plugins", &acme).await;
    assert_eq!(r.body["items"].as_array().map(Vec::len), Some(0), "{r:?}");
}

/// Issue 14 item 16: unauthenticated floods are limited per client address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_limited_per_client_address() {
    let svc = service(Backend::Sqlite, false, |c| {
        c.limits.auth_failures_per_second = 0.1;
        c.limits.auth_failure_burst = 5.0;
    })
    .await;
    let (_, acme) = svc.tenant("acme").await;
    let bad = |i: usize| format!("ql_{:064x}", i);
    for i in 0..5 {
        assert_eq!(svc.get("/v1/jobs", &bad(i)).await.status, 401);
    }
    // The sixth failure in a row from this address: 429 with Retry-After, before any lookup.
    let r = svc.get("/v1/jobs", &bad(99)).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.headers.get("retry-after").is_some(), "{r:?}");
    // Even a good key waits from this address (it could be the attacker's own).
    assert_eq!(svc.get("/v1/jobs", &acme).await.status, 429);
    // gRPC counts against the same address.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", svc.running.as_ref().unwrap().grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut jobs = qlayer_api::grpc::proto::jobs_client::JobsClient::new(channel);
    let mut request = tonic::Request::new(qlayer_api::grpc::proto::ListJobsRequest::default());
    request.metadata_mut().insert("authorization", format!("Bearer {}", bad(7)).parse().unwrap());
    assert_eq!(jobs.list_jobs(request).await.unwrap_err().code(), tonic::Code::ResourceExhausted);
    svc.stop().await;
}

/// Issue 14 item 17: a tenant cannot lock itself out, and an operator can let one back in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_admin_key_stays_and_operators_issue_keys_for_a_tenant() {
    let svc = service(Backend::Sqlite, false, |_| {}).await;
    let (acme_id, acme) = svc.tenant("acme").await;
    let (beta_id, beta) = svc.tenant("beta").await;
    let keys = svc.get("/v1/keys", &acme).await;
    let only = keys.body["items"][0]["id"].as_str().unwrap().to_string();
    let r = svc.delete(&format!("/v1/keys/{only}"), &acme).await;
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.text.contains("last admin key"), "{r:?}");
    assert_eq!(svc.get("/v1/keys", &acme).await.status, 200, "the key still works");
    // An operator issues acme an admin key; with two, acme may revoke the old one.
    let r = svc.post("/v1/keys", ADMIN, json!({"name": "recovery", "role": "admin", "tenant_id": acme_id})).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["key"]["tenant_id"], acme_id.as_str(), "{r:?}");
    let recovery = r.body["api_key"].as_str().unwrap().to_string();
    assert_eq!(svc.delete(&format!("/v1/keys/{only}"), &recovery).await.status, 204);
    assert_eq!(svc.get("/v1/keys", &acme).await.status, 401);
    // A tenant's admin cannot issue keys elsewhere: the other tenant looks missing.
    let r = svc.post("/v1/keys", &recovery, json!({"name": "x", "role": "admin", "tenant_id": beta_id})).await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = svc.post("/v1/keys", &recovery, json!({"name": "x", "role": "admin", "tenant_id": "tn_missing"})).await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = svc.post("/v1/keys", ADMIN, json!({"name": "x", "role": "admin", "tenant_id": "tn_missing"})).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(svc.get("/v1/keys", &beta).await.body["items"].as_array().unwrap().len(), 1, "beta unchanged");
    svc.stop().await;
}

/// Issue 14 item 15: a client that never finishes its headers is cut off, and so is an idle
/// keep-alive connection; others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_and_idle_connections_are_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let svc = service(Backend::Sqlite, false, |c| c.server.header_timeout_ms = 300).await;
    let addr = svc.running.as_ref().unwrap().rest_addr;
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Served while the slow one hangs.
    assert_eq!(svc.send("GET", "/healthz", None, None).await.status, 200);
    // The bound only keeps a broken build from hanging CI; the server closes at about 300 ms.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the slow-header connection was never closed");
    let read = tokio::time::timeout(Duration::from_secs(30), idle.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the idle connection was never closed");
    svc.stop().await;
}

/// Issue 14 item 15, gRPC: a connection that sends nothing, or only part of the HTTP/2 preface,
/// is cut after the header timeout, while a real client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connections_without_a_whole_preface_are_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let svc = service(Backend::Sqlite, false, |c| c.server.header_timeout_ms = 300).await;
    let addr = svc.running.as_ref().unwrap().grpc_addr;
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    // The bound only keeps a broken build from hanging CI; the server closes at about 300 ms.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), silent.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the silent gRPC connection was never closed");
    let read = tokio::time::timeout(Duration::from_secs(30), half.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the half-preface gRPC connection was never closed");
    svc.stop().await;
}
