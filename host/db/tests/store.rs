//! The same store tests on SQLite (a temp file) and on PostgreSQL (the machine's server, a fresh
//! database per test, dropped afterwards). Set QLAYER_TEST_POSTGRES to use another server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qlayer_db::{
    AuditCheck, AuditEntry, Backend, CancelOutcome, Db, DbError, JobKind, JobStatus, Lease, NewJob, NewTask, Role,
    TaskStatus,
};
use sqlx::Connection as _;

/// A database for one test, removed when dropped (PostgreSQL) or with its temp dir (SQLite).
struct TestDb {
    db: Db,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg.take() {
            // Drop the database on a fresh runtime: the test's own runtime is shutting down.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    if let Ok(mut conn) = sqlx::AnyConnection::connect(&admin).await {
                        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&mut conn)
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

fn postgres_admin_url() -> String {
    std::env::var("QLAYER_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn open(backend: Backend) -> TestDb {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open_sqlite(&dir.path().join("qlayer.db")).await.unwrap();
            TestDb { db, _dir: Some(dir), pg: None }
        }
        Backend::Postgres => {
            sqlx::any::install_default_drivers();
            let admin = postgres_admin_url();
            let name = format!("qlayer_test_{}_{}", std::process::id(), rand_suffix());
            let mut conn = sqlx::AnyConnection::connect(&admin)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed by this test: {e}"));
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.unwrap();
            let url = match admin.rsplit_once('/') {
                Some((base, _)) => format!("{base}/{name}"),
                None => panic!("bad QLAYER_TEST_POSTGRES"),
            };
            let db = Db::open(&url).await.unwrap();
            TestDb { db, _dir: None, pg: Some((admin, name)) }
        }
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{nanos}_{}", N.fetch_add(1, Ordering::Relaxed))
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Postgres).await })*
        }
    };
}

on_both!(
    tenants_are_created_listed_and_unique,
    keys_are_shown_once_stored_hashed_and_scoped_to_their_tenant,
    revoked_keys_stop_working,
    a_tenants_last_admin_key_cannot_be_revoked,
    the_admin_bootstrap_key,
    the_audit_chain_detects_changed_removed_and_reordered_records,
    migrations_are_idempotent,
    jobs_are_persisted_idempotent_paginated_and_scoped_to_their_tenant,
    concurrent_submissions_never_take_a_tenant_past_its_open_task_limit,
    job_lifecycle_events_cancellation_and_artifacts,
    a_lease_has_one_holder_and_fences_late_results,
    a_dag_runs_in_dependency_order_and_passes_outputs,
    a_task_adds_tasks_to_its_job_and_ends_it_with_its_output_and_artifact,
    retries_wait_failures_cancel_the_rest_and_leases_come_back,
    model_tables_and_usage_sums_are_kept_per_tenant,
);

