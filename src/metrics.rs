//! Counters, the push-latency histogram, the run summary (SPEC `--summary`) and the progress bar.
//!
//! Counters are atomics shared by every worker and tokio task of a process; the histogram and
//! the timeline's samples sit behind a mutex taken once per provider call.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use serde::Serialize;

/// Per-target counters. `eligible = delivered + dead_lettered + unreachable` once drained.
#[derive(Debug, Default)]
pub struct CampaignStats {
    /// Users this run claimed and set out to reach.
    pub eligible: AtomicU64,
    /// Messages the provider accepted.
    pub delivered: AtomicU64,
    /// Users in the audience who already had it (granted input, or the store's ledger).
    pub already_granted: AtomicU64,
    /// Messages that failed for good.
    pub dead_lettered: AtomicU64,
    /// Users the provider cannot address (no token).
    pub unreachable: AtomicU64,
}

impl CampaignStats {
    /// The counters as `[eligible, delivered, already_granted, dead_lettered, unreachable]`.
    pub fn counts(&self) -> [u64; 5] {
        [
            self.eligible.load(Relaxed),
            self.delivered.load(Relaxed),
            self.already_granted.load(Relaxed),
            self.dead_lettered.load(Relaxed),
            self.unreachable.load(Relaxed),
        ]
    }

    /// Adds another process's [`CampaignStats::counts`].
    pub fn add(&self, c: &[u64; 5]) {
        self.eligible.fetch_add(c[0], Relaxed);
        self.delivered.fetch_add(c[1], Relaxed);
        self.already_granted.fetch_add(c[2], Relaxed);
        self.dead_lettered.fetch_add(c[3], Relaxed);
        self.unreachable.fetch_add(c[4], Relaxed);
    }
}

/// One process's counters at the end of a run, sent to process 0 of a cluster for the summary.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Tally {
    /// Per run target, in order: [`CampaignStats::counts`].
    pub campaigns: Vec<[u64; 5]>,
    /// Users scanned.
    pub users_scanned: u64,
    /// Buckets scanned.
    pub buckets: u64,
    /// Batches pushed.
    pub batches: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Login events of known users.
    pub logins: u64,
    /// Login events of unknown users.
    pub logins_unknown: u64,
    /// Invalid push tokens.
    pub invalid_tokens: u64,
    /// The push-latency histogram as (µs, count) pairs.
    pub latency_us: Vec<(u64, u64)>,
}

/// One campaign's line in the summary.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CampaignSummary {
    /// Campaign id.
    pub id: String,
    /// The occurrence, for scheduled campaigns.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub occurrence: Option<String>,
    /// Why nothing was sent, when the campaign was not run (e.g. outside its window).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub skipped: Option<String>,
    /// See [`CampaignStats`].
    pub eligible: u64,
    /// See [`CampaignStats`].
    pub delivered: u64,
    /// See [`CampaignStats`].
    pub already_granted: u64,
    /// See [`CampaignStats`].
    pub dead_lettered: u64,
    /// See [`CampaignStats`].
    pub unreachable: u64,
}

impl CampaignStats {
    /// A snapshot for the summary.
    pub fn summary(&self, id: &str, occurrence: Option<&str>) -> CampaignSummary {
        CampaignSummary {
            id: id.to_owned(),
            occurrence: occurrence.map(str::to_owned),
            skipped: None,
            eligible: self.eligible.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            already_granted: self.already_granted.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            unreachable: self.unreachable.load(Relaxed),
        }
    }
}

/// Push latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

/// Deliveries per interval of the run (the summary's `timeline`): `delivered[i]` messages were
/// delivered between `i` and `i + 1` intervals after the run started. The delivered counter
/// is sampled whenever a provider call returns, so a batch counts in the interval of the
/// next call after it. Timelines of processes started together merge by adding element-wise.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Timeline {
    /// Length of one interval.
    pub interval_ms: u64,
    /// Deliveries in each interval.
    pub delivered: Vec<u64>,
}

/// The push-latency distribution (the summary's `push_latency_histogram`): `count[i]` pushes
/// took more than `upper_ms[i - 1]` and at most `upper_ms[i]`, where `upper_ms[i]` is
/// 2^(i/8) µs (eight buckets per doubling, ~9% wide), up to the slowest push. Histograms
/// merge by adding counts element-wise: the bounds are the same in every summary.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct LatencyHistogram {
    /// Upper bound of each bucket, milliseconds: 2^(i/8) / 1000.
    pub upper_ms: Vec<f64>,
    /// Pushes in each bucket.
    pub count: Vec<u64>,
}

