//! deployd, the deployment agent that runs on every Docker host.
//!
//! The binary (`main.rs`) only parses arguments and calls into this library,
//! so integration tests drive exactly the code that production runs.

#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod config;
pub mod docker;
pub mod engine;
pub mod env_file;
pub mod store;
