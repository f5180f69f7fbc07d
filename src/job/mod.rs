//! The job file (SPEC "Job file"): serde tables that refuse unknown keys, validated once into a
//! [`Job`] whose campaigns are ready to run.
//!
//! Parsing happens in two steps, as in vector's config: serde reads the text into raw tables that
//! keep each value's byte span ([`toml::Spanned`]), then validation turns them into runtime values
//! and, when a value is wrong, names `file:line: field: what was expected`. Values given on the
//! command line ([`Overrides`]) win over the file and are named by their flag in errors.
//!
//! - [`campaign`]: one `[[campaign]]` table, its checks and its content hash.
//! - `policy`: the `[policy]` table.
//! - `locate`: byte offsets to lines and dotted field names, toml errors to [`InputError`].

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, InputError, Result};
use crate::model::Campaign;
use crate::providers::ProviderSpec;

mod campaign;
mod locate;
mod policy;
#[cfg(test)]
mod tests;

pub use campaign::{content_hash, parse_campaign};
pub use locate::is_valid_id;

use campaign::RawCampaign;
use locate::{Doc, Shape};
use policy::RawPolicy;

/// Where an error in a command-line override is reported as coming from.
const COMMAND_LINE: &str = "command line";
/// Most worker threads one process may run.
const MAX_WORKERS: usize = 1024;

/// Values given on the command line; each overrides the job file (SPEC: "Every value the CLI
/// also takes overrides the job file"). Errors in them name the flag (`--now`, `--workers`, …).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--users`: the users input.
    pub users: Option<String>,
    /// `--logins`: login events.
    pub logins: Option<String>,
    /// `--campaigns`: the stream of campaigns submitted to `serve`.
    pub campaigns: Option<String>,
    /// `--granted`: pairs granted before fanout existed.
    pub granted: Option<String>,
    /// `--store`: the store URL.
    pub store: Option<String>,
    /// `--provider`: the provider URL.
    pub provider: Option<String>,
    /// `--concurrency`: pushes in flight.
    pub concurrency: Option<usize>,
    /// `--workers`: worker threads.
    pub workers: Option<usize>,
    /// `--now`: the clock, RFC 3339.
    pub now: Option<String>,
    /// `--bucket-size`: users per id bucket.
    pub bucket_size: Option<u32>,
    /// `--batch-max-messages`: messages per provider batch.
    pub batch_max_messages: Option<usize>,
    /// `--batch-max-bytes`: serialized bytes per provider batch.
    pub batch_max_bytes: Option<usize>,
    /// `--rate-per-s`: pushes per second, 0 = unlimited.
    pub rate_per_s: Option<u64>,
    /// `--max-attempts`: tries per message.
    pub max_attempts: Option<u32>,
    /// `--dead-letter`: where undeliverable messages go.
    pub dead_letter: Option<String>,
    /// `--logins-per-epoch`: login events fed to the dataflow per epoch.
    pub logins_per_epoch: Option<usize>,
}

/// A validated job: inputs, engine settings, store, provider and campaigns.
#[derive(Debug, Clone)]
pub struct Job {
    /// The job file as the user named it.
    pub path: String,
    /// Where users, logins and pre-existing grants come from.
    pub inputs: Inputs,
    /// Sharding, batching, clock and threads.
    pub engine: Engine,
    /// The store URL (`file:DIR`, `redis://…`).
    pub store: String,
    /// Where messages go.
    pub provider: ProviderConfig,
    /// The campaigns, in file order; ids are unique.
    pub campaigns: Vec<Arc<Campaign>>,
    /// Rules across campaigns (`[policy]`; the default applies none).
    pub policy: crate::policy::Policy,
}

impl Job {
    /// SPEC: "A job without campaigns is bad input" — a run of one would send nothing and say
    /// nothing. `serve` calls this only when it follows no campaigns stream
    /// ([`Inputs::campaigns`]), since campaigns may all arrive on the stream.
    pub fn require_campaigns(&self) -> Result<()> {
        if !self.campaigns.is_empty() {
            return Ok(());
        }
        Err(InputError::new(
            &self.path,
            None,
            "campaign",
            "no [[campaign]] table: a job needs at least one campaign \
             (serve may follow a campaigns stream instead: inputs.campaigns or --campaigns)",
        )
        .into())
    }
}