/// Buckets per doubling of [`LatencyHistogram`].
const BUCKETS_PER_DOUBLING: f64 = 8.0;

/// The upper bound of latency bucket `i`, µs.
fn bucket_upper_us(i: usize) -> f64 {
    (i as f64 / BUCKETS_PER_DOUBLING).exp2()
}

/// The first latency bucket whose upper bound is at or above `us`.
fn latency_bucket(us: u64) -> usize {
    let i = (BUCKETS_PER_DOUBLING * (us.max(1) as f64).log2()).ceil() as usize;
    // Rounding in log2 may land one off at a bound; the bound itself decides.
    match i {
        0 => 0,
        _ if bucket_upper_us(i - 1) >= us as f64 => i - 1,
        _ if bucket_upper_us(i) < us as f64 => i + 1,
        _ => i,
    }
}

/// The interval of the summary's [`Timeline`].
pub const TIMELINE_INTERVAL: Duration = Duration::from_millis(100);

/// What provider calls record: push latencies, and the delivered counter sampled per interval.
#[derive(Debug)]
struct Recorded {
    latency_us: Histogram<u64>,
    /// The delivered counter at the last sample in each interval; `None` before any.
    delivered_at: Vec<Option<u64>>,
}

impl Recorded {
    fn sample(&mut self, elapsed: Duration, delivered: u64) {
        let i = (elapsed.as_millis() / TIMELINE_INTERVAL.as_millis()) as usize;
        if self.delivered_at.len() <= i {
            self.delivered_at.resize(i + 1, None);
        }
        self.delivered_at[i] = Some(delivered);
    }

    /// Deliveries per interval: the differences of the samples (an interval without one
    /// delivered nothing new).
    fn timeline(&self) -> Timeline {
        let mut last = 0;
        let delivered = self
            .delivered_at
            .iter()
            .map(|at| {
                let now = at.unwrap_or(last).max(last);
                let n = now - last;
                last = now;
                n
            })
            .collect();
        Timeline {
            interval_ms: TIMELINE_INTERVAL.as_millis() as u64,
            delivered,
        }
    }

    fn histogram(&self) -> LatencyHistogram {
        let mut count: Vec<u64> = Vec::new();
        for v in self.latency_us.iter_recorded() {
            let us = v.value_iterated_to().max(1);
            let i = latency_bucket(us);
            if count.len() <= i {
                count.resize(i + 1, 0);
            }
            count[i] += v.count_at_value();
        }
        LatencyHistogram {
            upper_ms: (0..count.len())
                .map(|i| bucket_upper_us(i) / 1000.0)
                .collect(),
            count,
        }
    }
}

/// The run summary (SPEC `--summary`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Summary {
    /// One line per campaign (occurrence).
    pub campaigns: Vec<CampaignSummary>,
    /// Users read from the source and tested against the audiences.
    pub users_scanned: u64,
    /// Buckets scanned.
    pub buckets: u64,
    /// Batches handed to the provider.
    pub batches: u64,
    /// Input lines skipped with `--skip-bad-lines`.
    pub skipped_lines: u64,
    /// Login events processed (users the source knows).
    pub logins: u64,
    /// Login events of unknown users, counted and ignored.
    pub logins_unknown_user: u64,
    /// Dead letters whose push token the provider called invalid or unregistered (FCM
    /// `UNREGISTERED`, `INVALID_ARGUMENT`): tokens to clean out of the user data.
    #[serde(default)]
    pub invalid_tokens: u64,
    /// Wall time of the fan-out.
    pub elapsed_s: f64,
    /// Delivered messages per second of `elapsed_s`.
    pub deliveries_per_s: f64,
    /// Time one push took.
    pub push_latency_ms: Latency,
    /// Its distribution.
    #[serde(default)]
    pub push_latency_histogram: LatencyHistogram,
    /// Deliveries over time.
    #[serde(default)]
    pub timeline: Timeline,
}

