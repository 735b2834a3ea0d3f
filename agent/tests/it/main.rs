//! deployd's integration tests, in one binary so that every test shares the
//! test threads: a long test of one module runs beside the short tests of
//! the others instead of after them. The modules drive a real agent, the
//! real Docker engine and the test bed's private registry and releases
//! (`scripts/testbed.sh up`); `swarm`'s tests, named `..._on_swarm`, need
//! the engine to be a Swarm and are run apart by `scripts/test.sh`. What
//! they share with deployctl's tests is the test kit (`deployd-testkit`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod auth;
mod ci_templates;
mod engine;
mod socket;
mod swarm;
mod switch;
mod testbed;
mod traffic;
