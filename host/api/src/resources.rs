//! Tenants, API keys and installed plugins.

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody, PageQuery};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use qlayer_db::{ApiKey, Role, Tenant};
use serde::{Deserialize, Serialize};

/// `POST /v1/tenants`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// 1-64 lowercase letters, digits, `-` or `_`, starting with a letter or digit; unique.
    #[schema(pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$")]
    pub name: String,
}

/// A new tenant and its first admin key.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TenantCreated {
    /// The tenant.
    pub tenant: Tenant,
    /// Its first admin key's record.
    pub key: ApiKey,
    /// The key itself: shown once, never stored.
    pub api_key: String,
}

/// A page of tenants.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TenantPage {
    /// This page.
    pub items: Vec<Tenant>,
    /// Pass as `after` for the next page; absent on the last.
    pub next: Option<String>,
}

/// Creates a tenant with a first admin key (operators: admin keys of the `system` tenant).
#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = CreateTenant,
    responses((status = 201, body = TenantCreated), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create_tenant(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateTenant>,
) -> Result<Response, ApiError> {
    let created = create_tenant_op(&state, &caller, body).await?;
    Ok((StatusCode::CREATED, axum::Json(created)).into_response())
}

/// Creates a tenant and its first admin key (REST and gRPC).
pub async fn create_tenant_op(
    state: &AppState,
    caller: &Caller,
    body: CreateTenant,
) -> Result<TenantCreated, ApiError> {
    require_operator(caller)?;
    let outcome = async {
        let tenant = state.db.create_tenant(&body.name).await?;
        let (key, secret) = state
            .db
            .create_key(&tenant.id, "initial-admin", Role::Admin)
            .await?
            .ok_or_else(|| ApiError::internal("the tenant just created is missing"))?;
        Ok::<_, ApiError>(TenantCreated { tenant, key, api_key: secret.expose().to_string() })
    }
    .await;
    let target = outcome.as_ref().map(|c| c.tenant.id.clone()).unwrap_or_else(|_| body.name.clone());
    state.audit(caller, "tenant.create", &target, &outcome).await;
    outcome
}

/// Lists tenants (operators only).
#[utoipa::path(get, path = "/v1/tenants", tag = "tenants", params(PageQuery),
    responses((status = 200, body = TenantPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_tenants(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<axum::Json<TenantPage>, ApiError> {
    list_tenants_op(&state, &caller, page).await.map(axum::Json)
}

/// Lists tenants (REST and gRPC).
pub async fn list_tenants_op(state: &AppState, caller: &Caller, page: PageQuery) -> Result<TenantPage, ApiError> {
    require_operator(caller)?;
    let limit = page.limit()?;
    let items = state.db.tenants(page.after.as_deref(), limit).await?;
    let next = (items.len() == limit as usize).then(|| items.last().map(|t| t.id.clone())).flatten();
    Ok(TenantPage { items, next })
}

/// One tenant: operators see any; others see only their own.
#[utoipa::path(get, path = "/v1/tenants/{id}", tag = "tenants", params(("id" = String, Path, description = "tenant id")),
    responses((status = 200, body = Tenant), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_tenant(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
) -> Result<axum::Json<Tenant>, ApiError> {
    get_tenant_op(&state, &caller, &id).await.map(axum::Json)
}

/// One tenant (REST and gRPC).
pub async fn get_tenant_op(state: &AppState, caller: &Caller, id: &str) -> Result<Tenant, ApiError> {
    let missing = || ApiError::not_found(format!("tenant `{id}` not found"));
    if !caller.is_operator() && caller.tenant_id() != id {
        return Err(missing());
    }
    state.db.tenant(id).await?.ok_or_else(missing)
}

/// `PUT /v1/tenants/{id}/share`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantShare {
    /// Share of the scheduler relative to other tenants with work (1-1000; default 1): a tenant
    /// of weight 3 gets three times the capacity of one of weight 1 while both have work.
    #[schema(minimum = 1, maximum = 1000)]
    pub weight: i64,
    /// Most tasks of this tenant running at once on a node (0-100000; 0: the host's
    /// `tenant-concurrency`).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100000)]
    pub max_running: i64,
}

/// Sets a tenant's share of the scheduler (operators only).
#[utoipa::path(put, path = "/v1/tenants/{id}/share", tag = "tenants", request_body = TenantShare,
    params(("id" = String, Path, description = "tenant id")),
    responses((status = 200, body = Tenant), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn set_tenant_share(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    ApiJson(body): ApiJson<TenantShare>,
) -> Result<axum::Json<Tenant>, ApiError> {
    set_tenant_share_op(&state, &caller, &id, body).await.map(axum::Json)
}

/// Sets a tenant's scheduler share (REST and gRPC); the running scheduler applies it at once.
pub async fn set_tenant_share_op(
    state: &AppState,
    caller: &Caller,
    id: &str,
    body: TenantShare,
) -> Result<Tenant, ApiError> {
    require_operator(caller)?;
    let outcome = async {
        if !state.db.set_tenant_share(id, body.weight, body.max_running).await? {
            return Err(ApiError::not_found(format!("tenant `{id}` not found")));
        }
        state.runner.scheduler().refresh_shares().await?;
        state.db.tenant(id).await?.ok_or_else(|| ApiError::not_found(format!("tenant `{id}` not found")))
    }
    .await;
    state.audit(caller, "tenant.share", id, &outcome).await;
    outcome
}

fn require_operator(caller: &Caller) -> Result<(), ApiError> {
    if caller.is_operator() {
        Ok(())
    } else {
        Err(ApiError::forbidden("tenants are managed with an admin key of the `system` tenant"))
    }
}

/// `POST /v1/keys`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// A label, 1-128 characters.
    #[schema(min_length = 1, max_length = 128)]
    pub name: String,
    /// `admin`, `developer` or `viewer`.
    pub role: Role,
    /// Operators only: the tenant to issue the key for (default: the caller's own). How an
    /// operator lets a tenant back in that lost its admin keys.
    #[serde(default)]
    pub tenant_id: Option<String>,
}

/// A new key.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyCreated {
    /// Its record.
    pub key: ApiKey,
    /// The key itself: shown once, never stored.
    pub api_key: String,
}

/// The caller's tenant's keys.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyList {
    /// Records only, never the keys.
    pub items: Vec<ApiKey>,
}

/// Creates a key in the caller's tenant (admins), or, for an operator, in the tenant named by
/// `tenant_id`.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKey,
    responses((status = 201, body = KeyCreated), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<Response, ApiError> {
    let created = create_key_op(&state, &caller, body).await?;
    Ok((StatusCode::CREATED, axum::Json(created)).into_response())
}

/// Creates a key (REST and gRPC).
pub async fn create_key_op(state: &AppState, caller: &Caller, body: CreateKey) -> Result<KeyCreated, ApiError> {
    caller.require_admin()?;
    let outcome = async {
        let tenant = match body.tenant_id.as_deref().filter(|t| !t.is_empty()) {
            None => caller.tenant_id(),
            Some(own) if own == caller.tenant_id() => own,
            Some(other) if caller.is_operator() => other,
            // Another tenant looks exactly like a missing one.
            Some(other) => return Err(ApiError::not_found(format!("tenant `{other}` not found"))),
        };
        let (key, secret) = state
            .db
            .create_key(tenant, &body.name, body.role)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("tenant `{tenant}` not found")))?;
        Ok::<_, ApiError>(KeyCreated { key, api_key: secret.expose().to_string() })
    }
    .await;
    let target = outcome.as_ref().map(|k| k.key.id.clone()).unwrap_or_else(|_| body.name.clone());
    state.audit(caller, "key.create", &target, &outcome).await;
    outcome
}

/// Lists the caller's tenant's keys (admins).
#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses((status = 200, body = KeyList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_keys(State(state): State<AppState>, caller: Caller) -> Result<axum::Json<KeyList>, ApiError> {
    list_keys_op(&state, &caller).await.map(axum::Json)
}

