//! The same store tests on SQLite (a temp file) and on PostgreSQL (the machine's server, a fresh
//! database per test, dropped afterwards). Set QLAYER_TEST_POSTGRES to use another server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qlayer_db::{AuditCheck, AuditEntry, Backend, CancelOutcome, Db, DbError, JobKind, JobStatus, NewJob, Role};
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
    the_admin_bootstrap_key,
    the_audit_chain_detects_changed_removed_and_reordered_records,
    migrations_are_idempotent,
    jobs_are_persisted_idempotent_paginated_and_scoped_to_their_tenant,
    job_lifecycle_events_cancellation_and_artifacts,
);

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
    let page1 = t.db.jobs(&acme.id, None, None, 2).await.unwrap();
    let page2 = t.db.jobs(&acme.id, None, Some(&page1[1].id), 2).await.unwrap();
    let page3 = t.db.jobs(&acme.id, None, Some(&page2[1].id), 2).await.unwrap();
    let seen: Vec<String> = page1.iter().chain(&page2).chain(&page3).map(|j| j.id.clone()).collect();
    assert_eq!(seen, ids);
    assert!(t.db.jobs(&acme.id, Some(JobKind::Run), None, 10).await.unwrap().is_empty());
    assert_eq!(t.db.jobs(&beta.id, None, None, 10).await.unwrap().len(), 1);
    assert_eq!(t.db.unfinished_jobs().await.unwrap().len(), 6);
}

async fn job_lifecycle_events_cancellation_and_artifacts(backend: Backend) {
    let t = open(backend).await;
    let acme = t.db.create_tenant("acme").await.unwrap();
    let input = serde_json::json!({"requirement": "a todo CLI"});
    let new = NewJob { tenant_id: &acme.id, kind: JobKind::Run, input: &input, priority: 3, idempotency_key: None };
    let (job, _) = t.db.submit_job(new.clone()).await.unwrap();
    assert!(t.db.start_job(&job.id, false).await.unwrap());
    assert!(!t.db.start_job(&job.id, false).await.unwrap(), "a running job is not started twice");
    assert!(t.db.start_job(&job.id, true).await.unwrap(), "a restart takes over a running job");
    t.db.add_job_event(&job.id, "progress", &serde_json::json!({"step": "developer"})).await.unwrap();
    let output = serde_json::json!({"status": "passed"});
    assert!(t.db.finish_job(&job.id, JobStatus::Succeeded, Some(&output), None).await.unwrap());
    assert!(!t.db.finish_job(&job.id, JobStatus::Failed, None, Some("late")).await.unwrap(), "finished once");
    let done = t.db.job(&acme.id, &job.id).await.unwrap().unwrap();
    assert_eq!((done.status, done.output.clone(), done.priority), (JobStatus::Succeeded, Some(output), 3));
    assert!(done.finished_at.is_some());
    let kinds: Vec<String> = t.db.job_events(&acme.id, &job.id, 0).await.unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, ["queued", "progress"]);
    let after_first = t.db.job_events(&acme.id, &job.id, 1).await.unwrap();
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].seq, 2);
    assert!(matches!(t.db.cancel_job(&acme.id, &job.id, "x").await.unwrap(), CancelOutcome::AlreadyFinished(_)));

    // Binary artifacts round-trip on both databases, and only for the job's tenant.
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    t.db.put_artifact(&job.id, "application/gzip", &bytes).await.unwrap();
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
    assert!(!t.db.start_job(&queued.id, true).await.unwrap());
    let (queued_n, running_n) = t.db.job_counts().await.unwrap();
    assert_eq!((queued_n, running_n), (0, 0));
}
