//! The gRPC API of `qlayer serve` (tonic, with server reflection): the services in
//! `proto/qlayer/v1/qlayer.proto`, on the same operations, checks and audit records as REST.
//! Credentials travel as `authorization: Bearer <api key>` metadata; errors map to gRPC codes
//! with the REST error's stable code in the `x-qlayer-code` metadata.

use crate::AppState;
use crate::auth::{self, Caller};
use crate::error::{ApiError, PageQuery};
use crate::{jobs as job_ops, resources as ops};
use futures::StreamExt as _;
use std::pin::Pin;
use tonic::{Request, Response, Status};

/// The generated messages, servers and clients.
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]
pub mod proto {
    tonic::include_proto!("qlayer.v1");

    /// The encoded file descriptor set, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qlayer_descriptor.bin"));
}

use proto::*;

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        use axum::http::StatusCode as H;
        let code = match e.status() {
            H::BAD_REQUEST => tonic::Code::InvalidArgument,
            H::UNAUTHORIZED => tonic::Code::Unauthenticated,
            H::FORBIDDEN => tonic::Code::PermissionDenied,
            H::NOT_FOUND => tonic::Code::NotFound,
            H::CONFLICT => {
                if e.message().contains("already finished")
                    || e.message().contains("has no capsule")
                    || e.message().contains("not waiting at a gate")
                {
                    tonic::Code::FailedPrecondition
                } else {
                    tonic::Code::AlreadyExists
                }
            }
            H::PAYLOAD_TOO_LARGE | H::TOO_MANY_REQUESTS => tonic::Code::ResourceExhausted,
            H::UNPROCESSABLE_ENTITY => tonic::Code::FailedPrecondition,
            H::BAD_GATEWAY | H::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
            _ => tonic::Code::Internal,
        };
        metrics::counter!("qlayer_grpc_errors_total", "code" => e.code()).increment(1);
        let mut status = Status::new(code, e.message().to_string());
        if let Ok(v) = e.code().parse() {
            status.metadata_mut().insert("x-qlayer-code", v);
        }
        status
    }
}

/// The gRPC services over the service's shared state.
#[derive(Clone)]
pub struct Grpc {
    state: AppState,
}

impl Grpc {
    /// Services over `state`.
    pub fn new(state: AppState) -> Self {
        Grpc { state }
    }

    /// Authenticates a call and takes a token from its tenant's rate.
    async fn caller<T>(&self, request: &Request<T>, method: &'static str) -> Result<Caller, Status> {
        metrics::counter!("qlayer_grpc_requests_total", "method" => method).increment(1);
        let headers = request.metadata().clone().into_headers();
        let principal = auth::resolve(&self.state, &headers, request.remote_addr().map(|a| a.ip())).await?;
        if let Err(wait) = self.state.limiter.check(&principal.tenant_id) {
            return Err(ApiError::rate_limited(wait.as_secs_f64().ceil().max(1.0) as u64).into());
        }
        tracing::debug!(method, tenant = %principal.tenant_name, key = %principal.key_id, "grpc call");
        Ok(Caller(principal))
    }

    /// The router with every service, reflection (v1 and v1alpha, which older clients such as
    /// grpcio-reflection speak only); `serve` adds `grpc.health.v1.Health`.
    pub fn routes(self, max_message_bytes: usize) -> anyhow::Result<tonic::service::Routes> {
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let mut routes = tonic::service::RoutesBuilder::default();
        routes
            .add_service(tenants_server::TenantsServer::new(self.clone()).max_decoding_message_size(max_message_bytes))
            .add_service(keys_server::KeysServer::new(self.clone()).max_decoding_message_size(max_message_bytes))
            .add_service(plugins_server::PluginsServer::new(self.clone()).max_decoding_message_size(max_message_bytes))
            .add_service(jobs_server::JobsServer::new(self.clone()).max_decoding_message_size(max_message_bytes))
            .add_service(runs_server::RunsServer::new(self.clone()).max_decoding_message_size(max_message_bytes))
            .add_service(usage_server::UsageServer::new(self).max_decoding_message_size(max_message_bytes))
            .add_service(reflection)
            .add_service(reflection_v1alpha);
        Ok(routes.routes())
    }
}

