//! The service in process: REST, gRPC and the scheduler behind them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod cache;
mod capsules;
mod gates;
mod gateway;
mod limits;
mod mcp;
mod pipelines;
mod scheduler;
mod ui;