/// The gateway's state: model entries are replaced and removed per tenant, and usage sums group
/// by model, key and day, filtered by time and key, never across tenants.
async fn model_tables_and_usage_sums_are_kept_per_tenant(backend: Backend) {
    use qlayer_db::{UsageFilter, UsageGroup, UsageRecord};
    let t = open(backend).await;
    let db = &t.db;
    db.put_model("tn_a", "chat", r#"{"deployments": []}"#).await.unwrap();
    db.put_model("tn_a", "chat", r#"{"strategy": "cost"}"#).await.unwrap();
    db.put_model("tn_b", "chat", "{}").await.unwrap();
    let a = db.models("tn_a").await.unwrap();
    assert_eq!((a.len(), a[0].spec.as_str()), (1, r#"{"strategy": "cost"}"#), "replaced, not added");
    assert!(!db.delete_model("tn_a", "other").await.unwrap());
    assert!(db.delete_model("tn_b", "chat").await.unwrap());
    assert_eq!(db.models("tn_a").await.unwrap().len(), 1, "another tenant's delete left it");
    let record = |tenant: &str, key: &str, model: &str, tokens: i64, at: i64, status: &str| UsageRecord {
        tenant_id: tenant.into(),
        key_id: key.into(),
        endpoint: "chat".into(),
        model: model.into(),
        deployment: "openai/x".into(),
        prompt_tokens: tokens,
        completion_tokens: tokens * 2,
        cost_nanos: tokens * 1_000,
        latency_us: 10,
        ttft_us: None,
        cache: if status == "hit" { "hit".into() } else { "miss".into() },
        status: if status == "hit" { "ok".into() } else { status.into() },
        at,
    };
    let day = 86_400_000;
    let records = vec![
        record("tn_a", "k1", "chat", 10, 5, "ok"),
        record("tn_a", "k1", "chat", 20, day + 5, "hit"),
        record("tn_a", "k2", "embed", 1, day + 6, "upstream_timeout"),
        record("tn_b", "k9", "chat", 1_000, 5, "ok"),
    ];
    // More rows than one statement's chunk, in one call.
    let many: Vec<UsageRecord> = (0..1_100).map(|i| record("tn_c", "k", "m", 1, i, "ok")).collect();
    db.record_usage(&records).await.unwrap();
    db.record_usage(&many).await.unwrap();
    let all = db.usage("tn_a", &UsageFilter::default(), UsageGroup::All).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].requests, all[0].errors, all[0].cache_hits), (3, 1, 1), "{all:?}");
    assert_eq!((all[0].prompt_tokens, all[0].completion_tokens, all[0].cost_nanos), (31, 62, 31_000));
    let by_model = db.usage("tn_a", &UsageFilter::default(), UsageGroup::Model).await.unwrap();
    assert_eq!(by_model.iter().map(|s| (s.key.as_str(), s.requests)).collect::<Vec<_>>(), [("chat", 2), ("embed", 1)]);
    let by_day = db.usage("tn_a", &UsageFilter::default(), UsageGroup::Day).await.unwrap();
    assert_eq!(
        by_day.iter().map(|s| (s.key.clone(), s.requests)).collect::<Vec<_>>(),
        [("0".to_string(), 1), (day.to_string(), 2)]
    );
    let k1_later = UsageFilter { from: Some(6), key_id: Some("k1".into()), ..Default::default() };
    let sums = db.usage("tn_a", &k1_later, UsageGroup::Key).await.unwrap();
    assert_eq!(sums.iter().map(|s| (s.key.as_str(), s.prompt_tokens)).collect::<Vec<_>>(), [("k1", 20)]);
    let none = db
        .usage("tn_a", &UsageFilter { key_id: Some("k9".into()), ..Default::default() }, UsageGroup::All)
        .await
        .unwrap();
    assert!(none.is_empty(), "another tenant's key shows nothing: {none:?}");
    let c = db.usage("tn_c", &UsageFilter::default(), UsageGroup::All).await.unwrap();
    assert_eq!(c[0].requests, 1_100);
}

fn one_task(plugin: &str) -> Vec<NewTask> {
    task("call", plugin, serde_json::json!("x"), &[])
}

fn task(name: &str, plugin: &str, input: serde_json::Value, after: &[&str]) -> Vec<NewTask> {
    vec![NewTask {
        name: name.into(),
        kind: "call".into(),
        plugin: plugin.into(),
        input,
        depends_on: after.iter().map(|s| s.to_string()).collect(),
        max_attempts: 3,
    }]
}

fn lease_of(task: &qlayer_db::Task, owner: &str) -> Lease {
    Lease { task_id: task.id.clone(), job_id: task.job_id.clone(), owner: owner.into(), attempt: task.attempts }
}

async fn tenants_are_created_listed_and_unique(backend: Backend) {
    let t = open(backend).await;
    let acme = t.db.create_tenant("acme").await.unwrap();
    let globex = t.db.create_tenant("globex").await.unwrap();
    assert!(acme.id.starts_with("tn_"));
    assert_eq!(t.db.tenant(&acme.id).await.unwrap(), Some(acme.clone()));
    assert_eq!(t.db.tenant("tn_missing").await.unwrap(), None);
    assert!(matches!(t.db.create_tenant("acme").await, Err(DbError::Conflict(_))));
    let err = t.db.create_tenant("Not Valid").await.unwrap_err();
    assert!(err.to_string().contains("tenant name"), "{err}");

    // Keyset pagination.
    let mut ids = [acme.id.clone(), globex.id.clone()];
    ids.sort();
    let first = t.db.tenants(None, 1).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].id, ids[0]);
    let second = t.db.tenants(Some(&first[0].id), 10).await.unwrap();
    assert_eq!(second.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), vec![ids[1].clone()]);
}

async fn keys_are_shown_once_stored_hashed_and_scoped_to_their_tenant(backend: Backend) {
    let t = open(backend).await;
    let acme = t.db.create_tenant("acme").await.unwrap();
    let globex = t.db.create_tenant("globex").await.unwrap();
    let (key, secret) = t.db.create_key(&acme.id, "ci", Role::Developer).await.unwrap().unwrap();
    assert!(secret.expose().starts_with("ql_") && secret.expose().len() == 67);
    assert!(secret.expose().starts_with(&key.prefix));
    assert_eq!(format!("{secret:?}"), "KeySecret([redacted])");

    let who = t.db.authenticate(secret.expose()).await.unwrap().unwrap();
    assert_eq!(
        (who.tenant_id.as_str(), who.role, who.key_id.as_str()),
        (acme.id.as_str(), Role::Developer, key.id.as_str())
    );
    assert!(t.db.authenticate("ql_nope").await.unwrap().is_none());
    let mut wrong = secret.expose().to_string();
    wrong.replace_range(66.., if wrong.ends_with('0') { "1" } else { "0" });
    assert!(t.db.authenticate(&wrong).await.unwrap().is_none());

    // The key itself is not stored anywhere.
    let rows = sqlx::query("SELECT * FROM api_keys").fetch_all(t.db.pool()).await.unwrap();
    for row in rows {
        use sqlx::Row as _;
        for i in 0..row.len() {
            if let Ok(Some(text)) = row.try_get::<Option<String>, _>(i) {
                assert!(!text.contains(&secret.expose()[11..]), "column {i} holds the key");
            }
        }
    }

    // Scoped: another tenant sees no such key, and cannot revoke it.
    assert_eq!(t.db.keys(&acme.id).await.unwrap(), vec![key.clone()]);
    assert!(t.db.keys(&globex.id).await.unwrap().is_empty());
    assert!(!t.db.revoke_key(&globex.id, &key.id).await.unwrap());
    assert!(t.db.authenticate(secret.expose()).await.unwrap().is_some());
    assert!(t.db.create_key("tn_missing", "x", Role::Viewer).await.unwrap().is_none());
    assert!(Role::Developer.can_write() && !Role::Viewer.can_write());
    assert!("superuser".parse::<Role>().is_err());
}

