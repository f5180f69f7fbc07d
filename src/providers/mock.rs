//! `mock:latency=200ms,jitter=50ms,fail=0.01,permanent=0.001`: a simulated remote provider.
//!
//! Each message waits `latency ± jitter` (holding its concurrency slot), then succeeds, fails
//! retryably (probability `fail`) or fails for good (probability `permanent`). The draw is a
//! hash of the message key and attempt, so a run is reproducible. For benchmarks only.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use super::{Attempt, Gate, Message, Messages, Outcome, Push};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream};
use tokio::time::{Instant, Sleep};

/// The `mock:` provider's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct MockProvider {
    /// Mean time a push takes.
    pub latency: Duration,
    /// Uniform spread around `latency`.
    pub jitter: Duration,
    /// Probability of a retryable failure per attempt.
    pub fail: f64,
    /// Probability of a permanent failure per attempt.
    pub permanent: f64,
}

impl MockProvider {
    /// Parses `latency=…,jitter=…,fail=…,permanent=…` (every key optional).
    pub fn parse(params: &str) -> Result<Self, String> {
        let mut m = MockProvider {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            fail: 0.0,
            permanent: 0.0,
        };
        for kv in params.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {kv:?}"))?;
            let dur = |v: &str| humantime::parse_duration(v).map_err(|e| format!("{k}: {e}"));
            let prob = |v: &str| match v.parse::<f64>() {
                Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
                _ => Err(format!("{k}: expected a probability 0..1, got {v:?}")),
            };
            match k {
                "latency" => m.latency = dur(v)?,
                "jitter" => m.jitter = dur(v)?,
                "fail" => m.fail = prob(v)?,
                "permanent" => m.permanent = prob(v)?,
                _ => {
                    return Err(format!(
                        "unknown mock parameter {k:?} (latency, jitter, fail, permanent)"
                    ))
                }
            }
        }
        if m.fail + m.permanent > 1.0 {
            return Err("fail + permanent must not exceed 1".into());
        }
        Ok(m)
    }

    /// Whether every push answers at once (no latency, no jitter): then a list of messages
    /// is one call ([`Push::send_all`]).
    pub fn is_instant(&self) -> bool {
        self.latency.is_zero() && self.jitter.is_zero()
    }

    /// Simulates pushing the selected messages at once (no latency is simulated).
    async fn push_all(
        &self,
        batch: Messages<'_>,
        which: &[usize],
        attempt: u32,
        gate: Gate<'_>,
    ) -> (Vec<(usize, Outcome)>, Duration) {
        if !gate.pass(which.len()).await {
            return (super::held(which), Duration::ZERO);
        }
        if self.fail == 0.0 && self.permanent == 0.0 {
            return (Vec::new(), Duration::ZERO);
        }
        let failed = which
            .iter()
            .enumerate()
            .filter_map(|(k, &i)| Some((k, self.draw(batch.get(i).json, attempt).1?)))
            .collect();
        (failed, Duration::ZERO)
    }

    /// Simulates pushing one message: waits its drawn latency, then answers.
    async fn push_one(&self, message: &Message<'_>, attempt: u32, gate: Gate<'_>) -> Attempt {
        if !gate.pass(1).await {
            return (Some(Outcome::Held), Duration::ZERO);
        }
        let (wait, outcome) = self.draw(message.json, attempt);
        let started = tokio::time::Instant::now();
        tokio::time::sleep(wait).await;
        (outcome, started.elapsed())
    }

    /// Simulates pushing the selected messages, each on its own, all starting now: each waits
    /// its own drawn latency, as [`MockProvider::push_one`] does, but one timer serves them
    /// all (set for the earliest answer still due).
    fn push_each(&self, batch: Messages<'_>, which: &[usize], attempt: u32) -> Answers {
        let started = Instant::now();
        let mut due: Vec<(Instant, usize, Option<Outcome>)> = which
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let (wait, outcome) = self.draw(batch.get(i).json, attempt);
                (started + wait, k, outcome)
            })
            .collect();
        // Latest first: the answers due next come off the end.
        due.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        let first = due.last().map_or(started, |d| d.0);
        Answers {
            due,
            started,
            timer: Box::pin(tokio::time::sleep_until(first)),
        }
    }

    /// The latency and outcome (`None`: delivered) of one attempt, from a hash of the message
    /// and attempt.
    fn draw(&self, message: &[u8], attempt: u32) -> (Duration, Option<Outcome>) {
        let h = splitmix(hash_bytes(message) ^ u64::from(attempt).wrapping_mul(0x9E37_79B9));
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        let v = (splitmix(h) >> 11) as f64 / (1u64 << 53) as f64;
        let spread = self.jitter.as_secs_f64() * (2.0 * v - 1.0);
        let wait = Duration::from_secs_f64((self.latency.as_secs_f64() + spread).max(0.0));
        let outcome = if u < self.permanent {
            Some(Outcome::Permanent("mock: permanent failure".into()))
        } else if u < self.permanent + self.fail {
            Some(Outcome::Retry {
                error: "mock: transient failure".into(),
                after: None,
            })
        } else {
            None
        };
        (wait, outcome)
    }
}

