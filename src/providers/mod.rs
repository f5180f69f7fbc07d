//! Where messages go: push providers behind one trait ([`Push`]: only I/O), and the
//! delivery policy they share ([`dispatch`]).
//!
//! - [`log`]: `log:PATH` / `log:-`, delivery records as JSON Lines (the default).
//! - [`mock`]: `mock:latency=…,jitter=…,fail=…,permanent=…`, a simulated provider for benchmarks.
//! - [`http`]: `http://…` / `https://…`, one POST of the delivery record per message.
//! - [`http1`]: plain `http://` keep-alive connections, driven by the task that sends.
//! - [`fcm`]: `fcm:project=ID[,endpoint=URL]`, Firebase Cloud Messaging HTTP v1.
//! - [`remote`]: what `http` and `fcm` share: the pooled client, timeouts, `Retry-After`.
//! - [`rate`]: the token buckets behind `rate_per_s`, one per priority lane.
//! - [`lanes`]: the concurrency slots, budgeted per priority lane.
//! - [`dispatch`]: concurrency cap, retries with backoff, dead letters, the stop on rejected
//!   credentials — shared by every provider.

pub mod breaker;
pub mod dead_letters;
pub mod dispatch;
pub mod fcm;
pub mod http;
pub mod http1;
pub mod lanes;
pub mod log;
pub mod messages;
pub mod mock;
pub mod rate;
pub mod remote;

use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use futures::stream::{BoxStream, FuturesUnordered, StreamExt};

use crate::error::{Error, Result};
use crate::model::Priority;
pub use messages::{Message, MessageBuf, Messages};

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
    /// The message cannot be sent as it is, found before any I/O (over the provider's size
    /// limit, an unreadable record): dead-lettered at once, and no sign of the provider's
    /// health either way (the breaker ignores it).
    Unsendable(String),
    /// The provider says the user's push token is invalid or no longer registered: permanent
    /// (dead-lettered) and counted in the summary's `invalid_tokens`.
    InvalidToken(String),
    /// The provider refused *our* credentials (401/403): not the user's fault, so never a dead
    /// letter. Several in a row stop the run (see [`dispatch`]).
    Unauthorized(String),
    /// The user cannot be addressed by this provider (no token): counted, not sent.
    Unreachable,
    /// The provider cannot work for the rest of the run (its output is gone: a broken pipe):
    /// stops the run at once, never a dead letter.
    Fatal(String),
    /// Not sent: its campaign was paused or cancelled while it waited for a rate token
    /// ([`Gate::pass`]). No I/O happened; it stays unsettled, for the dispatcher's caller to
    /// settle as it does a message held before its attempt started.
    Held,
}

/// What one attempt at one message came to: `None` delivered, else why not; and how long
/// the push itself took (from the rate token to the answer).
pub type Attempt = (Option<Outcome>, Duration);

/// The dispatcher's rate tokens as a provider sees them: it passes the gate right before its
/// I/O, once per message it sends, and not for a message it refuses without sending (no
/// token, too big). The tokens, like the slots, retries and dead letters, are the
/// dispatcher's ([`dispatch`]).
#[derive(Clone, Copy)]
pub struct Gate<'a> {
    rate: Option<&'a rate::RateLimiter>,
    lane: Priority,
    /// Whether the message's campaign is held back now (paused, cancelled).
    held: Option<&'a (dyn Fn() -> bool + Sync)>,
    /// Whether this process may still send (its store lease), looked at again after a wait.
    guard: Option<&'a dispatch::Guard>,
}

impl std::fmt::Debug for Gate<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("lane", &self.lane)
            .field("limits", &self.rate.is_some())
            .finish()
    }
}

impl<'a> Gate<'a> {
    /// A gate that takes `lane`'s tokens of `rate` (none: always open).
    pub fn new(rate: Option<&'a rate::RateLimiter>, lane: Priority) -> Self {
        Gate {
            rate,
            lane,
            held: None,
            guard: None,
        }
    }

