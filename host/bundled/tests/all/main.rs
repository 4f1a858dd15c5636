//! The first-party providers against local test servers that speak each upstream's wire format.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod anthropic;
mod bedrock;
mod provider;
