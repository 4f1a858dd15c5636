//! The `qlayer` binary, as a user runs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod deploy;
mod languages;
mod marketplace;
mod serve;
