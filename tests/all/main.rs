//! Workspace integration tests, one binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod factory;
mod marketplace;
mod provider;
mod sandbox;
mod scheduler;
