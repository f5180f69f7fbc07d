//! The delivery policy every provider shares: at most `concurrency` messages in flight, the
//! `rate_per_s` token bucket, up to `max_attempts` attempts with exponential backoff and full
//! jitter (a retry waits holding no slot, at least as long as the provider's `Retry-After`),
//! and dead letters for what fails for good.
//!
//! A provider refusing *our* credentials ([`Outcome::Unauthorized`], HTTP 401/403) is not a
//! fact about the user: such a message is never dead-lettered. It is retried, and once
//! [`UNAUTHORIZED_IN_A_ROW`] answers in a row (no delivery in between) say so — or a message
//! runs out of attempts on one — the dispatcher halts: every `deliver` in progress or to come
//! returns the same error, the push tasks fail, and the run stops with exit 1. Whatever was
//! not delivered stays not done in the store, so a re-run sends it.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{watch, Semaphore};

use super::dead_letters::DeadLetters;
use super::rate::RateLimiter;
use super::{Message, Outcome, Provider};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// First retry waits up to this long; each further one doubles it.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// No retry waits longer than this (unless the provider's `Retry-After` says so).
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Credential refusals in a row that stop the run.
pub const UNAUTHORIZED_IN_A_ROW: u32 = 3;

/// A message that failed for good: written to the dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dead {
    /// Its position in the batch.
    pub index: usize,
    /// The last error.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
}

/// What became of a batch. Every message not listed was delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Failed for good, in batch order.
    pub dead: Vec<Dead>,
    /// Positions of messages the provider cannot address (no token), in batch order.
    pub unreachable: Vec<usize>,
}

/// A provider with the delivery policy around it. One per process, shared by every worker.
#[derive(Debug)]
pub struct Dispatcher {
    provider: Provider,
    slots: Semaphore,
    capacity: usize,
    rate: Option<RateLimiter>,
    max_attempts: u32,
    dead: DeadLetters,
    metrics: Arc<Metrics>,
    /// Credential refusals since the last delivery.
    unauthorized: AtomicU32,
    /// Why the dispatcher halted, once it has.
    halted: OnceLock<String>,
    /// Flips to `true` when it halts, waking every `deliver` in progress.
    halt: watch::Sender<bool>,
}

impl Dispatcher {
    /// Wraps `provider` with `concurrency` slots, `rate_per_s` (0 = unlimited), `max_attempts`
    /// and the dead-letter file at `dead_letter`.
    pub fn new(
        provider: Provider,
        concurrency: usize,
        rate_per_s: u64,
        max_attempts: u32,
        dead_letter: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        let capacity = concurrency.clamp(1, Semaphore::MAX_PERMITS);
        Dispatcher {
            provider,
            slots: Semaphore::new(capacity),
            capacity,
            rate: RateLimiter::new(rate_per_s),
            max_attempts: max_attempts.max(1),
            dead: DeadLetters::new(dead_letter),
            metrics,
            unauthorized: AtomicU32::new(0),
            halted: OnceLock::new(),
            halt: watch::Sender::new(false),
        }
    }

    /// Messages being pushed right now (slots taken).
    pub fn in_flight(&self) -> usize {
        self.capacity.saturating_sub(self.slots.available_permits())
    }

    /// The provider.
    pub fn provider(&self) -> &Provider {
        &self.provider
    }