/// `[inputs]`. Paths are relative to the current directory, not to the job file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// Users: a `.jsonl`/`.csv` path, `synthetic:N[:SEED]` or `redis://…`.
    pub users: String,
    /// Login events, for `on_login` coupons.
    pub logins: Option<String>,
    /// Where `serve` reads submitted campaigns: a `redis://…` server's `fanout:campaigns`
    /// stream (an extension of the SPEC's table).
    pub campaigns: Option<String>,
    /// Pairs already granted before this engine existed.
    pub granted: Option<String>,
}

/// `[engine]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    /// Users (ids) per bucket, ≥ 1.
    pub bucket_size: u32,
    /// Messages per batch handed to the provider, ≥ 1.
    pub batch_max_messages: usize,
    /// Serialized bytes per batch, ≥ 1.
    pub batch_max_bytes: usize,
    /// The clock: `--now`, else `[engine] now`, else the system clock at load time.
    pub now: DateTime<Utc>,
    /// Worker threads, 1..=1024: `--workers`, else `[engine] workers` (an extension of the
    /// SPEC's table, so a job file can pin its parallelism), else the machine's cores.
    pub workers: usize,
    /// Login events fed to the dataflow per epoch, ≥ 1 (an extension; default 65536).
    pub logins_per_epoch: usize,
}

/// `[provider]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    /// `log:PATH`, `mock:…`, `http(s)://…`, `fcm:…`.
    pub url: String,
    /// Pushes in flight at once, ≥ 1.
    pub concurrency: usize,
    /// Pushes per second; 0 = unlimited.
    pub rate_per_s: u64,
    /// Tries per message for retryable failures, ≥ 1.
    pub max_attempts: u32,
    /// Where messages that could not be delivered are written.
    pub dead_letter: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    inputs: Option<Spanned<RawInputs>>,
    #[serde(default)]
    engine: RawEngine,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    provider: RawProvider,
    #[serde(default, rename = "campaign")]
    campaigns: Vec<Spanned<RawCampaign>>,
    #[serde(default)]
    policy: RawPolicy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInputs {
    users: Option<Spanned<String>>,
    logins: Option<Spanned<String>>,
    campaigns: Option<Spanned<String>>,
    granted: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    bucket_size: Option<Spanned<u32>>,
    batch_max_messages: Option<Spanned<usize>>,
    batch_max_bytes: Option<Spanned<usize>>,
    now: Option<Spanned<toml::Value>>,
    workers: Option<Spanned<usize>>,
    logins_per_epoch: Option<Spanned<usize>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    url: Option<Spanned<String>>,
    concurrency: Option<Spanned<usize>>,
    rate_per_s: Option<Spanned<u64>>,
    max_attempts: Option<Spanned<u32>>,
    dead_letter: Option<Spanned<String>>,
}

/// Reads and validates the job file at `path` (paths in it are relative to the current
/// directory, not the job file).
pub fn load(path: &Path, overrides: &Overrides) -> Result<Job> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| InputError::new(&label, None, "", format!("cannot read the job file: {e}")))?;
    parse(&label, &text, overrides)
}

