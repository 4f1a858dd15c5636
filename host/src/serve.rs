//! `qlayer serve`: the multi-tenant service. This first part holds its configuration (TOML file,
//! environment, flags, in that order of precedence; unknown keys are errors that quote the key),
//! the state store (SQLite in the data dir by default, PostgreSQL with a URL), the admin
//! bootstrap, health and readiness, and graceful shutdown. The API routes build on it.

use anyhow::Context as _;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The service's configuration file (`qlayer.toml`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeConfig {
    /// Listening addresses and request limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where state lives.
    #[serde(default)]
    pub database: DatabaseConfig,
    /// Access.
    #[serde(default)]
    pub auth: AuthConfig,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerConfig {
    /// REST (and OpenAI-compatible) address.
    #[serde(default = "default_rest")]
    pub rest_addr: SocketAddr,
    /// How long in-flight requests get to finish at shutdown.
    #[serde(default = "default_grace")]
    pub shutdown_grace_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { rest_addr: default_rest(), shutdown_grace_ms: default_grace() }
    }
}

fn default_rest() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_grace() -> u64 {
    10_000
}

/// `[database]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DatabaseConfig {
    /// `sqlite://<path>` or `postgres://...`; default: `<data dir>/qlayer.db`.
    pub url: Option<String>,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AuthConfig {
    /// An admin key (`ql_` + 64 hex digits) to register at start; without one, a key is generated
    /// on first start and printed once.
    pub admin_key: Option<String>,
}

impl ServeConfig {
    /// Reads a config file. Unknown keys and bad values are errors that quote the key and line.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("config {}", path.display()))
    }

    /// Parses config text.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            anyhow::anyhow!("{}{}", e.message(), line.map(|l| format!(" (line {l})")).unwrap_or_default())
        })
    }

    /// Applies `QLAYER_REST_ADDR`, `QLAYER_DATABASE_URL` and `QLAYER_ADMIN_KEY`.
    pub fn apply_env(&mut self) -> anyhow::Result<()> {
        if let Ok(addr) = std::env::var("QLAYER_REST_ADDR") {
            self.server.rest_addr = addr
                .parse()
                .with_context(|| format!("QLAYER_REST_ADDR `{addr}` is not an address like 127.0.0.1:8080"))?;
        }
        if let Ok(url) = std::env::var("QLAYER_DATABASE_URL") {
            self.database.url = Some(url);
        }
        if let Ok(key) = std::env::var("QLAYER_ADMIN_KEY") {
            self.auth.admin_key = Some(key);
        }
        Ok(())
    }
}

/// The running service's shared state.
#[derive(Clone)]
pub struct AppState {
    /// The state store.
    pub db: qlayer_db::Db,
}

/// The REST router.
pub fn router(state: AppState) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn readyz(axum::extract::State(state): axum::extract::State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if state.db.ping().await {
        axum::Json(serde_json::json!({ "status": "ready", "database": "ok" })).into_response()
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "status": "not ready", "database": "unreachable" })),
        )
            .into_response()
    }
}

/// Runs the service until SIGINT or SIGTERM, then stops taking connections and gives in-flight
/// requests the configured grace period.
pub async fn serve(config: ServeConfig, data_dir: PathBuf) -> anyhow::Result<()> {
    let url = match &config.database.url {
        Some(url) => url.clone(),
        None => {
            std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
            format!("sqlite://{}", data_dir.join("qlayer.db").display())
        }
    };
    let db = qlayer_db::Db::open(&url).await.context("opening the database")?;
    if let Some(secret) = db.bootstrap_admin(config.auth.admin_key.as_deref()).await? {
        // Shown once, to the operator's terminal; never through the logs.
        #[allow(clippy::print_stderr)]
        {
            eprintln!("qlayer: first start: admin API key (shown once, store it now): {}", secret.expose());
        }
    }
    let listener = tokio::net::TcpListener::bind(config.server.rest_addr)
        .await
        .with_context(|| format!("listening on {}", config.server.rest_addr))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, backend = ?db.backend(), "qlayer serve: REST listening");
    #[allow(clippy::print_stdout)]
    {
        println!("qlayer serve: REST on http://{addr}");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, router(AppState { db: db.clone() })).with_graceful_shutdown({
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    });
    let server = tokio::spawn(async move { server.await });
    shutdown_signal().await;
    tracing::info!("qlayer serve: shutting down");
    let _ = stop_tx.send(true);
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    match tokio::time::timeout(grace, server).await {
        Ok(joined) => joined.context("the server task failed")?.context("serving")?,
        Err(_) => {
            tracing::warn!(grace_ms = config.server.shutdown_grace_ms, "in-flight requests cut at the grace period")
        }
    }
    db.close().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn unknown_keys_are_errors_that_quote_the_key_and_line() {
        let err = ServeConfig::from_toml("[server]\nrest-addr = \"127.0.0.1:1\"\nrest-adr = \"x\"\n").unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("rest-adr") && message.contains("line 3"), "{message}");
        let err = ServeConfig::from_toml("[databse]\nurl = \"x\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("databse"), "{err:#}");
        let err = ServeConfig::from_toml("[server]\nrest-addr = \"nowhere\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        let ok = ServeConfig::from_toml(
            "[server]\nrest-addr = \"0.0.0.0:9000\"\n[database]\nurl = \"sqlite:///tmp/x.db\"\n",
        )
        .unwrap();
        assert_eq!(ok.server.rest_addr.port(), 9000);
        assert_eq!(ServeConfig::from_toml("").unwrap(), ServeConfig::default());
    }
}
