//! Where messages go: push providers behind one enum, and the shared delivery policy.
//!
//! - [`log`]: `log:PATH` / `log:-`, delivery records as JSON Lines (the default).
//! - [`mock`]: `mock:latency=…,jitter=…,fail=…,permanent=…`, a simulated provider for benchmarks.
//! - [`http`]: `http://…` / `https://…`, one POST of the delivery record per message.
//! - [`http1`]: plain `http://` keep-alive connections, driven by the task that sends.
//! - [`fcm`]: `fcm:project=ID[,endpoint=URL]`, Firebase Cloud Messaging HTTP v1.
//! - [`remote`]: what `http` and `fcm` share: the pooled client, timeouts, `Retry-After`.
//! - [`rate`]: the token bucket behind `rate_per_s`.
//! - [`dispatch`]: concurrency cap, retries with backoff, dead letters, the stop on rejected
//!   credentials — shared by every provider.

pub mod dead_letters;
pub mod dispatch;
pub mod fcm;
pub mod http;
pub mod http1;
pub mod log;
pub mod mock;
pub mod rate;
pub mod remote;

use std::time::Duration;

use crate::error::{Error, Result};

/// Why one attempt to push one message did not deliver it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A transient failure: try again later (after `after`, if the provider said so).
    Retry {
        /// What went wrong.
        error: String,
        /// The provider's `Retry-After`, if any.
        after: Option<Duration>,
    },
    /// It can never succeed (payload refused): dead-letter it.
    Permanent(String),
    /// The provider says the user's push token is invalid or no longer registered: permanent
    /// (dead-lettered) and counted in the summary's `invalid_tokens`.
    InvalidToken(String),
    /// The provider refused *our* credentials (401/403): not the user's fault, so never a dead
    /// letter. Several in a row stop the run (see [`dispatch`]).
    Unauthorized(String),
    /// The user cannot be addressed by this provider (no token): counted, not sent.
    Unreachable,
}

/// What one attempt at one message came to: `None` delivered, else why not; and how long
/// the push itself took (from the rate token to the answer).
pub type Attempt = (Option<Outcome>, Duration);

/// A message ready to push: a view of its delivery record, rendered once (see
/// [`crate::render`]) into a buffer its push task owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// The recipient.
    pub user: u32,
    /// The [`crate::model::Delivery`] record as one line of JSON (no newline): what `log:` writes, what
    /// `http` posts, what batches are sized by.
    pub json: &'a str,
    /// The recipient's push token, for providers that address devices.
    pub token: Option<&'a str>,
}

impl Message<'_> {
    /// The delivery record plus `"error"` and `"attempts"`: a dead letter (SPEC).
    pub fn dead_letter(&self, error: &str, attempts: u32) -> String {
        let error = serde_json::to_string(error).unwrap_or_else(|_| "\"\"".into());
        let head = self.json.strip_suffix('}').unwrap_or(self.json);
        format!("{head},\"error\":{error},\"attempts\":{attempts}}}")
    }
}

/// A configured push provider.
#[derive(Debug)]
pub enum Provider {
    /// Writes delivery records to a file or stdout.
    Log(log::LogProvider),
    /// Simulates a remote provider's latency and failures.
    Mock(mock::MockProvider),
    /// POSTs each delivery record to a URL.
    Http(http::HttpProvider),
    /// Sends each message through FCM HTTP v1.
    Fcm(fcm::FcmProvider),
}

/// A provider as the job names it: parsed and checked, nothing opened yet (so `plan` and a
/// run that stops on bad input touch no output).
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderSpec {
    /// `log:PATH` or `log:-`.
    Log(String),
    /// `mock:…`.
    Mock(mock::MockProvider),
    /// `http://…` or `https://…`.
    Http(http::HttpSpec),
    /// `fcm:project=ID[,endpoint=URL]`.
    Fcm(fcm::FcmSpec),
}

impl ProviderSpec {
    /// Parses a `[provider] url`.
    pub fn parse(url: &str) -> Result<ProviderSpec> {
        let bad = |msg: String| Error::Usage(format!("provider.url \"{url}\": {msg}"));
        if let Some(path) = url.strip_prefix("log:") {
            if path.is_empty() {
                return Err(bad("log: needs a path, or - for stdout".into()));
            }
            Ok(ProviderSpec::Log(path.to_owned()))
        } else if let Some(params) = url.strip_prefix("mock:") {
            mock::MockProvider::parse(params)
                .map(ProviderSpec::Mock)
                .map_err(bad)
        } else if url.starts_with("http://") || url.starts_with("https://") {
            http::HttpSpec::parse(url)
                .map(ProviderSpec::Http)
                .map_err(bad)
        } else if let Some(params) = url.strip_prefix("fcm:") {
            fcm::FcmSpec::parse(params)
                .map(ProviderSpec::Fcm)
                .map_err(bad)
        } else {
            Err(bad(
                "expected log:PATH, log:-, mock:…, http(s)://… or fcm:…".into(),
            ))
        }
    }