/// Lists keys (REST and gRPC).
pub async fn list_keys_op(state: &AppState, caller: &Caller) -> Result<KeyList, ApiError> {
    caller.require_admin()?;
    Ok(KeyList { items: state.db.keys(caller.tenant_id()).await? })
}

/// Revokes a key of the caller's tenant (admins; an operator, any tenant's key). The tenant's last
/// admin key is not revoked (409): create another first.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys", params(("id" = String, Path, description = "key id")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
) -> Result<StatusCode, ApiError> {
    revoke_key_op(&state, &caller, &id).await.map(|()| StatusCode::NO_CONTENT)
}

/// Revokes a key (REST and gRPC).
pub async fn revoke_key_op(state: &AppState, caller: &Caller, id: &str) -> Result<(), ApiError> {
    caller.require_admin()?;
    let tenant_id = key_scope(state, caller, id).await?;
    let outcome = match state.db.revoke_key(&tenant_id, id).await {
        Ok(true) => {
            state.auth_guard.forget_key(id);
            Ok(())
        }
        Ok(false) => Err(ApiError::not_found(format!("key `{id}` not found"))),
        Err(e) => Err(e.into()),
    };
    state.audit(caller, "key.revoke", id, &outcome).await;
    outcome
}

/// The tenant whose key `id` a caller addresses: its own; for an operator (who issues keys for
/// any tenant with `POST /v1/keys {"tenant_id"}`), the key's own tenant, so that what it issued
/// it can also limit and revoke. Another tenant's key stays a missing one for everyone else.
pub async fn key_scope(state: &AppState, caller: &Caller, id: &str) -> Result<String, ApiError> {
    if caller.is_operator()
        && let Some(tenant) = state.db.key_tenant(id).await?
    {
        return Ok(tenant);
    }
    Ok(caller.tenant_id().to_string())
}