    /// The same gate, closed to a message whose campaign `held` holds back once its token
    /// came: a pause that lands while it waits for a token sends nothing more.
    pub fn unless(self, held: &'a (dyn Fn() -> bool + Sync)) -> Self {
        Gate {
            held: Some(held),
            ..self
        }
    }

    /// The same gate, closed to a message that waited for its token while this process lost
    /// the right to send (`guard` fails: its store lease was taken over, say while it was
    /// stopped). The dispatcher checked the guard before the provider's call; a wait for
    /// tokens can outlast the lease, so it is looked at again after one. The message is
    /// answered [`Outcome::Held`], and the dispatcher, finding the guard failed, fails the run.
    pub fn fenced_by(self, guard: Option<&'a dispatch::Guard>) -> Self {
        Gate { guard, ..self }
    }

    /// Whether the gate ever makes a message wait (a rate is set).
    pub fn limits(&self) -> bool {
        self.rate.is_some()
    }

    /// Waits for `messages` tokens; false when their campaign was held back meanwhile, or this
    /// process lost the right to send: then the provider sends nothing and answers
    /// [`Outcome::Held`].
    #[must_use]
    pub async fn pass(self, messages: usize) -> bool {
        let Some(rate) = self.rate else {
            return true;
        };
        rate.acquire(self.lane, messages).await;
        !self.held.is_some_and(|held| held()) && self.guard.is_none_or(|guard| guard().is_ok())
    }
}

/// A list provider's answer when its gate was closed: every selected message [`Outcome::Held`].
pub fn held(which: &[usize]) -> Vec<(usize, Outcome)> {
    (0..which.len()).map(|k| (k, Outcome::Held)).collect()
}

/// What a provider does: the I/O of pushing messages and nothing else. Slots, rate tokens,
/// retries and dead letters are the dispatcher's, the same for every provider. Implement
/// [`Push::send_one`] for a provider whose every message is its own request, or
/// [`Push::send_all`] for one that writes a list at once (and say which in
/// [`Push::sends_each`]); each has a default in terms of the other.
pub trait Push: std::fmt::Debug + Send + Sync {
    /// How errors name it: never with a credential in it.
    fn name(&self) -> String;

    /// Whether each message is its own request (pushed with [`Push::send_one`]); otherwise a
    /// whole list goes in one write ([`Push::send_all`]).
    fn sends_each(&self) -> bool;

    /// Whether it addresses devices by push token (the engine then looks each user's token
    /// up; users without one are unreachable).
    fn needs_token(&self) -> bool {
        false
    }

    /// Pushes one message (attempt `attempt`), passing `gate` right before it goes.
    fn send_one<'a>(
        &'a self,
        message: Message<'a>,
        attempt: u32,
        gate: Gate<'a>,
    ) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            let one: MessageBuf = std::iter::once(message).collect();
            let (failed, latency) = self.send_all(one.messages(), &[0], attempt, gate).await;
            (failed.into_iter().next().map(|(_, o)| o), latency)
        })
    }

    /// Pushes `batch.get(i)` for every `i` in `which`, each its own request and all at once (each
    /// passing `gate` right before it goes, as [`Push::send_one`] does); yields each answer
    /// as it comes, as `(position in which, what the attempt came to)` — the answers that
    /// came together in one list. The dispatcher calls this for a provider that
    /// [`Push::sends_each`], with the messages that took their slots together. The default
    /// runs [`Push::send_one`] for each ([`one_by_one`]).
    fn send_each<'a>(
        &'a self,
        batch: Messages<'a>,
        which: &'a [usize],
        attempt: u32,
        gate: Gate<'a>,
    ) -> BoxStream<'a, Vec<(usize, Attempt)>> {
        one_by_one(self, batch, which, attempt, gate)
    }

    /// Pushes `batch.get(i)` for every `i` in `which` (passing `gate` for all of them);
    /// returns `(position in which, outcome)` of each message not delivered, and how long it
    /// took.
    fn send_all<'a>(
        &'a self,
        batch: Messages<'a>,
        which: &'a [usize],
        attempt: u32,
        gate: Gate<'a>,
    ) -> BoxFuture<'a, (Vec<(usize, Outcome)>, Duration)> {
        Box::pin(async move {
            let mut failed = Vec::new();
            let mut longest = Duration::ZERO;
            for (k, &i) in which.iter().enumerate() {
                let (outcome, latency) = self.send_one(batch.get(i), attempt, gate).await;
                longest = longest.max(latency);
                failed.extend(outcome.map(|o| (k, o)));
            }
            (failed, longest)
        })
    }

    /// Makes everything sent so far durable (the `log:` file is fsynced).
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// A configured push provider.
pub type Provider = Box<dyn Push>;