    /// Opens the provider: creates the `log:` file; for `http` and `fcm`, reads the
    /// environment (timeouts, `FANOUT_FCM_TOKEN`) and builds the connection pool. Pushes
    /// nothing.
    pub fn open(self) -> Result<Provider> {
        match self {
            ProviderSpec::Log(path) => log::LogProvider::open(&path).map(Provider::Log),
            ProviderSpec::Mock(m) => Ok(Provider::Mock(m)),
            ProviderSpec::Http(spec) => {
                let timeouts = remote::Timeouts::from_env()?;
                http::HttpProvider::open(spec, &timeouts).map(Provider::Http)
            }
            ProviderSpec::Fcm(spec) => {
                let timeouts = remote::Timeouts::from_env()?;
                fcm::FcmProvider::open(spec, &timeouts).map(Provider::Fcm)
            }
        }
    }

    /// The typical time one push takes, for `fanout plan`'s estimate.
    pub fn typical_latency(&self) -> Duration {
        match self {
            ProviderSpec::Log(_) => Duration::from_micros(2),
            ProviderSpec::Mock(p) => p.latency,
            // Typical round trips of a webhook and of FCM; a guess until a run measures it.
            ProviderSpec::Http(_) => Duration::from_millis(50),
            ProviderSpec::Fcm(_) => Duration::from_millis(100),
        }
    }
}

impl Provider {
    /// Whether each message is its own request (`http`, `fcm`, `mock:` with a latency), pushed
    /// with [`Provider::send_one`]; otherwise a whole list goes in one write
    /// ([`Provider::send_all`]).
    pub fn sends_each(&self) -> bool {
        match self {
            Provider::Log(_) => false,
            Provider::Mock(p) => !p.is_instant(),
            Provider::Http(_) | Provider::Fcm(_) => true,
        }
    }

    /// Pushes one message (attempt `attempt`), taking one token of `rate` right before it
    /// goes. Only I/O: the dispatcher holds the message's concurrency slot.
    pub async fn send_one(
        &self,
        message: &Message<'_>,
        attempt: u32,
        rate: Option<&rate::RateLimiter>,
    ) -> Attempt {
        match self {
            Provider::Mock(p) => p.send_one(message, attempt, rate).await,
            Provider::Http(p) => p.send_one(message, rate).await,
            Provider::Fcm(p) => p.send_one(message, rate).await,
            Provider::Log(p) => {
                let (failed, latency) = p.send_all(std::slice::from_ref(message), &[0], rate).await;
                (failed.into_iter().next().map(|(_, o)| o), latency)
            }
        }
    }

    /// Pushes `batch[i]` for every `i` in `which` as one write, taking `which.len()` tokens of
    /// `rate`; returns `(position in which, outcome)` of each message not delivered, and how
    /// long the write took.
    pub async fn send_all(
        &self,
        batch: &[Message<'_>],
        which: &[usize],
        attempt: u32,
        rate: Option<&rate::RateLimiter>,
    ) -> (Vec<(usize, Outcome)>, Duration) {
        match self {
            Provider::Log(p) => p.send_all(batch, which, rate).await,
            Provider::Mock(p) => p.send_all(batch, which, attempt, rate).await,
            Provider::Http(_) | Provider::Fcm(_) => {
                let mut failed = Vec::new();
                let mut longest = Duration::ZERO;
                for (k, &i) in which.iter().enumerate() {
                    let (outcome, latency) = self.send_one(&batch[i], attempt, rate).await;
                    longest = longest.max(latency);
                    failed.extend(outcome.map(|o| (k, o)));
                }
                (failed, longest)
            }
        }
    }

    /// Makes everything sent so far durable (the `log:` file is fsynced).
    pub async fn flush(&self) -> Result<()> {
        match self {
            Provider::Log(p) => p.flush(),
            Provider::Mock(_) | Provider::Http(_) | Provider::Fcm(_) => Ok(()),
        }
    }

    /// Whether the provider addresses devices by push token (the engine then looks each
    /// user's token up; users without one are unreachable).
    pub fn needs_token(&self) -> bool {
        matches!(self, Provider::Fcm(_))
    }

    /// How errors name the provider: never with a credential in it.
    pub fn name(&self) -> String {
        match self {
            Provider::Log(p) => format!("log provider {}", p.path()),
            Provider::Mock(_) => "mock provider".into(),
            Provider::Http(p) => p.name().to_owned(),
            Provider::Fcm(p) => p.name().to_owned(),
        }
    }
}
