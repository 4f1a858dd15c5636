//! Factory pipelines stored for the caller's tenant: put, get, list, delete. A run names one
//! (`"pipeline": "<name>"`) or gives its definition inline; `default` is the bundled pipeline
//! until the tenant stores its own of that name.

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use qlayer_db::PipelineEntry;
use qlayer_jobs::{DEFAULT_PIPELINE, Pipeline, RunRefused};
use serde::Serialize;

/// A stored pipeline.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PipelineObject {
    /// Its name.
    pub name: String,
    /// The definition (what `PUT` takes).
    pub definition: Pipeline,
    /// `true` for the bundled default (not stored by the tenant).
    pub bundled: bool,
    /// Unix ms of its first store (0 for the bundled one).
    pub created_at: i64,
    /// Unix ms of its last change (0 for the bundled one).
    pub updated_at: i64,
}

/// The tenant's stored pipelines, by name.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PipelineList {
    /// By name.
    pub items: Vec<PipelineObject>,
}

fn object(entry: PipelineEntry) -> Result<PipelineObject, ApiError> {
    let definition = serde_json::from_str(&entry.definition)
        .map_err(|e| ApiError::internal(format!("stored pipeline `{}`: {e}", entry.name)))?;
    Ok(PipelineObject {
        name: entry.name,
        definition,
        bundled: false,
        created_at: entry.created_at,
        updated_at: entry.updated_at,
    })
}

fn bundled_default() -> PipelineObject {
    PipelineObject {
        name: DEFAULT_PIPELINE.into(),
        definition: Pipeline { name: None, ..Pipeline::default_pipeline() },
        bundled: true,
        created_at: 0,
        updated_at: 0,
    }
}

/// What a run's or a pipeline's problem answers (REST and gRPC).
pub fn run_refused(e: RunRefused) -> ApiError {
    match e {
        RunRefused::Invalid(m) => ApiError::invalid(m),
        RunRefused::NotFound(m) => ApiError::not_found(m),
        RunRefused::Store(m) => ApiError::internal(m),
    }
}

/// A stored pipeline's name, as its path gives it.
const NAME_PATTERN: &str = "^[a-z0-9][a-z0-9_-]{0,63}$";

fn check_name(name: &str) -> Result<(), ApiError> {
    match qlayer_jobs::valid_pipeline_name(name) {
        true => Ok(()),
        false => Err(ApiError::invalid(format!("pipeline name `{name}`: use 1-64 of a-z, 0-9, `-`, `_`"))),
    }
}

/// The document says what these routes take: a stored pipeline's name matches
/// [`NAME_PATTERN`], and `PUT` takes the definition without `name` (the path names it).
pub fn document(doc: &mut serde_json::Value) {
    if let Some(paths) = doc.pointer_mut("/paths/~1v1~1pipelines~1{name}").and_then(|p| p.as_object_mut()) {
        for op in paths.values_mut() {
            for param in op.get_mut("parameters").and_then(|p| p.as_array_mut()).into_iter().flatten() {
                if param["name"] == "name" {
                    param["schema"]["pattern"] = serde_json::json!(NAME_PATTERN);
                }
            }
        }
    }
    let Some(schemas) = doc.pointer_mut("/components/schemas") else { return };
    let Some(mut definition) = schemas.get("Pipeline").cloned() else { return };
    if let Some(props) = definition.get_mut("properties").and_then(|p| p.as_object_mut()) {
        props.remove("name");
    }
    schemas["PipelineDefinition"] = definition;
    if let Some(body) =
        doc.pointer_mut("/paths/~1v1~1pipelines~1{name}/put/requestBody/content/application~1json/schema")
    {
        *body = serde_json::json!({"$ref": "#/components/schemas/PipelineDefinition"});
    }
}

/// Stores a pipeline for the caller's tenant, or replaces it (runs already submitted keep the
/// definition they started with). It is checked first: its steps, their dependencies (no
/// cycle), and that every plugin it names is bundled or installed for the tenant, of the right
/// kind and, when pinned, with that digest. The error names the step.
#[utoipa::path(put, path = "/v1/pipelines/{name}", tag = "runs",
    params(("name" = String, Path, description = "pipeline name: 1-64 of a-z, 0-9, `-`, `_`")),
    request_body = Pipeline,
    responses((status = 201, body = PipelineObject, description = "stored"), (status = 200, body = PipelineObject, description = "replaced"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn put_pipeline(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<Response, ApiError> {
    caller.require_write()?;
    let outcome = async {
        check_name(&name)?;
        if body.get("name").is_some() {
            return Err(ApiError::invalid("name: a stored pipeline is named by its path; leave `name` out"));
        }
        let pipeline = Pipeline::from_json(body).map_err(ApiError::invalid)?;
        state.runner.check_pipeline(caller.tenant_id(), &pipeline).await.map_err(run_refused)?;
        let definition = serde_json::to_string(&pipeline).map_err(ApiError::internal)?;
        let (entry, created) = state.db.put_pipeline(caller.tenant_id(), &name, &definition).await?;
        Ok((object(entry)?, created))
    }
    .await;
    state.audit(&caller, "pipeline.put", &name, &outcome).await;
    let (object, created) = outcome?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, axum::Json(object)).into_response())
}

/// One pipeline of the caller's tenant (`default`: the bundled one, unless the tenant stored
/// its own).
#[utoipa::path(get, path = "/v1/pipelines/{name}", tag = "runs", params(("name" = String, Path, description = "pipeline name")),
    responses((status = 200, body = PipelineObject), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_pipeline(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
) -> Result<axum::Json<PipelineObject>, ApiError> {
    match state.db.pipeline(caller.tenant_id(), &name).await? {
        Some(entry) => object(entry).map(axum::Json),
        None if name == DEFAULT_PIPELINE => Ok(axum::Json(bundled_default())),
        None => Err(ApiError::not_found(format!("pipeline `{name}` not found"))),
    }
}

/// The caller's tenant's pipelines, by name; the bundled `default` among them unless the tenant
/// stored its own.
#[utoipa::path(get, path = "/v1/pipelines", tag = "runs",
    responses((status = 200, body = PipelineList), (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_pipelines(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<PipelineList>, ApiError> {
    let mut items =
        state.db.pipelines(caller.tenant_id()).await?.into_iter().map(object).collect::<Result<Vec<_>, _>>()?;
    if !items.iter().any(|p| p.name == DEFAULT_PIPELINE) {
        let at = items.partition_point(|p| p.name.as_str() < DEFAULT_PIPELINE);
        items.insert(at, bundled_default());
    }
    Ok(axum::Json(PipelineList { items }))
}

/// Removes a stored pipeline of the caller's tenant (runs that use it keep their copy).
#[utoipa::path(delete, path = "/v1/pipelines/{name}", tag = "runs", params(("name" = String, Path, description = "pipeline name")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn delete_pipeline(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
) -> Result<StatusCode, ApiError> {
    caller.require_write()?;
    let outcome = match state.db.delete_pipeline(caller.tenant_id(), &name).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(ApiError::not_found(format!("pipeline `{name}` not found"))),
        Err(e) => Err(e.into()),
    };
    state.audit(&caller, "pipeline.delete", &name, &outcome).await;
    outcome.map(|()| StatusCode::NO_CONTENT)
}
