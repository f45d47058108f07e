//! Tessera's domain: the types every other crate shares.
//!
//! This crate owns resource arithmetic and quantity parsing, the job spec and
//! its validation, the job record and lifecycle, nodes and their inventory,
//! teams, roles and tokens, and the messages between server and agent. It does
//! no I/O and reads no clock: times are passed in as milliseconds since the
//! Unix epoch. It must not depend on any other Tessera crate.

pub mod auth;
pub mod error;
pub mod job;
pub mod lake;
pub mod node;
pub mod protocol;
pub mod quantity;
pub mod service;
pub mod spec;

pub use error::FieldError;
pub use job::{Event, Job, JobId, JobState};
pub use spec::{JobSpec, JobTemplate, Resources};