/// Process-wide counters of one run.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    /// Users scanned.
    pub users_scanned: AtomicU64,
    /// (user, campaign) pairs finished with: not in the audience, already granted, delivered,
    /// dead-lettered or unreachable. The progress bar's position.
    pub pairs_settled: AtomicU64,
    /// Buckets scanned.
    pub buckets: AtomicU64,
    /// Batches pushed.
    pub batches: AtomicU64,
    /// Messages delivered, all campaigns.
    pub delivered: AtomicU64,
    /// Retried attempts.
    pub retries: AtomicU64,
    /// Login events of known users.
    pub logins: AtomicU64,
    /// Login events of users the source does not know (ignored).
    pub logins_unknown: AtomicU64,
    /// Messages dead-lettered for an invalid or unregistered push token.
    pub invalid_tokens: AtomicU64,
    /// Users claimed in the store (each is then delivered, dead-lettered or unreachable).
    pub claimed: AtomicU64,
    /// Users found already granted when claimed.
    pub already_granted: AtomicU64,
    /// Messages dead-lettered, all campaigns.
    pub dead_lettered: AtomicU64,
    /// Messages for users without a push token, all campaigns.
    pub unreachable: AtomicU64,
    recorded: Mutex<Recorded>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh counters; the clock starts now.
    pub fn new() -> Self {
        // 1 µs .. 1 hour at 3 significant digits.
        let hist = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds"); // ok: constants
        Metrics {
            started: Instant::now(),
            users_scanned: AtomicU64::new(0),
            pairs_settled: AtomicU64::new(0),
            buckets: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            logins: AtomicU64::new(0),
            logins_unknown: AtomicU64::new(0),
            invalid_tokens: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            already_granted: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            unreachable: AtomicU64::new(0),
            recorded: Mutex::new(Recorded {
                latency_us: hist,
                delivered_at: Vec::new(),
            }),
        }
    }

    /// Records `n` pushes that took `latency` each (one lock for the lot)
    /// and samples the delivered counter for the timeline.
    pub fn record_latency(&self, latency: Duration, n: usize) {
        let Ok(mut r) = self.recorded.lock() else {
            return;
        };
        r.sample(self.elapsed(), self.delivered.load(Relaxed));
        let h = &mut r.latency_us;
        let _ = h.record_n((latency.as_micros() as u64).max(1), n as u64);
    }

    /// The push-latency histogram as cumulative counts at each of `bounds` (seconds), with the
    /// total count and the sum of all latencies in seconds (Prometheus' histogram shape).
    pub fn latency_cumulative(&self, bounds: &[f64]) -> (Vec<u64>, u64, f64) {
        let Ok(r) = self.recorded.lock() else {
            return (vec![0; bounds.len()], 0, 0.0);
        };
        let h = &r.latency_us;
        let counts = bounds
            .iter()
            .map(|b| h.count_between(0, (b * 1e6) as u64))
            .collect();
        let sum_s = h.mean() * h.len() as f64 / 1e6;
        (counts, h.len(), sum_s)
    }

    /// This process's counters, with `campaigns`' (one per run target, in order).
    pub fn tally<'a>(&self, campaigns: impl IntoIterator<Item = &'a CampaignStats>) -> Tally {
        let latency_us = match self.recorded.lock() {
            Ok(r) => r
                .latency_us
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
            Err(_) => Vec::new(),
        };
        Tally {
            campaigns: campaigns.into_iter().map(CampaignStats::counts).collect(),
            users_scanned: self.users_scanned.load(Relaxed),
            buckets: self.buckets.load(Relaxed),
            batches: self.batches.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            logins: self.logins.load(Relaxed),
            logins_unknown: self.logins_unknown.load(Relaxed),
            invalid_tokens: self.invalid_tokens.load(Relaxed),
            latency_us,
        }
    }

    /// Adds another process's tally; its campaign counters go to `campaigns` (the same run
    /// targets, in the same order).
    pub fn absorb<'a>(&self, t: &Tally, campaigns: impl IntoIterator<Item = &'a CampaignStats>) {
        for (stats, counts) in campaigns.into_iter().zip(&t.campaigns) {
            stats.add(counts);
        }
        self.users_scanned.fetch_add(t.users_scanned, Relaxed);
        self.buckets.fetch_add(t.buckets, Relaxed);
        self.batches.fetch_add(t.batches, Relaxed);
        self.delivered.fetch_add(t.delivered, Relaxed);
        self.logins.fetch_add(t.logins, Relaxed);
        self.logins_unknown.fetch_add(t.logins_unknown, Relaxed);
        self.invalid_tokens.fetch_add(t.invalid_tokens, Relaxed);
        if let Ok(mut r) = self.recorded.lock() {
            for &(us, n) in &t.latency_us {
                let _ = r.latency_us.record_n(us.max(1), n);
            }
        }
    }

    /// Seconds since the run started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The summary, given the per-campaign lines.
    pub fn summary(&self, campaigns: Vec<CampaignSummary>, skipped_lines: u64) -> Summary {
        let elapsed = self.elapsed().as_secs_f64();
        let delivered: u64 = campaigns.iter().map(|c| c.delivered).sum();
        let (latency, histogram, timeline) = match self.recorded.lock() {
            Ok(mut r) => {
                r.sample(self.elapsed(), delivered);
                let h = &r.latency_us;
                let latency = match h.is_empty() {
                    true => Latency::default(),
                    false => Latency {
                        p50: h.value_at_quantile(0.5) as f64 / 1000.0,
                        p99: h.value_at_quantile(0.99) as f64 / 1000.0,
                        max: h.max() as f64 / 1000.0,
                    },
                };
                (latency, r.histogram(), r.timeline())
            }
            Err(_) => Default::default(),
        };
        Summary {
            campaigns,
            users_scanned: self.users_scanned.load(Relaxed),
            buckets: self.buckets.load(Relaxed),
            batches: self.batches.load(Relaxed),
            skipped_lines,
            logins: self.logins.load(Relaxed),
            logins_unknown_user: self.logins_unknown.load(Relaxed),
            invalid_tokens: self.invalid_tokens.load(Relaxed),
            elapsed_s: elapsed,
            deliveries_per_s: if elapsed > 0.0 {
                delivered as f64 / elapsed
            } else {
                0.0
            },
            push_latency_ms: latency,
            push_latency_histogram: histogram,
            timeline,
        }
    }
}

