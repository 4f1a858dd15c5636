//! The `qlayer` binary, as a user runs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod marketplace;
mod serve;
