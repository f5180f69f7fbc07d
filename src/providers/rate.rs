//! `rate_per_s`: a token bucket shared by every worker of a process.
//!
//! Implemented as a virtual clock (GCRA): each message reserves the next free slot, `1/rate`
//! after the previous one, and sleeps until it. A small burst (1/20 s of rate) absorbs timer
//! jitter without letting any one-second window exceed the rate by more than 5%.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket refilled at `rate` tokens per second.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    burst: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A limiter of `per_s` messages a second; `None` when `per_s` is 0 (unlimited).
    pub fn new(per_s: u64) -> Option<Self> {
        if per_s == 0 {
            return None;
        }
        let interval = Duration::from_secs_f64(1.0 / per_s as f64);
        let burst = Duration::from_secs_f64((per_s as f64 / 20.0).floor() / per_s as f64);
        Some(RateLimiter {
            interval,
            burst,
            next: Mutex::new(None),
        })
    }

    /// Waits until `n` messages may go.
    pub async fn acquire(&self, n: usize) {
        let slot = {
            let now = Instant::now();
            let mut next = match self.next.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let earliest = now.checked_sub(self.burst).unwrap_or(now);
            let start = match *next {
                Some(t) if t > earliest => t,
                _ => earliest,
            };
            *next = Some(start + self.interval * n as u32);
            start
        };
        if slot > Instant::now() {
            tokio::time::sleep_until(slot).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn holds_the_rate_in_any_window() {
        let rl = RateLimiter::new(1000).unwrap();
        let t0 = tokio::time::Instant::now();
        let mut stamps = Vec::new();
        for _ in 0..3000 {
            rl.acquire(1).await;
            stamps.push(tokio::time::Instant::now() - t0);
        }
        // Any one-second window holds at most rate × 1.05 + 1 messages.
        for (i, s) in stamps.iter().enumerate() {
            let in_window = stamps[i..]
                .iter()
                .take_while(|t| **t < *s + Duration::from_secs(1))
                .count();
            assert!(in_window <= 1051, "{in_window} messages in one second");
        }
        assert!(stamps[2999] >= Duration::from_millis(2900));
    }

    #[test]
    fn zero_is_unlimited() {
        assert!(RateLimiter::new(0).is_none());
    }
}
