//! Sources of the desired model ([`crate::state::desired::Desired`]). Each turns what it reads
//! into the same neutral model and hands it to [`crate::state::State::apply`]; nothing
//! downstream knows which source it came from.
//!
//! - [`file`]: the mesh file, reloaded when it changes (the default for the demo, the tests and
//!   hosts without Kubernetes).
//! - [`kube`]: Kubernetes (kube-rs watchers and reflectors; `--discovery kube`).

pub mod file;
pub mod kube;