/// The same from text; `label` names the file in errors.
pub fn parse(label: &str, text: &str, overrides: &Overrides) -> Result<Job> {
    let doc = Doc::new(label, text, Shape::Job);
    let raw: RawJob = doc.deserialize()?;
    let inputs = inputs(&doc, raw.inputs, overrides)?;
    let engine = engine(&doc, raw.engine, overrides)?;
    let store = text_setting(
        &doc,
        raw.store.url,
        &overrides.store,
        ("store.url", "--store"),
        crate::store::check_url,
    )?
    .unwrap_or_else(|| "file:.fanout".to_owned());
    let provider = provider(&doc, raw.provider, overrides)?;
    let mut campaigns: Vec<Arc<Campaign>> = Vec::with_capacity(raw.campaigns.len());
    let mut first_line = std::collections::HashMap::new();
    for (i, raw) in raw.campaigns.into_iter().enumerate() {
        let id_span = raw.get_ref().id.span();
        let c = raw.into_inner().validate(&doc, i)?;
        if let Some(line) = first_line.insert(c.id.clone(), doc.line(id_span.start)) {
            return Err(doc.error(
                id_span.start,
                format!("campaign \"{}\".id", c.id),
                format!("duplicate campaign id; first defined at line {line}"),
            ));
        }
        campaigns.push(Arc::new(c));
    }
    let policy = raw.policy.validate(&doc)?;
    Ok(Job {
        path: label.to_owned(),
        inputs,
        engine,
        store,
        provider,
        campaigns,
        policy,
    })
}

fn inputs(doc: &Doc, raw: Option<Spanned<RawInputs>>, o: &Overrides) -> Result<Inputs> {
    let line = raw.as_ref().map(|r| doc.line(r.span().start));
    let raw = raw.map(Spanned::into_inner);
    let (users, logins, campaigns, granted) = match raw {
        Some(r) => (r.users, r.logins, r.campaigns, r.granted),
        None => (None, None, None, None),
    };
    let users = text_setting(
        doc,
        users,
        &o.users,
        ("inputs.users", "--users"),
        redis_form,
    )?
    .ok_or_else(|| {
        InputError::new(
            doc.label,
            line,
            "inputs.users",
            "required: a .jsonl/.csv path, synthetic:N[:SEED] or redis://… (or pass --users)",
        )
    })?;
    Ok(Inputs {
        users,
        logins: text_setting(
            doc,
            logins,
            &o.logins,
            ("inputs.logins", "--logins"),
            redis_form,
        )?,
        campaigns: text_setting(
            doc,
            campaigns,
            &o.campaigns,
            ("inputs.campaigns", "--campaigns"),
            campaign_stream,
        )?,
        granted: text_setting(
            doc,
            granted,
            &o.granted,
            ("inputs.granted", "--granted"),
            any_text,
        )?,
    })
}

fn engine(doc: &Doc, raw: RawEngine, o: &Overrides) -> Result<Engine> {
    let now = match (&o.now, raw.now) {
        (Some(cli), _) => campaign::rfc3339(cli).map_err(|msg| cli_error("--now", msg))?,
        (None, Some(v)) => campaign::time_value(v.get_ref())
            .map_err(|msg| doc.error(v.span().start, "engine.now", msg))?,
        (None, None) => Utc::now(),
    };
    Ok(Engine {
        bucket_size: setting(
            doc,
            raw.bucket_size,
            o.bucket_size,
            ("engine.bucket_size", "--bucket-size"),
            1000,
            (at_least_1, "must be at least 1"),
        )?,
        batch_max_messages: setting(
            doc,
            raw.batch_max_messages,
            o.batch_max_messages,
            ("engine.batch_max_messages", "--batch-max-messages"),
            100,
            (at_least_1, "must be at least 1"),
        )?,
        batch_max_bytes: setting(
            doc,
            raw.batch_max_bytes,
            o.batch_max_bytes,
            ("engine.batch_max_bytes", "--batch-max-bytes"),
            819_200,
            (at_least_1, "must be at least 1"),
        )?,
        now,
        workers: setting(
            doc,
            raw.workers,
            o.workers,
            ("engine.workers", "--workers"),
            default_workers(),
            (|v| (1..=MAX_WORKERS).contains(&v), "must be 1..=1024"),
        )?,
        logins_per_epoch: setting(
            doc,
            raw.logins_per_epoch,
            o.logins_per_epoch,
            ("engine.logins_per_epoch", "--logins-per-epoch"),
            1 << 16,
            (at_least_1, "must be at least 1"),
        )?,
    })
}

