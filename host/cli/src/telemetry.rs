//! Optional OTLP export of the service's traces (`qlayer serve --otlp-endpoint` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`): the same spans as the JSON log (a request with its id, route,
//! tenant and key id; a job with its kind, tenant and plugin), batched to an OpenTelemetry
//! collector over OTLP/gRPC. Off unless an endpoint is given.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// A tracer provider exporting to `endpoint` (e.g. `http://127.0.0.1:4317`). Call inside the
/// tokio runtime that will run the service: the exporter's connection lives on it.
pub fn otlp_provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name("qlayer").build())
        .build())
}

/// The tracing layer that turns spans into OpenTelemetry spans of `provider`.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("qlayer"))
}
