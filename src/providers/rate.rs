//! `rate_per_s`: token buckets shared by every worker of a process, one per priority lane.
//!
//! Each bucket is a virtual clock (GCRA): a message reserves the next free slot, `1/rate`
//! after the previous one, and sleeps until it. A small burst (1/20 s of rate) absorbs timer
//! jitter without letting any one-second window exceed the rate by more than 5%.
//!
//! The rate is split into one clock per lane (SPEC Policy → Priority): [`SHARES`] of it each,
//! so the lanes together never exceed `rate_per_s`. A message first takes a token its own
//! clock has now; else one that another clock it may borrow from has now (a token that is
//! due and unused: borrowing never moves that clock more than one interval ahead, so its own
//! lane waits at most one interval for it); else it reserves the earliest future slot among
//! the clocks it may queue on. Transactional borrows from and queues on any clock, normal
//! borrows from any and queues on its own and bulk's (it goes before bulk), bulk borrows
//! from and queues on its own and normal's — never transactional's. So a lane alone gets
//! the whole rate but transactional's share when it is bulk, and a transactional message
//! never queues behind another lane's reservations.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::model::Priority;

/// Each lane's share of the rate, percent: transactional, normal, bulk.
pub const SHARES: [u64; 3] = [20, 50, 30];

/// Where each lane takes a token that is due now, own clock first.
const BORROW: [&[usize]; 3] = [&[0, 1, 2], &[1, 2, 0], &[2, 1]];
/// Where each lane may reserve a future slot.
const QUEUE: [&[usize]; 3] = [&[0, 1, 2], &[1, 2], &[2, 1]];

/// Token buckets refilled at `rate` tokens per second in all.
#[derive(Debug)]
pub struct RateLimiter {
    clocks: Mutex<[Clock; 3]>,
}

/// One lane's virtual clock.
#[derive(Debug, Clone, Copy)]
struct Clock {
    interval: Duration,
    burst: Duration,
    next: Option<Instant>,
}

impl Clock {
    fn new(per_s: f64) -> Clock {
        Clock {
            interval: Duration::from_secs_f64(1.0 / per_s),
            burst: Duration::from_secs_f64((per_s / 20.0).floor() / per_s),
            next: None,
        }
    }

    /// When the next `n` tokens would start.
    fn start(&self, now: Instant) -> Instant {
        let earliest = now.checked_sub(self.burst).unwrap_or(now);
        match self.next {
            Some(t) if t > earliest => t,
            _ => earliest,
        }
    }

    /// Whether `n` tokens are due by `now`.
    fn due(&self, now: Instant, n: u32) -> bool {
        self.start(now) + self.interval * n.saturating_sub(1) <= now
    }

    /// Takes `n` tokens; returns when they start.
    fn take(&mut self, now: Instant, n: u32) -> Instant {
        let start = self.start(now);
        self.next = Some(start + self.interval * n);
        start
    }
}

impl RateLimiter {
    /// A limiter of `per_s` messages a second; `None` when `per_s` is 0 (unlimited).
    pub fn new(per_s: u64) -> Option<Self> {
        if per_s == 0 {
            return None;
        }
        let clock = |lane: usize| Clock::new(per_s as f64 * SHARES[lane] as f64 / 100.0);
        Some(RateLimiter {
            clocks: Mutex::new([clock(0), clock(1), clock(2)]),
        })
    }

