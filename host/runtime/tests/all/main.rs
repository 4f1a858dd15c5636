//! The sandbox, with hostile guests and local test servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod sandbox;
