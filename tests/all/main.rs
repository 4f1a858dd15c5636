//! The workspace's layout: which crate may depend on which.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod layout;
