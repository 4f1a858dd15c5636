//! Factory runs through the core scheduler, as DAGs of their steps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod run;
