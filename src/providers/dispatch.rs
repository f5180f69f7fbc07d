//! The delivery policy every provider shares: at most `concurrency` messages in flight, the
//! `rate_per_s` token bucket, up to `max_attempts` attempts with exponential backoff and full
//! jitter (a retry waits holding no slot), and dead letters for what fails for good.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Semaphore;

use super::dead_letters::DeadLetters;
use super::rate::RateLimiter;
use super::{Message, Outcome, Provider};
use crate::error::Result;
use crate::metrics::Metrics;

/// First retry waits up to this long; each further one doubles it.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// No retry waits longer than this (unless the provider's `Retry-After` says so).
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// What finally became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Accepted by the provider.
    Delivered,
    /// Failed for good after `attempts` attempts; written to the dead letters.
    Dead {
        /// The last error.
        error: String,
        /// Attempts made.
        attempts: u32,
    },
    /// Not addressable by this provider.
    Unreachable,
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
        }
    }

    /// The provider.
    pub fn provider(&self) -> &Provider {
        &self.provider
    }

    /// Pushes every message of `batch` until it is delivered or dead; returns each one's fate,
    /// in order. Dead letters are written before this returns.
    pub async fn deliver(&self, batch: &[Message]) -> Result<Vec<Fate>> {
        let mut fates: Vec<Option<Fate>> = vec![None; batch.len()];
        let mut which: Vec<usize> = (0..batch.len()).collect();
        let mut attempt = 1;
        while !which.is_empty() {
            let mut outcomes = Vec::with_capacity(which.len());
            for chunk in which.chunks(self.capacity) {
                let sent = self
                    .provider
                    .send(batch, chunk, attempt, &self.slots, self.rate.as_ref())
                    .await;
                outcomes.extend(sent);
            }
            self.metrics
                .record_latencies(outcomes.iter().map(|(_, latency)| *latency));
            let mut retry = Vec::new();
            let mut wait = Duration::ZERO;
            for (&i, (outcome, _)) in which.iter().zip(outcomes) {
                fates[i] = match outcome {
                    Outcome::Delivered => Some(Fate::Delivered),
                    Outcome::Unreachable => Some(Fate::Unreachable),
                    Outcome::Permanent(error) => Some(Fate::Dead {
                        error,
                        attempts: attempt,
                    }),
                    Outcome::Retry { error, .. } if attempt >= self.max_attempts => {
                        Some(Fate::Dead {
                            error,
                            attempts: attempt,
                        })
                    }
                    Outcome::Retry { after, .. } => {
                        retry.push(i);
                        wait = wait.max(after.unwrap_or_default());
                        None
                    }
                };
            }
            if !retry.is_empty() {
                self.metrics
                    .retries
                    .fetch_add(retry.len() as u64, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(wait.max(backoff(attempt))).await;
            }
            which = retry;
            attempt += 1;
        }
        let fates: Vec<Fate> = fates
            .into_iter()
            .map(|f| f.unwrap_or(Fate::Unreachable))
            .collect();
        let letters: Vec<_> = batch
            .iter()
            .zip(&fates)
            .filter_map(|(m, f)| match f {
                Fate::Dead { error, attempts } => Some((m, error.as_str(), *attempts)),
                _ => None,
            })
            .collect();
        self.dead.write(&letters)?;
        Ok(fates)
    }

    /// Makes the provider's output and the dead letters durable.
    pub async fn flush(&self) -> Result<()> {
        self.provider.flush().await?;
        self.dead.flush()
    }
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

    fn batch(n: u32) -> Vec<Message> {
        (1..=n)
            .map(|user| {
                Message::from_delivery(&Delivery {
                    campaign: "c".into(),
                    occurrence: None,
                    user,
                    title: "t".into(),
                    body: "b".into(),
                    key: format!("c:{user}"),
                    token: None,
                })
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
        let msgs = batch(2000);
        let fates = d.deliver(&msgs).await.unwrap();
        let dead = fates
            .iter()
            .filter(|f| matches!(f, Fate::Dead { .. }))
            .count();
        let delivered = fates.iter().filter(|f| **f == Fate::Delivered).count();
        assert_eq!(dead + delivered, 2000);
        // Dead: permanent on some attempt, or retryable three times in a row.
        assert!(dead > 50 && dead < 300, "{dead}");
        let lines = std::fs::read_to_string(&dead_path).unwrap();
        assert_eq!(lines.lines().count(), dead);
        for line in lines.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(v["error"].is_string() && v["attempts"].as_u64().unwrap() <= 3);
            assert!(v["key"].as_str().unwrap().starts_with("c:"));
        }
    }
}