async fn revoked_keys_stop_working(backend: Backend) {
    let t = open(backend).await;
    let acme = t.db.create_tenant("acme").await.unwrap();
    let (key, secret) = t.db.create_key(&acme.id, "temp", Role::Viewer).await.unwrap().unwrap();
    assert!(t.db.revoke_key(&acme.id, &key.id).await.unwrap());
    assert!(!t.db.revoke_key(&acme.id, &key.id).await.unwrap(), "already revoked");
    assert!(t.db.authenticate(secret.expose()).await.unwrap().is_none());
    assert!(t.db.keys(&acme.id).await.unwrap()[0].revoked_at.is_some());
}

/// Issue 14 item 25: a database that cannot be reached is named (never with its password).
#[tokio::test]
async fn an_unreachable_database_is_named_in_the_error() {
    let err = Db::open("postgres://qlayer:s3cret@db.invalid:5432/qlayer?sslmode=disable").await.unwrap_err();
    let message = err.to_string();
    assert!(message.starts_with("cannot reach `db.invalid:5432/qlayer`: "), "{message}");
    assert!(!message.contains("s3cret") && !message.contains("database: error communicating"), "{message}");
}

/// Issue 14 item 17: a tenant cannot lock itself out for good.
async fn a_tenants_last_admin_key_cannot_be_revoked(backend: Backend) {
    let t = open(backend).await;
    let acme = t.db.create_tenant("acme").await.unwrap();
    let (only, _) = t.db.create_key(&acme.id, "only admin", Role::Admin).await.unwrap().unwrap();
    let (dev, _) = t.db.create_key(&acme.id, "dev", Role::Developer).await.unwrap().unwrap();
    let err = t.db.revoke_key(&acme.id, &only.id).await.unwrap_err();
    assert!(matches!(err, qlayer_db::DbError::Conflict(ref m) if m.contains("last admin key")), "{err}");
    assert!(t.db.revoke_key(&acme.id, &dev.id).await.unwrap(), "other roles are revoked as before");
    // Two admins revoked at once: exactly one goes, the tenant keeps an admin.
    let (second, _) = t.db.create_key(&acme.id, "second admin", Role::Admin).await.unwrap().unwrap();
    let (a, b) = tokio::join!(t.db.revoke_key(&acme.id, &only.id), t.db.revoke_key(&acme.id, &second.id));
    assert_eq!([a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(), 1, "{a:?} {b:?}");
    let live =
        t.db.keys(&acme.id).await.unwrap().into_iter().filter(|k| k.role == Role::Admin && k.revoked_at.is_none());
    assert_eq!(live.count(), 1);
    assert_eq!(t.db.tenant_named("acme").await.unwrap().map(|t| t.id), Some(acme.id));
}

async fn the_admin_bootstrap_key(backend: Backend) {
    let t = open(backend).await;
    let generated = t.db.bootstrap_admin(None).await.unwrap().expect("first start generates a key");
    let admin = t.db.authenticate(generated.expose()).await.unwrap().unwrap();
    assert_eq!(admin.role, Role::Admin);
    assert!(t.db.bootstrap_admin(None).await.unwrap().is_none(), "only on first start");

    let configured = format!("ql_{}", "ab".repeat(32));
    assert!(t.db.bootstrap_admin(Some(&configured)).await.unwrap().is_none());
    assert_eq!(t.db.authenticate(&configured).await.unwrap().unwrap().role, Role::Admin);
    t.db.bootstrap_admin(Some(&configured)).await.unwrap(); // idempotent
    assert!(t.db.bootstrap_admin(Some("short")).await.is_err());

    // Revoked through the API, the configured key stays revoked at the next start (which used
    // to fail on the key's unique hash).
    let key = t.db.authenticate(&configured).await.unwrap().unwrap();
    assert!(t.db.revoke_key(&key.tenant_id, &key.key_id).await.unwrap());
    assert!(t.db.bootstrap_admin(Some(&configured)).await.unwrap().is_none(), "the restart goes on");
    assert!(t.db.authenticate(&configured).await.unwrap().is_none(), "and the key stays revoked");
}

async fn the_audit_chain_detects_changed_removed_and_reordered_records(backend: Backend) {
    let t = open(backend).await;
    for i in 0..5 {
        t.db.audit(AuditEntry {
            actor: "key_admin".into(),
            tenant_id: "tn_a".into(),
            action: "tenant.create".into(),
            target: format!("tn_{i}"),
            outcome: "ok".into(),
        })
        .await
        .unwrap();
    }
    let AuditCheck::Intact { records, head } = t.db.verify_audit().await.unwrap() else { panic!("intact") };
    assert_eq!(records, 5);
    assert_eq!(head, t.db.audit_records(None, 4, 1).await.unwrap()[0].hash);

    // Changed.
    sqlx::query("UPDATE audit_log SET outcome = 'denied' WHERE seq = 3").execute(t.db.pool()).await.unwrap();
    assert_eq!(
        t.db.verify_audit().await.unwrap(),
        AuditCheck::Broken { seq: 3, problem: "its contents were changed".into() }
    );
    sqlx::query("UPDATE audit_log SET outcome = 'ok' WHERE seq = 3").execute(t.db.pool()).await.unwrap();
    assert!(matches!(t.db.verify_audit().await.unwrap(), AuditCheck::Intact { .. }));

    // Reordered: records 2 and 3 swap places (sequence numbers swapped, contents kept).
    sqlx::query("UPDATE audit_log SET seq = 100 WHERE seq = 2").execute(t.db.pool()).await.unwrap();
    sqlx::query("UPDATE audit_log SET seq = 2 WHERE seq = 3").execute(t.db.pool()).await.unwrap();
    sqlx::query("UPDATE audit_log SET seq = 3 WHERE seq = 100").execute(t.db.pool()).await.unwrap();
    assert!(matches!(t.db.verify_audit().await.unwrap(), AuditCheck::Broken { seq: 2, .. }));
    sqlx::query("UPDATE audit_log SET seq = 100 WHERE seq = 2").execute(t.db.pool()).await.unwrap();
    sqlx::query("UPDATE audit_log SET seq = 2 WHERE seq = 3").execute(t.db.pool()).await.unwrap();
    sqlx::query("UPDATE audit_log SET seq = 3 WHERE seq = 100").execute(t.db.pool()).await.unwrap();
    assert!(matches!(t.db.verify_audit().await.unwrap(), AuditCheck::Intact { .. }));

    // Removed from the middle.
    sqlx::query("DELETE FROM audit_log WHERE seq = 4").execute(t.db.pool()).await.unwrap();
    let check = t.db.verify_audit().await.unwrap();
    assert!(matches!(&check, AuditCheck::Broken { seq: 4, problem } if problem.contains("missing")), "{check:?}");

    // Appends after a gap still chain to the last record; the gap stays detectable.
    t.db.audit(AuditEntry {
        actor: "a".into(),
        tenant_id: "t".into(),
        action: "x".into(),
        target: "y".into(),
        outcome: "ok".into(),
    })
    .await
    .unwrap();
    assert!(matches!(t.db.verify_audit().await.unwrap(), AuditCheck::Broken { seq: 4, .. }));
}

async fn migrations_are_idempotent(backend: Backend) {
    let t = open(backend).await;
    t.db.create_tenant("kept").await.unwrap();
    // Opening the same database again applies nothing new and keeps the data.
    match backend {
        Backend::Sqlite => {
            let path = t._dir.as_ref().unwrap().path().join("qlayer.db");
            let again = Db::open_sqlite(&path).await.unwrap();
            assert_eq!(again.tenants(None, 10).await.unwrap().len(), 1);
            let mode = sqlx::query("PRAGMA journal_mode").fetch_one(again.pool()).await.unwrap();
            use sqlx::Row as _;
            assert_eq!(mode.try_get::<String, _>(0).unwrap().to_lowercase(), "wal");
        }
        Backend::Postgres => {
            let (admin, name) = t.pg.clone().unwrap();
            let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
            let again = Db::open(&url).await.unwrap();
            assert_eq!(again.tenants(None, 10).await.unwrap().len(), 1);
            again.close().await;
        }
    }
    assert!(Db::open("mysql://x").await.is_err());
}

fn call(tenant: &str, n: i64, key: Option<&'static str>) -> (String, serde_json::Value, Option<&'static str>) {
    (tenant.to_string(), serde_json::json!({"plugin": "text-stats", "input": {"n": n}}), key)
}

/// 12 submissions race for a tenant allowed 5 open tasks: exactly 5 get in, the others are
/// refused naming the limit, and another tenant is not held by it.
async fn concurrent_submissions_never_take_a_tenant_past_its_open_task_limit(backend: Backend) {
    let t = open(backend).await;
    let acme = t.db.create_tenant("acme").await.unwrap();
    let beta = t.db.create_tenant("beta").await.unwrap();
    let racers = (0..12).map(|n| {
        let (db, tenant) = (t.db.clone(), acme.id.clone());
        tokio::spawn(async move {
            let input = serde_json::json!({ "n": n });
            let new = NewJob {
                tenant_id: &tenant,
                kind: JobKind::Call,
                input: &input,
                priority: 0,
                idempotency_key: None,
                deadline_ms: None,
                tasks: one_task("text-stats"),
            };
            db.submit_job_within(new, 5).await
        })
    });
    let mut accepted = 0;
    for racer in racers.collect::<Vec<_>>() {
        match racer.await.unwrap() {
            Ok((_, true)) => accepted += 1,
            Err(DbError::Full { open, limit }) => assert_eq!((open, limit), (5, 5)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(accepted, 5);
    assert_eq!(t.db.jobs(&acme.id, None, None, None, 100).await.unwrap().len(), 5);
    let input = serde_json::json!({});
    let new = NewJob {
        tenant_id: &beta.id,
        kind: JobKind::Call,
        input: &input,
        priority: 0,
        idempotency_key: None,
        deadline_ms: None,
        tasks: one_task("text-stats"),
    };
    assert!(t.db.submit_job_within(new, 5).await.is_ok(), "another tenant is not held");
}

async fn jobs_are_persisted_idempotent_paginated_and_scoped_to_their_tenant(backend: Backend) {
    let t = open(backend).await;
    let acme = t.db.create_tenant("acme").await.unwrap();
    let beta = t.db.create_tenant("beta").await.unwrap();
    let submit = |(tenant, input, key): (String, serde_json::Value, Option<&'static str>)| {
        let db = t.db.clone();
        async move {
            db.submit_job(NewJob {
                tenant_id: &tenant,
                kind: JobKind::Call,
                input: &input,
                priority: 0,
                idempotency_key: key,
                deadline_ms: None,
                tasks: one_task("text-stats"),
            })
            .await
        }
    };
    let (first, created) = submit(call(&acme.id, 1, Some("order-1"))).await.unwrap();
    assert!(created && first.id.starts_with("job_") && first.status == JobStatus::Queued);
    assert_eq!(first.input["input"]["n"], 1);
    // Same key, same request: the same job, nothing new.
    let (again, created) = submit(call(&acme.id, 1, Some("order-1"))).await.unwrap();
    assert!(!created);
    assert_eq!(again.id, first.id);
    // Same key, another request: refused.
    let err = submit(call(&acme.id, 2, Some("order-1"))).await.unwrap_err();
    assert!(matches!(err, DbError::Conflict(ref m) if m.contains("idempotency_key")), "{err}");
    // Keys are per tenant.
    let (other, created) = submit(call(&beta.id, 1, Some("order-1"))).await.unwrap();
    assert!(created && other.id != first.id);
    // Another tenant's job looks missing.
    assert_eq!(t.db.job(&beta.id, &first.id).await.unwrap(), None);
    assert!(t.db.job_events(&beta.id, &first.id, 0).await.unwrap().is_empty());
    assert_eq!(t.db.cancel_job(&beta.id, &first.id, "x").await.unwrap(), CancelOutcome::NotFound);

    // Newest first, in pages.
    let mut ids = vec![first.id.clone()];
    for n in 2..=5 {
        ids.push(submit(call(&acme.id, n, None)).await.unwrap().0.id);
    }
    ids.reverse();
    let page1 = t.db.jobs(&acme.id, None, None, None, 2).await.unwrap();
    let page2 = t.db.jobs(&acme.id, None, None, Some(&page1[1].id), 2).await.unwrap();
    let page3 = t.db.jobs(&acme.id, None, None, Some(&page2[1].id), 2).await.unwrap();
    let seen: Vec<String> = page1.iter().chain(&page2).chain(&page3).map(|j| j.id.clone()).collect();
    assert_eq!(seen, ids);
    assert!(t.db.jobs(&acme.id, Some(JobKind::Run), None, None, 10).await.unwrap().is_empty());
    assert_eq!(t.db.jobs(&beta.id, None, None, None, 10).await.unwrap().len(), 1);
    // By status.
    assert!(matches!(t.db.cancel_job(&acme.id, &ids[1], "x").await.unwrap(), CancelOutcome::Cancelled(_)));
    let in_status = |status| {
        let db = t.db.clone();
        let acme = acme.id.clone();
        async move {
            let jobs = db.jobs(&acme, None, Some(status), None, 10).await.unwrap();
            jobs.into_iter().map(|j| j.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(in_status(JobStatus::Cancelled).await, [ids[1].clone()]);
    let queued: Vec<String> = ids.iter().filter(|id| **id != ids[1]).cloned().collect();
    assert_eq!(in_status(JobStatus::Queued).await, queued);
    assert!(in_status(JobStatus::Running).await.is_empty());
    assert!(in_status(JobStatus::Waiting).await.is_empty());
    assert_eq!(t.db.unfinished_jobs().await.unwrap().len(), 5);
}

async fn job_lifecycle_events_cancellation_and_artifacts(backend: Backend) {
    let t = open(backend).await;
    let acme = t.db.create_tenant("acme").await.unwrap();
    let input = serde_json::json!({"requirement": "a todo CLI"});
    let new = NewJob {
        tenant_id: &acme.id,
        kind: JobKind::Run,
        input: &input,
        priority: 3,
        idempotency_key: None,
        deadline_ms: None,
        tasks: one_task("scripted"),
    };
    let (job, _) = t.db.submit_job(new.clone()).await.unwrap();
    let task_id = format!("{}.000", job.id);
    let leased = t.db.lease_task(&task_id, "node-a", 10_000).await.unwrap().unwrap();
    assert_eq!((leased.attempts, leased.status, leased.priority), (1, TaskStatus::Leased, 3));
    assert_eq!(t.db.job(&acme.id, &job.id).await.unwrap().unwrap().status, JobStatus::Running);
    assert!(t.db.lease_task(&task_id, "node-b", 10_000).await.unwrap().is_none(), "one holder at a time");
    let output = serde_json::json!({"status": "passed"});
    // Binary artifacts round-trip on both databases (stored with the result), and only for the
    // job's tenant.
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let result = qlayer_db::TaskResult {
        output: output.clone().into(),
        artifact: Some(qlayer_db::Artifact { media_type: "application/gzip".into(), bytes: bytes.clone() }),
        ..Default::default()
    };
    let recorded = t.db.complete_task(&lease_of(&leased, "node-a"), &result).await.unwrap();
    assert_eq!(recorded.job_finished, Some(JobStatus::Succeeded));
    let again = t.db.complete_task(&lease_of(&leased, "node-a"), &serde_json::json!("late").into()).await.unwrap();
    assert!(!again.recorded, "finished once");
    let done = t.db.job(&acme.id, &job.id).await.unwrap().unwrap();
    assert_eq!((done.status, done.output.clone(), done.priority), (JobStatus::Succeeded, Some(output.into()), 3));
    assert!(done.finished_at.is_some());
    let kinds: Vec<String> = t.db.job_events(&acme.id, &job.id, 0).await.unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, ["queued", "started", "succeeded"], "the lease records the start");
    let after_first = t.db.job_events(&acme.id, &job.id, 1).await.unwrap();
    assert_eq!(after_first.len(), 2);
    assert_eq!((after_first[0].seq, after_first[0].data["node"].as_str()), (2, Some("node-a")));
    assert!(matches!(t.db.cancel_job(&acme.id, &job.id, "x").await.unwrap(), CancelOutcome::AlreadyFinished(_)));
    let artifact = t.db.artifact(&acme.id, &job.id).await.unwrap().unwrap();
    assert_eq!((artifact.media_type.as_str(), artifact.bytes.len()), ("application/gzip", bytes.len()));
    assert!(artifact.bytes == bytes);
    let beta = t.db.create_tenant("beta").await.unwrap();
    assert_eq!(t.db.artifact(&beta.id, &job.id).await.unwrap(), None);

    // A queued job cancels; it can then not be started.
    let (queued, _) = t.db.submit_job(new).await.unwrap();
    let CancelOutcome::Cancelled(c) = t.db.cancel_job(&acme.id, &queued.id, "by test").await.unwrap() else {
        panic!("not cancelled")
    };
    assert_eq!((c.status, c.error.as_deref()), (JobStatus::Cancelled, Some("by test")));
    assert!(t.db.lease_task(&format!("{}.000", queued.id), "node-a", 1_000).await.unwrap().is_none());
    let tasks = t.db.job_tasks(&acme.id, &queued.id).await.unwrap();
    assert_eq!(tasks[0].status, TaskStatus::Cancelled, "its task is cancelled with it");
    let (queued_n, running_n) = t.db.job_counts().await.unwrap();
    assert_eq!((queued_n, running_n), (0, 0));
}

async fn submit(db: &Db, tenant: &str, tasks: Vec<NewTask>) -> qlayer_db::Job {
    let input = serde_json::json!({"n": rand_suffix()});
    db.submit_job(NewJob {
        tenant_id: tenant,
        kind: JobKind::Call,
        input: &input,
        priority: 0,
        idempotency_key: None,
        deadline_ms: None,
        tasks,
    })
    .await
    .unwrap()
    .0
}

/// Many nodes race to lease one task: exactly one wins. A result recorded under a lost lease
/// (the lease expired and another node took the task over) is refused.
async fn a_lease_has_one_holder_and_fences_late_results(backend: Backend) {
    let t = open(backend).await;
    let acme = t.db.create_tenant("acme").await.unwrap();
    let raced = submit(&t.db, &acme.id, one_task("p")).await;
    let id = format!("{}.000", raced.id);
    let racers: Vec<_> = (0..8)
        .map(|n| {
            let (db, id) = (t.db.clone(), id.clone());
            tokio::spawn(async move { db.lease_task(&id, &format!("node-{n}"), 60_000).await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for r in racers {
        winners += usize::from(r.await.unwrap().is_some());
    }
    assert_eq!(winners, 1, "exactly one node holds a valid lease");

    // A 1 ms lease expires; another node takes the task over, straight from the lease call.
    let job = submit(&t.db, &acme.id, one_task("p")).await;
    let id = format!("{}.000", job.id);
    let first = t.db.lease_task(&id, "node-first", 1).await.unwrap().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let second = t.db.lease_task(&id, "node-late", 60_000).await.unwrap().unwrap();
    assert_eq!((second.attempts, second.resumed), (2, true));
    assert!(t.db.lease_task(&id, "node-third", 60_000).await.unwrap().is_none(), "the new lease is valid");
    // The first holder wakes up: its renewal no longer lists the task, its result is refused.
    assert!(t.db.renew_leases("node-first", 60_000).await.unwrap().is_empty());
    let late = t.db.complete_task(&lease_of(&first, "node-first"), &serde_json::json!("stale").into()).await.unwrap();
    assert!(!late.recorded);
    assert_eq!(t.db.renew_leases("node-late", 60_000).await.unwrap(), std::slice::from_ref(&id));
    let done = t.db.complete_task(&lease_of(&second, "node-late"), &serde_json::json!("fresh").into()).await.unwrap();
    assert!(done.recorded);
    let job = t.db.job(&acme.id, &job.id).await.unwrap().unwrap();
    assert_eq!((job.status, job.output), (JobStatus::Succeeded, Some(serde_json::json!("fresh").into())));

    // The heartbeat's sweep takes expired leases back to ready as well.
    let swept = submit(&t.db, &acme.id, one_task("p")).await;
    let id = format!("{}.000", swept.id);
    t.db.lease_task(&id, "node-gone", 1).await.unwrap().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let reclaimed = t.db.reclaim_leases(None).await.unwrap();
    assert!(reclaimed.iter().any(|t| t.id == id && t.resumed), "{reclaimed:?}");
}

/// A diamond a → (b, c) → d: b and c become ready together when a succeeds; d waits for both
/// and, having no input of its own, gets their outputs by name; the job's output has every
/// task's output.
async fn a_dag_runs_in_dependency_order_and_passes_outputs(backend: Backend) {
    let t = open(backend).await;
    let acme = t.db.create_tenant("acme").await.unwrap();
    let mut tasks = task("a", "p", serde_json::json!("start"), &[]);
    tasks.extend(task("b", "p", serde_json::json!("left"), &["a"]));
    tasks.extend(task("c", "q", serde_json::json!("right"), &["a"]));
    tasks.extend(task("d", "p", serde_json::Value::Null, &["b", "c"]));
    let job = submit(&t.db, &acme.id, tasks).await;
    assert_eq!(job.task_count, 4);
    let ready: Vec<String> = t.db.ready_tasks().await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(ready, ["a"]);
    let run = |name: &str| {
        let (db, id) =
            (t.db.clone(), format!("{}.{:03}", job.id, ["a", "b", "c", "d"].iter().position(|n| *n == name).unwrap()));
        async move {
            let task = db.lease_task(&id, "n", 60_000).await.unwrap().unwrap();
            let out = serde_json::json!(format!("{}-done", task.name));
            db.complete_task(&lease_of(&task, "n"), &out.clone().into()).await.unwrap()
        }
    };
    let after_a = run("a").await;
    let mut names: Vec<String> = after_a.ready.iter().map(|t| t.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["b", "c"], "independent tasks are ready together");
    assert!(run("b").await.ready.is_empty(), "d still waits for c");
    let after_c = run("c").await;
    assert_eq!(after_c.ready.len(), 1);
    assert_eq!(after_c.ready[0].input, serde_json::json!({"b": "b-done", "c": "c-done"}));
    let after_d = run("d").await;
    assert_eq!(after_d.job_finished, Some(JobStatus::Succeeded));
    let job = t.db.job(&acme.id, &job.id).await.unwrap().unwrap();
    assert_eq!(job.output.unwrap().to_value()["d"], "d-done");
    // Another tenant sees none of it.
    let beta = t.db.create_tenant("beta").await.unwrap();
    assert!(t.db.job_tasks(&beta.id, &job.id).await.unwrap().is_empty());
}

/// A running task decides what comes next: the tasks it adds (in its result's transaction) wait
/// for any task of the job, get their dependencies' outputs, and the last one can give the job
/// its output and artifact. A stale lease adds nothing.
async fn a_task_adds_tasks_to_its_job_and_ends_it_with_its_output_and_artifact(backend: Backend) {
    let t = open(backend).await;
    let acme = t.db.create_tenant("acme").await.unwrap();
    let job = submit(&t.db, &acme.id, task("plan", "p", serde_json::json!(1), &[])).await;
    let plan = t.db.lease_task(&format!("{}.000", job.id), "n", 60_000).await.unwrap().unwrap();
    let mut then = task("work", "p", serde_json::Value::Null, &["plan"]);
    then.extend(task("report", "p", serde_json::Value::Null, &["plan", "work"]));
    let result = qlayer_db::TaskResult { output: serde_json::json!("planned").into(), then, ..Default::default() };
    // A stale holder's result adds nothing.
    let mut stale = lease_of(&plan, "n");
    stale.attempt += 1;
    assert!(!t.db.complete_task(&stale, &result).await.unwrap().recorded);
    assert_eq!(t.db.job_tasks(&acme.id, &job.id).await.unwrap().len(), 1);

    let recorded = t.db.complete_task(&lease_of(&plan, "n"), &result).await.unwrap();
    assert_eq!(recorded.job_finished, None, "the job goes on with its new tasks");
    let ready: Vec<(&str, serde_json::Value)> =
        recorded.ready.iter().map(|t| (t.name.as_str(), t.input.to_value())).collect();
    assert_eq!(ready, [("work", serde_json::json!({"plan": "planned"}))]);
    assert_eq!(recorded.ready[0].id, format!("{}.001", job.id));
    assert_eq!(t.db.job(&acme.id, &job.id).await.unwrap().unwrap().task_count, 3);

    let work = t.db.lease_task(&recorded.ready[0].id, "n", 60_000).await.unwrap().unwrap();
    let after = t.db.complete_task(&lease_of(&work, "n"), &serde_json::json!("worked").into()).await.unwrap();
    assert_eq!(after.ready[0].input, serde_json::json!({"plan": "planned", "work": "worked"}));
    let report = t.db.lease_task(&after.ready[0].id, "n", 60_000).await.unwrap().unwrap();
    let artifact = qlayer_db::Artifact { media_type: "application/gzip".into(), bytes: vec![1, 2, 3] };
    let last = qlayer_db::TaskResult {
        output: serde_json::json!({"status": "passed"}).into(),
        job_output: true,
        artifact: Some(artifact.clone()),
        ..Default::default()
    };
    assert_eq!(
        t.db.complete_task(&lease_of(&report, "n"), &last).await.unwrap().job_finished,
        Some(JobStatus::Succeeded)
    );
    let done = t.db.job(&acme.id, &job.id).await.unwrap().unwrap();
    assert_eq!(done.output, Some(serde_json::json!({"status": "passed"}).into()), "the last task's output, not a map");
    assert_eq!(t.db.artifact(&acme.id, &job.id).await.unwrap(), Some(artifact));
    let names: Vec<String> = t.db.job_tasks(&acme.id, &job.id).await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["plan", "work", "report"]);
}

/// A retry waits for its time; a given-up task fails its job and cancels its other tasks; a
/// restarting node takes its own leases back at once; a graceful stop hands leases back without
/// counting the attempt; tenant shares are stored and checked.
async fn retries_wait_failures_cancel_the_rest_and_leases_come_back(backend: Backend) {
    let t = open(backend).await;
    let acme = t.db.create_tenant("acme").await.unwrap();
    let job = submit(&t.db, &acme.id, one_task("p")).await;
    let id = format!("{}.000", job.id);
    let leased = t.db.lease_task(&id, "n", 60_000).await.unwrap().unwrap();
    let later = leased.not_before + 60_000;
    let event = serde_json::json!({"attempt": 1});
    assert!(t.db.retry_task(&lease_of(&leased, "n"), later, "unavailable", &event).await.unwrap());
    assert!(t.db.lease_task(&id, "n", 60_000).await.unwrap().is_none(), "not before its backoff");
    let waiting = t.db.task(&id).await.unwrap().unwrap();
    assert_eq!(
        (waiting.status, waiting.not_before, waiting.error.as_deref()),
        (TaskStatus::Ready, later, Some("unavailable"))
    );

    // A restart under the same identity takes its leases back at once; a graceful stop hands
    // them back with the attempt uncounted.
    let job2 = submit(&t.db, &acme.id, one_task("p")).await;
    let id2 = format!("{}.000", job2.id);
    t.db.lease_task(&id2, "node-x", 600_000).await.unwrap().unwrap();
    let back = t.db.reclaim_leases(Some("node-x")).await.unwrap();
    assert_eq!((back.len(), back[0].attempts, back[0].resumed), (1, 1, true));
    t.db.lease_task(&id2, "node-x", 600_000).await.unwrap().unwrap();
    assert_eq!(t.db.release_leases("node-x").await.unwrap(), 1);
    assert_eq!(t.db.task(&id2).await.unwrap().unwrap().attempts, 1, "a handed-back attempt does not count");

    // Failing one task of a DAG fails the job and cancels the rest, once.
    let mut tasks = task("a", "p", serde_json::json!(1), &[]);
    tasks.extend(task("b", "p", serde_json::json!(2), &[]));
    tasks.extend(task("c", "p", serde_json::Value::Null, &["a", "b"]));
    let dag = submit(&t.db, &acme.id, tasks).await;
    let a = t.db.lease_task(&format!("{}.000", dag.id), "n", 60_000).await.unwrap().unwrap();
    let b = t.db.lease_task(&format!("{}.001", dag.id), "n", 60_000).await.unwrap().unwrap();
    assert!(t.db.fail_task(&a.id, Some(&lease_of(&a, "n")), "task `a`: bad input").await.unwrap());
    assert!(!t.db.fail_task(&a.id, Some(&lease_of(&a, "n")), "again").await.unwrap(), "once");
    let statuses: Vec<TaskStatus> = t.db.job_tasks(&acme.id, &dag.id).await.unwrap().iter().map(|t| t.status).collect();
    assert_eq!(statuses, [TaskStatus::Failed, TaskStatus::Cancelled, TaskStatus::Cancelled]);
    assert!(!t.db.complete_task(&lease_of(&b, "n"), &serde_json::json!(2).into()).await.unwrap().recorded);
    let failed = t.db.job(&acme.id, &dag.id).await.unwrap().unwrap();
    assert_eq!((failed.status, failed.error.as_deref()), (JobStatus::Failed, Some("task `a`: bad input")));
    let kinds: Vec<String> = t.db.job_events(&acme.id, &dag.id, 0).await.unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, ["queued", "started", "started", "failed"]);
    assert_eq!(t.db.open_tasks(&acme.id).await.unwrap(), 2, "job and job2 are still open");

    // Shares.
    assert!(t.db.set_tenant_share(&acme.id, 3, 2).await.unwrap());
    assert_eq!(t.db.tenant_shares().await.unwrap(), [(acme.id.clone(), 3, 2)]);
    assert!(t.db.set_tenant_share(&acme.id, 0, 0).await.is_err());
    assert!(!t.db.set_tenant_share("tn_missing", 2, 0).await.unwrap());
}