/// Reports a message over the size limit as `RESOURCE_EXHAUSTED`, as the gRPC spec says, where
/// tonic answers `OUT_OF_RANGE`. Such a refusal comes before any response message, so its status
/// is in the (trailers-only) response headers.
pub fn resource_exhausted<B>(mut response: axum::http::Response<B>) -> axum::http::Response<B> {
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers.get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(|m| m.contains("too%20large"));
    if too_large {
        headers.insert("grpc-status", axum::http::HeaderValue::from_static("8"));
    }
    response
}

fn page(limit: u32, after: String) -> PageQuery {
    PageQuery { limit: (limit != 0).then_some(limit), after: (!after.is_empty()).then_some(after) }
}

fn tenant(t: qlayer_db::Tenant) -> Tenant {
    Tenant { id: t.id, name: t.name, created_at: t.created_at, weight: t.weight, max_running: t.max_running }
}

fn key(k: qlayer_db::ApiKey) -> ApiKey {
    ApiKey {
        id: k.id,
        tenant_id: k.tenant_id,
        name: k.name,
        role: k.role.as_str().to_string(),
        prefix: k.prefix,
        created_at: k.created_at,
        revoked_at: k.revoked_at,
    }
}

fn plugin(p: ops::PluginView) -> Plugin {
    Plugin {
        name: p.name,
        version: p.version,
        kind: p.kind,
        format: p.format,
        repository: p.repository,
        tag: p.tag,
        digest: p.digest,
        size: p.size,
        grants: Some(Grants {
            hosts: p.grants.hosts,
            config: p.grants.config.into_iter().collect(),
            secrets: p.grants.secrets.into_iter().collect(),
        }),
        signature: p.signature,
        installed_at: p.installed_at,
    }
}

fn job(j: qlayer_db::Job) -> Job {
    Job {
        id: j.id,
        tenant_id: j.tenant_id,
        kind: j.kind.as_str().to_string(),
        status: j.status.as_str().to_string(),
        priority: j.priority,
        idempotency_key: j.idempotency_key,
        input_json: j.input.to_string(),
        output_json: j.output.map(qlayer_db::JsonText::into_string),
        error: j.error,
        created_at: j.created_at,
        updated_at: j.updated_at,
        finished_at: j.finished_at,
        deadline_at: j.deadline_at,
        task_count: j.task_count,
    }
}

fn json_field(name: &str, text: &str) -> Result<serde_json::Value, Status> {
    serde_json::from_str(text).map_err(|e| ApiError::invalid(format!("{name}: not JSON: {e}")).into())
}

fn kind(name: &str, text: &str) -> Result<qlayer_db::JobKind, Status> {
    match text {
        "call" => Ok(qlayer_db::JobKind::Call),
        "run" => Ok(qlayer_db::JobKind::Run),
        other => Err(ApiError::invalid(format!("{name}: unknown job kind `{other}`: expected call or run")).into()),
    }
}

fn job_status(name: &str, text: &str) -> Result<qlayer_db::JobStatus, Status> {
    qlayer_db::JobStatus::named(text).ok_or_else(|| {
        ApiError::invalid(format!(
            "{name}: unknown job status `{}`: expected queued, running, waiting, succeeded, failed or cancelled",
            text.escape_debug()
        ))
        .into()
    })
}

#[tonic::async_trait]
impl tenants_server::Tenants for Grpc {
    async fn create_tenant(&self, request: Request<CreateTenantRequest>) -> Result<Response<TenantCreated>, Status> {
        let caller = self.caller(&request, "CreateTenant").await?;
        let body = ops::CreateTenant { name: request.into_inner().name };
        let c = ops::create_tenant_op(&self.state, &caller, body).await?;
        Ok(Response::new(TenantCreated { tenant: Some(tenant(c.tenant)), key: Some(key(c.key)), api_key: c.api_key }))
    }

    async fn list_tenants(&self, request: Request<ListRequest>) -> Result<Response<TenantPage>, Status> {
        let caller = self.caller(&request, "ListTenants").await?;
        let r = request.into_inner();
        let p = ops::list_tenants_op(&self.state, &caller, page(r.limit, r.after)).await?;
        Ok(Response::new(TenantPage {
            items: p.items.into_iter().map(tenant).collect(),
            next: p.next.unwrap_or_default(),
        }))
    }

    async fn get_tenant(&self, request: Request<IdRequest>) -> Result<Response<Tenant>, Status> {
        let caller = self.caller(&request, "GetTenant").await?;
        Ok(Response::new(tenant(ops::get_tenant_op(&self.state, &caller, &request.into_inner().id).await?)))
    }