    /// Pushes every message of `batch` until it is delivered or dead, and reports the ones
    /// that were not delivered. Dead letters are written before this returns. Fails, writing
    /// nothing, once the dispatcher has halted (see the module docs).
    pub async fn deliver(&self, batch: &[Message<'_>]) -> Result<Report> {
        let mut halt = self.halt.subscribe();
        let mut report = Report::default();
        let mut invalid_tokens = 0u64;
        let mut which: Vec<usize> = (0..batch.len()).collect();
        let mut attempt = 1;
        while !which.is_empty() {
            self.check_halted()?;
            let mut retry = Vec::new();
            let mut wait = Duration::ZERO;
            for chunk in which.chunks(self.capacity) {
                let send =
                    self.provider
                        .send(batch, chunk, attempt, &self.slots, self.rate.as_ref());
                let sent = tokio::select! {
                    sent = send => sent,
                    _ = halt.wait_for(|halted| *halted) => return Err(self.halt_error()),
                };
                self.metrics.record_latency(&sent.latency, chunk.len());
                if sent.failed.len() < chunk.len() {
                    self.unauthorized.store(0, Relaxed);
                }
                for (k, outcome) in sent.failed {
                    let Some(&index) = chunk.get(k) else { continue };
                    let dead = |error| Dead {
                        index,
                        error,
                        attempts: attempt,
                    };
                    match outcome {
                        Outcome::Unreachable => report.unreachable.push(index),
                        Outcome::Permanent(error) => report.dead.push(dead(error)),
                        Outcome::InvalidToken(error) => {
                            invalid_tokens += 1;
                            report.dead.push(dead(error));
                        }
                        Outcome::Retry { error, .. } if attempt >= self.max_attempts => {
                            report.dead.push(dead(error))
                        }
                        Outcome::Retry { after, .. } => {
                            retry.push(index);
                            wait = wait.max(after.unwrap_or_default());
                        }
                        Outcome::Unauthorized(error) => {
                            let in_a_row = self.unauthorized.fetch_add(1, Relaxed) + 1;
                            if in_a_row >= UNAUTHORIZED_IN_A_ROW || attempt >= self.max_attempts {
                                return Err(self.stop(&error, in_a_row));
                            }
                            retry.push(index);
                        }
                    }
                }
            }
            if !retry.is_empty() {
                self.metrics.retries.fetch_add(retry.len() as u64, Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(retry_wait(attempt, wait)) => {}
                    _ = halt.wait_for(|halted| *halted) => return Err(self.halt_error()),
                }
                retry.sort_unstable();
            }
            which = retry;
            attempt += 1;
        }
        report.dead.sort_unstable_by_key(|d| d.index);
        report.unreachable.sort_unstable();
        let letters: Vec<_> = report
            .dead
            .iter()
            .map(|d| (&batch[d.index], d.error.as_str(), d.attempts))
            .collect();
        self.dead.write(&letters)?;
        self.metrics
            .invalid_tokens
            .fetch_add(invalid_tokens, Relaxed);
        Ok(report)
    }

    /// Halts the dispatcher (once) for a credential refusal; returns the error to report.
    /// `error` names the provider already.
    fn stop(&self, error: &str, in_a_row: u32) -> Error {
        let why = format!(
            "{error} ({in_a_row} in a row): the provider refuses our credentials, not the \
             users. Stopped without dead-lettering anyone; fix the credentials and run again: \
             every user not delivered yet is sent then"
        );
        if self.halted.set(why).is_ok() {
            tracing::info!(provider = %self.provider.name(), "credentials refused; stopping");
        }
        self.halt.send_replace(true);
        self.halt_error()
    }

    fn check_halted(&self) -> Result<()> {
        match self.halted.get() {
            Some(_) => Err(self.halt_error()),
            None => Ok(()),
        }
    }

    fn halt_error(&self) -> Error {
        Error::runtime(
            self.halted
                .get()
                .map_or("the provider stopped the run", String::as_str),
        )
    }

    /// Makes the provider's output and the dead letters durable.
    pub async fn flush(&self) -> Result<()> {
        self.provider.flush().await?;
        self.dead.flush()
    }
}

/// How long to wait before attempt `attempt + 1`: the backoff, but never less than the
/// provider asked for (`after`, already capped by [`super::remote::MAX_RETRY_AFTER`]).
fn retry_wait(attempt: u32, after: Duration) -> Duration {
    after.max(backoff(attempt))
}

/// Full jitter: a uniform wait in `[0, min(cap, base · 2^(attempt-1))]`.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    ceiling.mul_f64(rand::thread_rng().gen::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Delivery;

    fn records(n: u32) -> Vec<(u32, String)> {
        (1..=n)
            .map(|user| {
                let d = Delivery {
                    campaign: "c".into(),
                    occurrence: None,
                    user,
                    title: "t".into(),
                    body: "b".into(),
                    key: format!("c:{user}"),
                    token: None,
                };
                (user, serde_json::to_string(&d).unwrap())
            })
            .collect()
    }

    fn messages(records: &[(u32, String)]) -> Vec<Message<'_>> {
        records
            .iter()
            .map(|(user, json)| Message {
                user: *user,
                json,
                token: None,
            })
            .collect()
    }

    #[test]
    fn backoff_stays_under_its_ceiling() {
        for attempt in 1..40 {
            assert!(backoff(attempt) <= BACKOFF_CAP);
        }
        assert!(backoff(1) <= BACKOFF_BASE);
    }

    #[test]
    fn retry_after_is_a_floor() {
        for attempt in 1..20 {
            assert!(retry_wait(attempt, Duration::from_secs(30)) >= Duration::from_secs(30));
            assert!(retry_wait(attempt, Duration::ZERO) <= BACKOFF_CAP);
        }
        // The backoff still applies when the provider asks for less.
        let waits: Vec<_> = (0..200)
            .map(|_| retry_wait(8, Duration::from_millis(1)))
            .collect();
        assert!(waits.iter().any(|w| *w > Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_delivered_or_dead() {
        let dir = tempfile::tempdir().unwrap();
        let dead_path = dir.path().join("dead.jsonl");
        let provider = Provider::Mock(
            super::super::mock::MockProvider::parse("fail=0.3,permanent=0.05").unwrap(),
        );
        let d = Dispatcher::new(
            provider,
            7,
            0,
            3,
            dead_path.to_str().unwrap(),
            Arc::new(Metrics::new()),
        );
        let recs = records(2000);
        let msgs = messages(&recs);
        let report = d.deliver(&msgs).await.unwrap();
        let dead = report.dead.len();
        assert!(report.unreachable.is_empty());
        assert!(report.dead.windows(2).all(|w| w[0].index < w[1].index));
        // Dead: permanent on some attempt, or retryable three times in a row.
        assert!(dead > 50 && dead < 300, "{dead}");
        let lines = std::fs::read_to_string(&dead_path).unwrap();
        assert_eq!(lines.lines().count(), dead);
        let mut lettered: Vec<u64> = Vec::new();
        for line in lines.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            lettered.push(v["user"].as_u64().unwrap());
            assert!(v["error"].is_string() && v["attempts"].as_u64().unwrap() <= 3);
            assert!(v["key"].as_str().unwrap().starts_with("c:"));
        }
        lettered.sort_unstable();
        let reported: Vec<u64> = report
            .dead
            .iter()
            .map(|d| u64::from(msgs[d.index].user))
            .collect();
        assert_eq!(lettered, reported);
    }
}