/// The answers of messages sent together ([`MockProvider::push_each`]): every answer due by
/// the time the timer fires, in one list.
struct Answers {
    /// (when it is answered, position in `which`, outcome), latest first.
    due: Vec<(Instant, usize, Option<Outcome>)>,
    /// When they were sent.
    started: Instant,
    /// Set for the earliest answer still due.
    timer: Pin<Box<Sleep>>,
}

impl Stream for Answers {
    type Item = Vec<(usize, Attempt)>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            let Some(&(first, _, _)) = this.due.last() else {
                return Poll::Ready(None);
            };
            let now = Instant::now();
            if first <= now {
                let mut answers = Vec::new();
                while let Some((_, k, outcome)) = this.due.pop_if(|d| d.0 <= now) {
                    answers.push((k, (outcome, now - this.started)));
                }
                return Poll::Ready(Some(answers));
            }
            if this.timer.deadline() != first {
                this.timer.as_mut().reset(first);
            }
            ready!(this.timer.as_mut().poll(cx));
        }
    }
}

/// A quick hash of a message, eight bytes at a time (the last word padded with zeros).
fn hash_bytes(bytes: &[u8]) -> u64 {
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    // Whole words need no copy (copying each into a padded word called memmove per word:
    // a sixth of the mock's CPU with 200,000 pushes in flight).
    let h = words.fold(bytes.len() as u64, |h, word| {
        let word: [u8; 8] = word.try_into().unwrap_or_default();
        splitmix(h ^ u64::from_le_bytes(word))
    });
    if tail.is_empty() {
        return h;
    }
    let mut word = [0u8; 8];
    word[..tail.len()].copy_from_slice(tail);
    splitmix(h ^ u64::from_le_bytes(word))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Push for MockProvider {
    fn name(&self) -> String {
        "mock provider".into()
    }

    fn sends_each(&self) -> bool {
        !self.is_instant()
    }

    fn send_one<'a>(
        &'a self,
        message: Message<'a>,
        attempt: u32,
        gate: Gate<'a>,
    ) -> BoxFuture<'a, Attempt> {
        Box::pin(async move { self.push_one(&message, attempt, gate).await })
    }

    fn send_each<'a>(
        &'a self,
        batch: Messages<'a>,
        which: &'a [usize],
        attempt: u32,
        gate: Gate<'a>,
    ) -> BoxStream<'a, Vec<(usize, Attempt)>> {
        // Under a rate, each message passes the gate on its own before its latency starts.
        match gate.limits() {
            true => super::one_by_one(self, batch, which, attempt, gate),
            false => Box::pin(self.push_each(batch, which, attempt)),
        }
    }

    fn send_all<'a>(
        &'a self,
        batch: Messages<'a>,
        which: &'a [usize],
        attempt: u32,
        gate: Gate<'a>,
    ) -> BoxFuture<'a, (Vec<(usize, Outcome)>, Duration)> {
        Box::pin(self.push_all(batch, which, attempt, gate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Priority;

    #[test]
    fn parses_parameters() {
        let m = MockProvider::parse("latency=200ms,jitter=50ms,fail=0.01,permanent=0.001").unwrap();
        assert_eq!(m.latency, Duration::from_millis(200));
        assert_eq!(m.jitter, Duration::from_millis(50));
        assert_eq!((m.fail, m.permanent), (0.01, 0.001));
        assert_eq!(MockProvider::parse("").unwrap().latency, Duration::ZERO);
        assert!(MockProvider::parse("latency=fast").is_err());
        assert!(MockProvider::parse("fail=2").is_err());
        assert!(MockProvider::parse("colour=red").is_err());
    }

    /// Messages sent together each answer at their own drawn latency (one timer for all),
    /// with that latency and their own outcome — as each would alone.
    #[tokio::test(start_paused = true)]
    async fn messages_sent_together_each_answer_at_their_own_latency() {
        use futures::StreamExt;
        let m = MockProvider::parse("latency=50ms,jitter=20ms,fail=0.2").unwrap();
        let records: Vec<String> = (0..300).map(|i| format!("c:{i}")).collect();
        let buf: crate::providers::MessageBuf = records
            .iter()
            .map(|json| Message {
                user: 1,
                json: json.as_bytes(),
                token: None,
            })
            .collect();
        let batch = buf.messages();
        let which: Vec<usize> = (0..300).step_by(2).collect();
        let t0 = Instant::now();
        let mut answers = m.send_each(batch, &which, 2, Gate::new(None, Priority::Normal));
        let mut seen = vec![false; which.len()];
        let mut lists = 0;
        while let Some(list) = answers.next().await {
            lists += 1;
            for (k, (outcome, latency)) in list {
                let (wait, want) = m.draw(batch.get(which[k]).json, 2);
                assert!(!seen[k], "answered twice");
                seen[k] = true;
                assert_eq!(outcome, want);
                // Timers fire on the next whole millisecond.
                assert!(latency >= wait && latency < wait + Duration::from_millis(1));
                assert_eq!(t0.elapsed(), latency);
            }
        }
        assert!(seen.iter().all(|s| *s));
        assert!(lists > 20 && lists <= 41, "{lists} lists");
    }

    /// The hash is the same as when each word was copied into a padded one: the same
    /// messages fail in every version.
    #[test]
    fn the_hash_pads_the_last_word() {
        let padded = |bytes: &[u8]| {
            bytes.chunks(8).fold(bytes.len() as u64, |h, chunk| {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                splitmix(h ^ u64::from_le_bytes(word))
            })
        };
        let text = "{\"campaign\":\"c\",\"user\":12345,\"key\":\"c:12345\"}";
        for n in 0..text.len() {
            assert_eq!(
                hash_bytes(&text.as_bytes()[..n]),
                padded(&text.as_bytes()[..n])
            );
        }
    }

    #[test]
    fn failure_rates_follow_the_parameters() {
        let m = MockProvider::parse("fail=0.1,permanent=0.01,latency=10ms,jitter=5ms").unwrap();
        let (mut retry, mut perm) = (0, 0);
        for i in 0..100_000 {
            let (wait, o) = m.draw(format!("c:{i}").as_bytes(), 1);
            assert!(wait >= Duration::from_millis(5) && wait <= Duration::from_millis(15));
            match o {
                Some(Outcome::Retry { .. }) => retry += 1,
                Some(Outcome::Permanent(_)) => perm += 1,
                _ => {}
            }
        }
        assert!((9_000..11_000).contains(&retry), "{retry}");
        assert!((700..1_300).contains(&perm), "{perm}");
    }
}
