//! fanout: a campaign fan-out engine on timely dataflow.
//!
//! A job (a TOML file, [`job`]) names campaigns, a user source, a store and a push provider.
//! `fanout run` turns it into one timely dataflow ([`dataflow`]):
//!
//! ```text
//!  campaigns + granted ──(broadcast / by bucket)──┐
//!  bucket scans ────────(exchange by bucket id)───┴─► scan: expand bucket, persona filter,
//!                                                     drop granted ─► push sink: claim in the
//!                                                     store, render, batch, push on tokio,
//!                                                     mark done, release the epoch
//! ```
//!
//! # Layout
//! - [`cli`]: flags only (clap), no I/O.
//! - [`job`]: the job file (serde, unknown keys refused), validation, CLI overrides.
//! - [`model`]: plain data (users, tags, buckets, campaigns, deliveries); the bucket math.
//! - [`policy`]: holdouts, frequency caps, quiet hours (SPEC "Policy").
//! - [`history`]: each user's recent capped sends in 8 bytes, for frequency caps.
//! - [`audience`]: persona matching. [`template`]: message templates. [`render`]: a
//!   target's message straight into its JSON delivery record (the per-user hot path).
//! - [`sources`]: users from JSON Lines, CSV or a synthetic generator, by id range.
//! - [`store`]: the grant ledger with its atomic claim (embedded file store).
//! - [`providers`]: where messages go (`log:`, `mock:`, `http(s)://`, `fcm:`), retries, rate
//!   limit, dead letters.
//! - [`dataflow`]: the timely graph: one operator per file.
//! - [`metrics`]: counters, latency histogram, the run summary, the progress bar.
//! - [`run`]: `fanout run`/`plan`: wires a job to the dataflow and drives it; `run::cluster`:
//!   one job as several processes of a timely cluster.
//! - [`grants`]: `fanout grants`, the audit trail of who a campaign was granted to.
//! - [`report`]: `fanout report`, a campaign's outcome counts and its lift against the
//!   held-out users.
//! - [`control`]: `fanout campaigns`, every campaign's state and outcomes; pause, resume,
//!   cancel.
//! - [`serve`]: `fanout serve`: the same dataflow, generation after generation, fed by Redis
//!   streams ([`streams`]) and schedules, with a live status page (pause, resume, cancel),
//!   /metrics and /healthz.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audience;
pub mod cli;
pub mod control;
pub mod dataflow;
pub mod error;
pub mod gen;
pub mod grants;
pub mod history;
pub mod job;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod providers;
pub mod render;
pub mod report;
pub mod run;
pub mod serve;
pub mod signals;
pub mod sources;
pub mod store;
pub mod streams;
pub mod template;

pub use error::{Error, Result};

/// The tests' random numbers: a xorshift64 generator from `seed`, each call a number below
/// its argument (reproducible, no dependency).
#[cfg(test)]
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}