    async fn set_tenant_share(&self, request: Request<SetTenantShareRequest>) -> Result<Response<Tenant>, Status> {
        let caller = self.caller(&request, "SetTenantShare").await?;
        let r = request.into_inner();
        let body = ops::TenantShare { weight: r.weight, max_running: r.max_running };
        Ok(Response::new(tenant(ops::set_tenant_share_op(&self.state, &caller, &r.id, body).await?)))
    }

    async fn set_tenant_limits(&self, request: Request<SetLimitsRequest>) -> Result<Response<Limits>, Status> {
        let caller = self.caller(&request, "SetTenantLimits").await?;
        let (id, body) = limits_body(request.into_inner());
        Ok(Response::new(limits_view(crate::limits::set_tenant_limits_op(&self.state, &caller, &id, &body).await?)))
    }
}

/// A `SetLimitsRequest` as the REST body.
fn limits_body(r: SetLimitsRequest) -> (String, crate::limits::Limits) {
    let budget = r.budget.map(|b| crate::limits::Budget { currency: b.currency, daily: b.daily, monthly: b.monthly });
    (r.id, crate::limits::Limits { rpm: r.rpm, tpm: r.tpm, budget })
}

fn limits_view(v: crate::limits::LimitsView) -> Limits {
    Limits {
        tenant_id: v.tenant_id,
        key_id: v.key_id,
        rpm: v.rpm,
        tpm: v.tpm,
        budget: v.budget.map(|b| Budget { currency: b.currency, daily: b.daily, monthly: b.monthly }),
    }
}

#[tonic::async_trait]
impl keys_server::Keys for Grpc {
    async fn create_key(&self, request: Request<CreateKeyRequest>) -> Result<Response<KeyCreated>, Status> {
        let caller = self.caller(&request, "CreateKey").await?;
        let r = request.into_inner();
        let role = r.role.parse().map_err(|e: qlayer_db::DbError| ApiError::invalid(format!("role: {e}")))?;
        let c = ops::create_key_op(
            &self.state,
            &caller,
            ops::CreateKey { name: r.name, role, tenant_id: Some(r.tenant_id) },
        )
        .await?;
        Ok(Response::new(KeyCreated { key: Some(key(c.key)), api_key: c.api_key }))
    }

    async fn list_keys(&self, request: Request<Empty>) -> Result<Response<KeyList>, Status> {
        let caller = self.caller(&request, "ListKeys").await?;
        let l = ops::list_keys_op(&self.state, &caller).await?;
        Ok(Response::new(KeyList { items: l.items.into_iter().map(key).collect() }))
    }

    async fn revoke_key(&self, request: Request<IdRequest>) -> Result<Response<Empty>, Status> {
        let caller = self.caller(&request, "RevokeKey").await?;
        ops::revoke_key_op(&self.state, &caller, &request.into_inner().id).await?;
        Ok(Response::new(Empty {}))
    }

    async fn set_key_limits(&self, request: Request<SetLimitsRequest>) -> Result<Response<Limits>, Status> {
        let caller = self.caller(&request, "SetKeyLimits").await?;
        let (id, body) = limits_body(request.into_inner());
        Ok(Response::new(limits_view(crate::limits::set_key_limits_op(&self.state, &caller, &id, &body).await?)))
    }
}

#[tonic::async_trait]
impl plugins_server::Plugins for Grpc {
    async fn list_plugins(&self, request: Request<Empty>) -> Result<Response<PluginList>, Status> {
        let caller = self.caller(&request, "ListPlugins").await?;
        let l = ops::list_plugins_op(&self.state, &caller).await?;
        Ok(Response::new(PluginList { items: l.items.into_iter().map(plugin).collect() }))
    }

    async fn get_plugin(&self, request: Request<NameRequest>) -> Result<Response<Plugin>, Status> {
        let caller = self.caller(&request, "GetPlugin").await?;
        Ok(Response::new(plugin(ops::get_plugin_op(&self.state, &caller, &request.into_inner().name).await?)))
    }

    async fn install_plugin(
        &self,
        request: Request<InstallPluginRequest>,
    ) -> Result<Response<PluginInstalled>, Status> {
        let caller = self.caller(&request, "InstallPlugin").await?;
        let r = request.into_inner();
        let grants = r.grants.unwrap_or_default();
        let body = ops::InstallPlugin {
            reference: r.reference,
            grants: ops::Grants {
                hosts: grants.hosts,
                config: grants.config.into_iter().collect(),
                secrets: grants.secrets.into_iter().collect(),
            },
        };
        let done = ops::install_plugin_op(&self.state, &caller, body).await?;
        Ok(Response::new(PluginInstalled { plugin: Some(plugin(done.plugin)), warning: done.warning }))
    }

