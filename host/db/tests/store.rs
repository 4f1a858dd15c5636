//! The same store tests on SQLite (a temp file) and on PostgreSQL (the machine's server, a fresh
//! database per test, dropped afterwards). Set QLAYER_TEST_POSTGRES to use another server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qlayer_db::{AuditCheck, AuditEntry, Backend, Db, DbError, Role};
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