/// An installed plugin.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PluginView {
    /// Its name (from its manifest).
    pub name: String,
    /// Its version.
    pub version: String,
    /// `provider`, `agent`, `validator` or `tool`.
    pub kind: String,
    /// `component` or `extism`.
    pub format: String,
    /// `registry/repository` it came from.
    pub repository: String,
    /// The tag it was installed from.
    pub tag: Option<String>,
    /// The OCI manifest digest it is pinned to.
    pub digest: String,
    /// The binary's size in bytes.
    pub size: u64,
    /// What was granted.
    pub grants: Grants,
    /// What the signature check found.
    pub signature: String,
    /// Unix seconds.
    pub installed_at: u64,
}

/// Capabilities granted to a plugin at install.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Outbound hosts: `host`, `host:port` or `*.domain` (a host without a port means ports 80
    /// and 443). Also taken: upper case, and IPv6 literals in brackets (`[::1]:8080`).
    #[serde(default)]
    #[schema(inline, value_type = Vec<String>, max_length = 253,
        pattern = r"^(\*\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*|[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?)$")]
    pub hosts: Vec<String>,
    /// Config values.
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, String>,
    /// Secret name → the environment variable of the host that holds it. Only variables the
    /// operator offers to the tenant (`secret-env` in marketplace.toml) may be named.
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, String>,
}

impl From<qlayer_marketplace::Install> for PluginView {
    fn from(i: qlayer_marketplace::Install) -> Self {
        PluginView {
            name: i.name,
            version: i.version,
            kind: i.kind.to_string(),
            format: format!("{:?}", i.format).to_lowercase(),
            repository: i.repository,
            tag: i.tag,
            digest: i.digest,
            size: i.size,
            grants: Grants { hosts: i.grants.hosts, config: i.grants.config, secrets: i.grants.secrets },
            signature: i.signature,
            installed_at: i.installed_at,
        }
    }
}

/// `POST /v1/plugins`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstallPlugin {
    /// An OCI reference: `registry/repository:tag` or `registry/repository@sha256:<64 hex>`
    /// (without a registry, Docker Hub's; without a tag, `latest`).
    #[schema(
        max_length = 255,
        pattern = r"^([a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?)*(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?/)?[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[0-9a-f]{64})?$"
    )]
    pub reference: String,
    /// What to grant; only what the plugin asks for may be granted.
    #[serde(default)]
    pub grants: Grants,
}

/// An install's result.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PluginInstalled {
    /// The install.
    pub plugin: PluginView,
    /// Set when the signature policy is `warn` and the signature did not verify.
    pub warning: Option<String>,
}

/// The caller's tenant's plugins.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PluginList {
    /// By name.
    pub items: Vec<PluginView>,
}

