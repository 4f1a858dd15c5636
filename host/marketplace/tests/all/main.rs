//! The marketplace against a real OCI registry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod marketplace;