    async fn remove_plugin(&self, request: Request<NameRequest>) -> Result<Response<Empty>, Status> {
        let caller = self.caller(&request, "RemovePlugin").await?;
        ops::remove_plugin_op(&self.state, &caller, &request.into_inner().name).await?;
        Ok(Response::new(Empty {}))
    }
}

type EventStream = Pin<Box<dyn futures::Stream<Item = Result<JobEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl jobs_server::Jobs for Grpc {
    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<Job>, Status> {
        let caller = self.caller(&request, "SubmitJob").await?;
        let r = request.into_inner();
        let input = json_field("input_json", &r.input_json)?;
        let (j, _) = job_ops::submit_op(
            &self.state,
            &caller,
            kind("kind", &r.kind)?,
            input,
            Some(r.priority),
            r.idempotency_key,
            qlayer_jobs::JobLimits { deadline_ms: r.deadline_ms, max_attempts: r.max_attempts },
        )
        .await?;
        Ok(Response::new(job(j)))
    }

    async fn get_job(&self, request: Request<IdRequest>) -> Result<Response<Job>, Status> {
        let caller = self.caller(&request, "GetJob").await?;
        Ok(Response::new(job(job_ops::find(&self.state, &caller, &request.into_inner().id, None).await?)))
    }

    async fn list_jobs(&self, request: Request<ListJobsRequest>) -> Result<Response<JobPage>, Status> {
        let caller = self.caller(&request, "ListJobs").await?;
        let r = request.into_inner();
        let query = job_ops::JobQuery {
            limit: (r.limit != 0).then_some(r.limit),
            after: (!r.after.is_empty()).then_some(r.after),
            kind: if r.kind.is_empty() { None } else { Some(kind("kind", &r.kind)?) },
            status: if r.status.is_empty() { None } else { Some(job_status("status", &r.status)?) },
        };
        let p = job_ops::list_jobs_op(&self.state, &caller, query).await?;
        Ok(Response::new(JobPage { items: p.items.into_iter().map(job).collect(), next: p.next.unwrap_or_default() }))
    }

    async fn cancel_job(&self, request: Request<IdRequest>) -> Result<Response<Job>, Status> {
        let caller = self.caller(&request, "CancelJob").await?;
        Ok(Response::new(job(job_ops::cancel_op(&self.state, &caller, &request.into_inner().id).await?)))
    }

    async fn list_job_tasks(&self, request: Request<IdRequest>) -> Result<Response<TaskList>, Status> {
        let caller = self.caller(&request, "ListJobTasks").await?;
        let list = job_ops::job_tasks_op(&self.state, &caller, &request.into_inner().id).await?;
        let items = list
            .items
            .into_iter()
            .map(|t| Task {
                id: t.id,
                name: t.name,
                plugin: t.plugin,
                status: t.status.as_str().to_string(),
                attempts: t.attempts,
                max_attempts: t.max_attempts,
                depends_on: t.depends_on,
                output_json: t.output.map(qlayer_db::JsonText::into_string),
                error: t.error,
            })
            .collect();
        Ok(Response::new(TaskList { items }))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<EventStream>, Status> {
        let caller = self.caller(&request, "WatchJob").await?;
        let r = request.into_inner();
        job_ops::find(&self.state, &caller, &r.id, None).await?;
        let stream = job_ops::event_stream(self.state.clone(), caller.tenant_id().to_string(), r.id, r.after_seq)
            .map(|e| Ok(JobEvent { seq: e.seq, at: e.at, kind: e.kind, data_json: e.data.to_string() }));
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl runs_server::Runs for Grpc {
    async fn submit_run(&self, request: Request<SubmitRunRequest>) -> Result<Response<Job>, Status> {
        let caller = self.caller(&request, "SubmitRun").await?;
        let r = request.into_inner();
        let run = qlayer_jobs::RunInput {
            requirement: r.requirement,
            provider: r.provider,
            script: qlayer_jobs::parse_script(r.script.map(serde_json::Value::String).unwrap_or_default())
                .map_err(ApiError::invalid)?,
            options: r.options_json.as_deref().map(|o| json_field("options_json", o)).transpose()?,
            max_repair_rounds: r.max_repair_rounds,
            token_budget: r.token_budget,
            pipeline: match (r.pipeline, r.pipeline_json) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::invalid("give `pipeline` or `pipeline_json`, not both").into());
                }
                (Some(name), None) => Some(qlayer_jobs::PipelineChoice::Name(name)),
                (None, Some(text)) => Some(qlayer_jobs::PipelineChoice::Inline(Box::new(
                    qlayer_jobs::Pipeline::from_json(json_field("pipeline_json", &text)?)
                        .map_err(|e| ApiError::invalid(format!("pipeline_json: {e}")))?,
                ))),
                (None, None) => None,
            },
        };
        let input = serde_json::to_value(&run).map_err(ApiError::internal)?;
        let (j, _) = job_ops::submit_op(
            &self.state,
            &caller,
            qlayer_db::JobKind::Run,
            input,
            Some(r.priority),
            r.idempotency_key,
            qlayer_jobs::JobLimits { deadline_ms: r.deadline_ms, max_attempts: None },
        )
        .await?;
        Ok(Response::new(job(j)))
    }

    async fn get_run(&self, request: Request<IdRequest>) -> Result<Response<Job>, Status> {
        let caller = self.caller(&request, "GetRun").await?;
        let id = request.into_inner().id;
        Ok(Response::new(job(job_ops::find(&self.state, &caller, &id, Some(qlayer_db::JobKind::Run)).await?)))
    }

    async fn get_capsule(&self, request: Request<IdRequest>) -> Result<Response<Capsule>, Status> {
        let caller = self.caller(&request, "GetCapsule").await?;
        let a = job_ops::capsule_op(&self.state, &caller, &request.into_inner().id).await?;
        Ok(Response::new(Capsule { media_type: a.media_type, data: a.bytes }))
    }

    async fn approve_run(&self, request: Request<GateRequest>) -> Result<Response<Job>, Status> {
        let caller = self.caller(&request, "ApproveRun").await?;
        let GateRequest { id, comment } = request.into_inner();
        Ok(Response::new(job(job_ops::gate_op(&self.state, &caller, &id, true, comment).await?)))
    }

    async fn reject_run(&self, request: Request<GateRequest>) -> Result<Response<Job>, Status> {
        let caller = self.caller(&request, "RejectRun").await?;
        let GateRequest { id, comment } = request.into_inner();
        Ok(Response::new(job(job_ops::gate_op(&self.state, &caller, &id, false, comment).await?)))
    }

    async fn publish_run(&self, request: Request<PublishRequest>) -> Result<Response<Published>, Status> {
        let caller = self.caller(&request, "PublishRun").await?;
        let PublishRequest { id, reference } = request.into_inner();
        let done = job_ops::publish_op(&self.state, &caller, &id, &reference).await?;
        Ok(Response::new(Published { reference: done.reference, digest: done.digest, signed: done.signed }))
    }
}