/// Lists the caller's tenant's installed plugins.
#[utoipa::path(get, path = "/v1/plugins", tag = "plugins",
    responses((status = 200, body = PluginList), (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_plugins(State(state): State<AppState>, caller: Caller) -> Result<axum::Json<PluginList>, ApiError> {
    list_plugins_op(&state, &caller).await.map(axum::Json)
}

/// Lists installed plugins (REST and gRPC).
pub async fn list_plugins_op(state: &AppState, caller: &Caller) -> Result<PluginList, ApiError> {
    let installs = state.runner.marketplace().list(caller.tenant_name()).await.map_err(ApiError::internal)?;
    Ok(PluginList { items: installs.into_iter().map(PluginView::from).collect() })
}

/// One installed plugin of the caller's tenant.
#[utoipa::path(get, path = "/v1/plugins/{name}", tag = "plugins", params(("name" = String, Path, description = "plugin name")),
    responses((status = 200, body = PluginView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_plugin(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
) -> Result<axum::Json<PluginView>, ApiError> {
    get_plugin_op(&state, &caller, &name).await.map(axum::Json)
}

/// One installed plugin (REST and gRPC).
pub async fn get_plugin_op(state: &AppState, caller: &Caller, name: &str) -> Result<PluginView, ApiError> {
    state
        .runner
        .marketplace()
        .get(caller.tenant_name(), name)
        .await
        .map(PluginView::from)
        .map_err(|e| install_error(e, name))
}

/// Installs a plugin from a registry for the caller's tenant: verified pull, signature policy,
/// grants checked against what it asks for.
#[utoipa::path(post, path = "/v1/plugins", tag = "plugins", request_body = InstallPlugin,
    responses((status = 201, body = PluginInstalled), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 502, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn install_plugin(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<InstallPlugin>,
) -> Result<Response, ApiError> {
    let installed = install_plugin_op(&state, &caller, body).await?;
    Ok((StatusCode::CREATED, axum::Json(installed)).into_response())
}

/// Installs a plugin (REST and gRPC).
pub async fn install_plugin_op(
    state: &AppState,
    caller: &Caller,
    body: InstallPlugin,
) -> Result<PluginInstalled, ApiError> {
    caller.require_write()?;
    let market = state.runner.marketplace();
    let outcome = async {
        let offered = market.config().secret_env_for(caller.tenant_name());
        if let Some((key, var)) = body.grants.secrets.iter().find(|(_, var)| !offered.contains(var)) {
            return Err(ApiError::forbidden(format!(
                "secret `{key}`: environment variable `{var}` is not offered to this tenant by the operator"
            )));
        }
        let spec = qlayer_marketplace::GrantSpec {
            hosts: body.grants.hosts.clone(),
            config: body.grants.config.clone(),
            secrets: body.grants.secrets.clone(),
        };
        spec.to_grants().map_err(|e| ApiError::invalid(format!("grants: {e:#}")))?;
        market
            .check_registry(state.runner.runtime(), &body.reference)
            .await
            .map_err(|e| install_error(e, &body.reference))?;
        let done = market
            .install(state.runner.runtime(), &body.reference, caller.tenant_name(), &spec)
            .await
            .map_err(|e| install_error(e, &body.reference))?;
        Ok(PluginInstalled { plugin: done.install.into(), warning: done.warning })
    }
    .await;
    let target = outcome.as_ref().map(|p| p.plugin.name.clone()).unwrap_or_else(|_| body.reference.clone());
    state.audit(caller, "plugin.install", &target, &outcome).await;
    outcome
}

/// Removes an installed plugin of the caller's tenant.
#[utoipa::path(delete, path = "/v1/plugins/{name}", tag = "plugins", params(("name" = String, Path, description = "plugin name")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn remove_plugin(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
) -> Result<StatusCode, ApiError> {
    remove_plugin_op(&state, &caller, &name).await.map(|()| StatusCode::NO_CONTENT)
}

/// Removes an installed plugin (REST and gRPC).
pub async fn remove_plugin_op(state: &AppState, caller: &Caller, name: &str) -> Result<(), ApiError> {
    caller.require_write()?;
    let outcome = state
        .runner
        .marketplace()
        .remove(caller.tenant_name(), name)
        .await
        .map(|_| ())
        .map_err(|e| install_error(e, name));
    state.audit(caller, "plugin.remove", name, &outcome).await;
    outcome
}

/// Maps marketplace errors to the API's: the registry's and the install policy's errors are the
/// caller's to see; anything else is internal.
pub(crate) fn install_error(e: anyhow::Error, what: &str) -> ApiError {
    use qlayer_marketplace::InstallError;
    use qlayer_registry::RegistryError;
    if let Some(e) = e.downcast_ref::<InstallError>() {
        return match e {
            InstallError::NotGranted { .. } => ApiError::invalid(e.to_string()),
            InstallError::Signature { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "signature_refused", e.to_string())
            }
            InstallError::AlreadyInstalled { .. } => ApiError::conflict(e.to_string()),
            InstallError::NotInstalled { .. } => ApiError::not_found(format!("plugin `{what}` not found")),
            // Understood, and refused by the operator's policy.
            InstallError::NetworkPolicy { .. } => ApiError::forbidden(e.to_string()),
        };
    }
    // A grant the plugin did not ask for, `*`, or one the network policy refuses.
    if let Some(e) = e.downcast_ref::<qlayer_runtime::GrantError>() {
        return match e {
            qlayer_runtime::GrantError::NetworkPolicy { .. } => ApiError::forbidden(e.to_string()),
            _ => ApiError::invalid(e.to_string()),
        };
    }
    if let Some(e) = e.downcast_ref::<RegistryError>() {
        return match e {
            RegistryError::BadReference { .. } => ApiError::invalid(e.to_string()),
            RegistryError::NotFound(_) => ApiError::not_found(e.to_string()),
            RegistryError::NetworkPolicy { .. } => ApiError::forbidden(e.to_string()),
            RegistryError::Unauthorized { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "registry_refused", e.to_string())
            }
            RegistryError::DigestMismatch { .. } | RegistryError::SizeMismatch { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "artifact_rejected", e.to_string())
            }
            RegistryError::Transport(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "registry_unavailable", e.to_string())
            }
            _ => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "artifact_rejected", e.to_string()),
        };
    }
    // Manifest, load and policy problems of the artifact itself are the caller's to see.
    if e.chain().any(|c| c.is::<qlayer_runtime::LoadError>() || c.is::<qlayer_manifest::ManifestError>()) {
        return ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "artifact_rejected", format!("{e:#}"));
    }
    ApiError::internal(format!("{e:#}"))
}