/// A progress bar on stderr, drawn from a thread while the run lasts; only when stderr is a
/// terminal and not `--quiet`.
pub struct Progress {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Starts drawing progress through `total_pairs` (user, campaign) pairs, unless `quiet` or
    /// stderr is not a terminal.
    pub fn start(metrics: Arc<Metrics>, total_pairs: u64, quiet: bool) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        if quiet || !std::io::stderr().is_terminal() {
            return Progress { done, thread: None };
        }
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            let bar = indicatif::ProgressBar::new(total_pairs);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} user×campaign pairs, {msg} [{elapsed_precise}, ETA {eta}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            while !flag.load(Relaxed) {
                bar.set_position(metrics.pairs_settled.load(Relaxed));
                let delivered = metrics.delivered.load(Relaxed);
                let rate = delivered as f64 / metrics.elapsed().as_secs_f64().max(1e-3);
                bar.set_message(format!("{delivered} delivered ({rate:.0}/s)"));
                std::thread::sleep(Duration::from_millis(200));
            }
            bar.finish_and_clear();
        });
        Progress {
            done,
            thread: Some(thread),
        }
    }

    /// Stops and clears the bar.
    pub fn finish(mut self) {
        self.done.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded() -> Recorded {
        Recorded {
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap(),
            delivered_at: Vec::new(),
        }
    }

    #[test]
    fn the_timeline_counts_what_was_delivered_in_each_interval() {
        let mut r = recorded();
        let ms = Duration::from_millis;
        // (time, delivered counter then): three samples in interval 0, none in 1 and 3.
        let samples = [
            (10, 5),
            (50, 40),
            (99, 100),
            (230, 250),
            (450, 260),
            (460, 300),
        ];
        for (t, n) in samples {
            r.sample(ms(t), n);
        }
        let t = r.timeline();
        assert_eq!(t.interval_ms, 100);
        // Naive: the last sample of each interval minus the last one before it.
        let mut want = vec![0u64; 5];
        let mut before = 0;
        for i in 0..5u64 {
            if let Some(&(_, n)) = samples.iter().rev().find(|(t, _)| t / 100 == i) {
                want[i as usize] = n - before;
                before = n;
            }
        }
        assert_eq!(t.delivered, want);
        assert_eq!(t.delivered.iter().sum::<u64>(), 300);
    }

    #[test]
    fn the_latency_histogram_puts_each_push_under_the_first_bound_at_or_above_it() {
        let mut r = recorded();
        let values = [1u64, 2, 3, 3, 700, 1024, 1500, 90_000, 5_000_001];
        for v in values {
            r.latency_us.record(v).unwrap();
        }
        let h = r.histogram();
        let mut want = vec![0u64; h.count.len()];
        for v in values {
            // Naive: walk the bounds 2^(i/8) µs up from 1 µs.
            let i = (0..400)
                .find(|&i| 2f64.powf(i as f64 / 8.0) >= v as f64)
                .unwrap();
            want[i] += 1;
        }
        assert_eq!(h.count, want);
        assert_eq!(h.upper_ms[0], 0.001);
        assert_eq!(h.upper_ms[80], 1.024);
        assert_eq!(h.count.iter().sum::<u64>(), values.len() as u64);
        assert_eq!(h.upper_ms.len(), h.count.len());
    }
}