    /// Waits until `n` messages of `lane` may go.
    pub async fn acquire(&self, lane: Priority, n: usize) {
        let slot = {
            let now = Instant::now();
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            let mut clocks = match self.clocks.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let l = lane.lane();
            let clock = match BORROW[l].iter().find(|&&c| clocks[c].due(now, n)) {
                Some(&c) => c,
                None => QUEUE[l]
                    .iter()
                    .copied()
                    .min_by_key(|&c| clocks[c].start(now))
                    .unwrap_or(l),
            };
            clocks[clock].take(now, n)
        };
        if slot > Instant::now() {
            tokio::time::sleep_until(slot).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Asserts that no one-second window of `stamps` (sorted) holds more than `rate` × 1.05
    /// messages plus one per lane (each clock's own rounding).
    fn assert_rate_held(stamps: &[Duration], rate: f64) {
        let limit = (rate * 1.05).floor() as usize + 3;
        for (i, s) in stamps.iter().enumerate() {
            let in_window = stamps[i..]
                .iter()
                .take_while(|t| **t < *s + Duration::from_secs(1))
                .count();
            assert!(in_window <= limit, "{in_window} messages in one second");
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn one_lane_alone_gets_the_whole_rate_and_holds_it_in_any_window() {
        for lane in [Priority::Transactional, Priority::Normal] {
            let rl = RateLimiter::new(1000).unwrap();
            let t0 = Instant::now();
            let mut stamps = Vec::new();
            for _ in 0..3000 {
                rl.acquire(lane, 1).await;
                stamps.push(Instant::now() - t0);
            }
            assert_rate_held(&stamps, 1000.0);
            let took = stamps[2999];
            assert!(
                took >= Duration::from_millis(2900) && took <= Duration::from_millis(3050),
                "{lane:?}: 3000 messages at 1000/s took {took:?}"
            );
        }
    }

    /// Many senders at once, as the dispatcher's slots make them: each lane alone, then all
    /// three together, never over the rate; normal alone at the full rate, bulk at all but
    /// transactional's share.
    #[tokio::test(start_paused = true)]
    async fn concurrent_senders_hold_the_total_and_each_lane_its_budget() {
        let run = |lanes: Vec<Priority>| async move {
            let rl = Arc::new(RateLimiter::new(1000).unwrap());
            let t0 = Instant::now();
            let stamps = Arc::new(Mutex::new(Vec::new()));
            let tasks: Vec<_> = (0..200)
                .map(|k| {
                    let (rl, stamps, lane) = (rl.clone(), stamps.clone(), lanes[k % lanes.len()]);
                    tokio::spawn(async move {
                        while t0.elapsed() < Duration::from_secs(4) {
                            rl.acquire(lane, 1).await;
                            stamps.lock().unwrap().push((t0.elapsed(), lane));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            let mut stamps = stamps.lock().unwrap().clone();
            stamps.sort();
            stamps
        };
        let per_s = |stamps: &[(Duration, Priority)], lane: Option<Priority>| {
            // The steady state: seconds 1 to 3.
            let n = stamps
                .iter()
                .filter(|(t, l)| {
                    *t >= Duration::from_secs(1)
                        && *t < Duration::from_secs(3)
                        && lane.is_none_or(|lane| lane == *l)
                })
                .count();
            n as f64 / 2.0
        };
        let normal = run(vec![Priority::Normal]).await;
        let all: Vec<Duration> = normal.iter().map(|(t, _)| *t).collect();
        assert_rate_held(&all, 1000.0);
        assert!(per_s(&normal, None) >= 980.0, "{}", per_s(&normal, None));
        let bulk = run(vec![Priority::Bulk]).await;
        let b = per_s(&bulk, None);
        assert!((780.0..=820.0).contains(&b), "bulk alone: {b}/s");
        let mixed = run(Priority::ALL.to_vec()).await;
        let all: Vec<Duration> = mixed.iter().map(|(t, _)| *t).collect();
        assert_rate_held(&all, 1000.0);
        assert!(per_s(&mixed, None) >= 980.0);
        let tx = per_s(&mixed, Some(Priority::Transactional));
        assert!(tx >= 200.0, "transactional got {tx}/s of its 200");
    }

    /// With bulk saturating its clocks, a transactional message is not queued behind bulk's
    /// reservations: it goes within one of its own clock's intervals.
    #[tokio::test(start_paused = true)]
    async fn bulk_saturating_never_delays_transactional_beyond_its_interval() {
        let rl = Arc::new(RateLimiter::new(1000).unwrap());
        let bulk: Vec<_> = (0..500)
            .map(|_| {
                let rl = rl.clone();
                tokio::spawn(async move {
                    loop {
                        rl.acquire(Priority::Bulk, 1).await;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let interval = Duration::from_secs_f64(1.0 / 200.0);
        for _ in 0..100 {
            let asked = Instant::now();
            rl.acquire(Priority::Transactional, 1).await;
            assert!(asked.elapsed() <= interval, "waited {:?}", asked.elapsed());
            tokio::time::sleep(Duration::from_millis(7)).await;
        }
        bulk.iter().for_each(|t| t.abort());
    }

    #[test]
    fn zero_is_unlimited() {
        assert!(RateLimiter::new(0).is_none());
    }
}
