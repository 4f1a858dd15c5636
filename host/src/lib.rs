//! The QuantumLayer plugin host: runs sandboxed WebAssembly plugins (LLM providers, agents,
//! validators, tools) per tenant, and the software-factory pipeline built on them.

pub mod api;
pub mod embedded;
pub mod factory;
pub mod grpc;
pub mod jobs;
pub mod local;
pub mod marketplace;
pub mod router;
pub mod runtime;
pub mod scaffold;
pub mod scheduler;
pub mod serve;
pub mod telemetry;