#[tonic::async_trait]
impl usage_server::Usage for Grpc {
    async fn get_usage(&self, request: Request<UsageRequest>) -> Result<Response<UsageReport>, Status> {
        let caller = self.caller(&request, "GetUsage").await?;
        let r = request.into_inner();
        let query = crate::gateway::UsageQuery {
            from: (r.from != 0).then_some(r.from),
            to: (r.to != 0).then_some(r.to),
            key: (!r.key.is_empty()).then_some(r.key),
            model: (!r.model.is_empty()).then_some(r.model),
            group_by: (!r.group_by.is_empty()).then_some(r.group_by),
        };
        let report = crate::gateway::usage_op(&self.state, &caller, &query).await?;
        Ok(Response::new(UsageReport {
            group_by: report.group_by,
            data: report
                .data
                .into_iter()
                .map(|g| UsageRow {
                    group: g.group,
                    requests: g.requests,
                    errors: g.errors,
                    cache_hits: g.cache_hits,
                    prompt_tokens: g.prompt_tokens,
                    completion_tokens: g.completion_tokens,
                    total_tokens: g.total_tokens,
                    cost_nanos: g.cost_nanos,
                })
                .collect(),
            limits: report
                .limits
                .into_iter()
                .map(|l| LimitStanding {
                    scope: l.scope,
                    key_id: l.key_id,
                    limit: l.limit,
                    max: l.max,
                    used: l.used,
                    remaining: l.remaining,
                    currency: l.currency,
                    window_start: l.window_start,
                    resets_at: l.resets_at,
                })
                .collect(),
        }))
    }
}