fn provider(doc: &Doc, raw: RawProvider, o: &Overrides) -> Result<ProviderConfig> {
    let url = text_setting(
        doc,
        raw.url,
        &o.provider,
        ("provider.url", "--provider"),
        |url| ProviderSpec::parse_url(url).map(drop),
    )?;
    let dead_letter = text_setting(
        doc,
        raw.dead_letter,
        &o.dead_letter,
        ("provider.dead_letter", "--dead-letter"),
        any_text,
    )?;
    Ok(ProviderConfig {
        url: url.unwrap_or_else(|| "log:deliveries.jsonl".to_owned()),
        concurrency: setting(
            doc,
            raw.concurrency,
            o.concurrency,
            ("provider.concurrency", "--concurrency"),
            1000,
            (at_least_1, "must be at least 1"),
        )?,
        rate_per_s: setting(
            doc,
            raw.rate_per_s,
            o.rate_per_s,
            ("provider.rate_per_s", "--rate-per-s"),
            0,
            (|_| true, ""),
        )?,
        max_attempts: setting(
            doc,
            raw.max_attempts,
            o.max_attempts,
            ("provider.max_attempts", "--max-attempts"),
            5,
            (at_least_1, "must be at least 1"),
        )?,
        dead_letter: dead_letter.unwrap_or_else(|| "dead-letters.jsonl".to_owned()),
    })
}

/// The check most counts need.
fn at_least_1<T: PartialOrd + From<u8>>(v: T) -> bool {
    v >= T::from(1)
}

/// Worker threads when neither the job nor `--workers` says: one per core (SPEC `--workers`).
fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .min(MAX_WORKERS)
}

/// A number from the command line (`flag`) or else the file (`field`, dotted), else `default`;
/// a value that fails `ok` is an error naming where it came from and saying `expected`.
fn setting<T: Copy>(
    doc: &Doc,
    file: Option<Spanned<T>>,
    cli: Option<T>,
    (field, flag): (&str, &str),
    default: T,
    (ok, expected): (impl Fn(T) -> bool, &str),
) -> Result<T> {
    match (cli, file) {
        (Some(v), _) if ok(v) => Ok(v),
        (Some(_), _) => Err(cli_error(flag, expected)),
        (None, Some(v)) if ok(*v.get_ref()) => Ok(*v.get_ref()),
        (None, Some(v)) => Err(doc.error(v.span().start, field, expected)),
        (None, None) => Ok(default),
    }
}

/// A text value from the command line (`flag`) or else the file (`field`, dotted); an empty
/// one, or one `check` refuses, is an error naming where it came from.
fn text_setting(
    doc: &Doc,
    file: Option<Spanned<String>>,
    cli: &Option<String>,
    (field, flag): (&str, &str),
    check: impl Fn(&str) -> std::result::Result<(), String>,
) -> Result<Option<String>> {
    let checked = |v: &str| match v.is_empty() {
        true => Err("must not be empty".to_owned()),
        false => check(v),
    };
    match (cli, file) {
        (Some(v), _) => match checked(v) {
            Ok(()) => Ok(Some(v.clone())),
            Err(msg) => Err(cli_error(flag, msg)),
        },
        (None, Some(v)) => match checked(v.get_ref()) {
            Ok(()) => Ok(Some(v.into_inner())),
            Err(msg) => Err(doc.error(v.span().start, field, msg)),
        },
        (None, None) => Ok(None),
    }
}

/// Any text will do (a path, checked when it is opened).
fn any_text(_: &str) -> std::result::Result<(), String> {
    Ok(())
}

/// An input that may be a file or a Redis server: a `redis://…` one must parse.
fn redis_form(input: &str) -> std::result::Result<(), String> {
    match crate::run::is_redis(input) {
        true => crate::store::check_redis_url(input),
        false => Ok(()),
    }
}

/// The stream `serve` reads submitted campaigns from: only Redis has one.
fn campaign_stream(input: &str) -> std::result::Result<(), String> {
    match crate::run::is_redis(input) {
        true => crate::store::check_redis_url(input),
        false => {
            Err("campaigns are submitted on a Redis stream: expected redis://host:port/db".into())
        }
    }
}

/// A bad value given on the command line with `flag`.
fn cli_error(flag: &str, msg: impl Into<String>) -> Error {
    InputError::new(COMMAND_LINE, None, flag, msg).into()
}