/// [`Push::send_each`] as one [`Push::send_one`] future per message, all polled together;
/// each poll yields every answer ready by then.
pub fn one_by_one<'a, P: Push + ?Sized>(
    provider: &'a P,
    batch: Messages<'a>,
    which: &'a [usize],
    attempt: u32,
    gate: Gate<'a>,
) -> BoxStream<'a, Vec<(usize, Attempt)>> {
    let mut sends: FuturesUnordered<_> = which
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            provider
                .send_one(batch.get(i), attempt, gate)
                .map(move |answer| (k, answer))
        })
        .collect();
    let answers = futures::stream::poll_fn(move |cx| {
        let mut ready = Vec::new();
        loop {
            match sends.poll_next_unpin(cx) {
                std::task::Poll::Ready(Some(answer)) => ready.push(answer),
                std::task::Poll::Ready(None) if ready.is_empty() => {
                    return std::task::Poll::Ready(None)
                }
                std::task::Poll::Pending if ready.is_empty() => return std::task::Poll::Pending,
                _ => return std::task::Poll::Ready(Some(ready)),
            }
        }
    });
    Box::pin(answers)
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
    /// Parses a `[provider] url`; a bad one is a usage error naming it.
    pub fn parse(url: &str) -> Result<ProviderSpec> {
        ProviderSpec::parse_url(url)
            .map_err(|msg| Error::Usage(format!("provider.url \"{url}\": {msg}")))
    }

    /// Parses a provider URL; `Err` says what was wrong or expected (the job file names
    /// where the URL came from: `file:line: provider.url`, or `--provider`).
    pub fn parse_url(url: &str) -> std::result::Result<ProviderSpec, String> {
        if let Some(path) = url.strip_prefix("log:") {
            if path.is_empty() {
                return Err("log: needs a path, or - for stdout".into());
            }
            Ok(ProviderSpec::Log(path.to_owned()))
        } else if let Some(params) = url.strip_prefix("mock:") {
            mock::MockProvider::parse(params).map(ProviderSpec::Mock)
        } else if url.starts_with("http://") || url.starts_with("https://") {
            http::HttpSpec::parse(url).map(ProviderSpec::Http)
        } else if let Some(params) = url.strip_prefix("fcm:") {
            fcm::FcmSpec::parse(params).map(ProviderSpec::Fcm)
        } else {
            Err("expected log:PATH, log:-, mock:…, http(s)://… or fcm:…".into())
        }
    }

    /// Opens the provider: creates the `log:` file; for `http` and `fcm`, reads the
    /// environment (timeouts, `FANOUT_FCM_TOKEN`) and builds the connection pool. Pushes
    /// nothing.
    pub fn open(self) -> Result<Provider> {
        match self {
            ProviderSpec::Log(path) => Ok(Box::new(log::LogProvider::open(&path)?)),
            ProviderSpec::Mock(m) => Ok(Box::new(m)),
            ProviderSpec::Http(spec) => {
                let timeouts = remote::Timeouts::from_env()?;
                Ok(Box::new(http::HttpProvider::open(spec, &timeouts)?))
            }
            ProviderSpec::Fcm(spec) => {
                let timeouts = remote::Timeouts::from_env()?;
                Ok(Box::new(fcm::FcmProvider::open(spec, &timeouts)?))
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
