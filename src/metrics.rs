//! Counters, the push-latency histograms (per provider call, and per priority lane from a
//! message being ready to its delivery), the run summary (SPEC `--summary`) and the progress
//! bar.
//!
//! Counters are atomics shared by every worker and tokio task of a process; the histogram and
//! the timeline's samples sit behind a mutex taken once per provider call or list of answers.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use serde::Serialize;

use crate::model::Priority;

/// Declares a set of counters once. From one list of fields, each with its doc comment and
/// its Prometheus name (`""`: not exported), it yields the struct of atomics, its plain
/// snapshot, `snapshot()`, `add()` (a snapshot from elsewhere — another process of a
/// cluster — added in), and `expose()` (the Prometheus lines, the doc comment as HELP).
#[macro_export]
#[doc(hidden)]
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub struct $name:ident / $snap:ident {
            $( $(#[doc = $doc:literal])+ $field:ident => $prom:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $name {
            $( $(#[doc = $doc])+ pub $field: std::sync::atomic::AtomicU64, )*
        }

        #[doc = concat!("The values of [`", stringify!($name), "`] at one moment.")]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct $snap {
            $( $(#[doc = $doc])+ pub $field: u64, )*
        }

        impl $snap {
            /// Every counter as (field name, doc comment, value), in declaration order: for
            /// what reports each counter without naming them all (per-campaign Prometheus
            /// series).
            pub fn fields(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![ $( (stringify!($field), concat!($($doc),+), self.$field), )* ]
            }
        }

        impl $name {
            /// Every counter's value now.
            pub fn snapshot(&self) -> $snap {
                $snap { $( $field: self.$field.load(std::sync::atomic::Ordering::Relaxed), )* }
            }

            /// Adds `other` to each counter.
            pub fn add(&self, other: &$snap) {
                $( self.$field.fetch_add(other.$field, std::sync::atomic::Ordering::Relaxed); )*
            }

            /// Appends the exported counters in the Prometheus text format.
            pub fn expose(&self, out: &mut String) {
                $( $crate::metrics::expose_counter(out, $prom, concat!($($doc),+), self.$field.load(std::sync::atomic::Ordering::Relaxed)); )*
            }
        }
    };
}

pub use counters;

/// One counter in the Prometheus text format (nothing for an unexported one, `name` empty).
#[doc(hidden)]
pub fn expose_counter(out: &mut String, name: &str, help: &str, value: u64) {
    use std::fmt::Write as _;
    if name.is_empty() {
        return;
    }
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

counters! {
    /// Per-target counters (SPEC "Outcomes"). Once drained, `eligible = delivered +
    /// dead_lettered + unreachable + capped + quiet_held + held_out + cancelled`.
    pub struct CampaignStats / CampaignCounts {
        /// Users this run claimed and set out to reach.
        eligible => "",
        /// Messages the provider accepted.
        delivered => "",
        /// Users in the audience who already had it (granted input, or the store's ledger).
        already_granted => "",
        /// Messages that failed for good.
        dead_lettered => "",
        /// Users the provider cannot address (no token).
        unreachable => "",
        /// Users a frequency cap kept from this occurrence.
        capped => "",
        /// Users held for the end of their quiet hours.
        quiet_held => "",
        /// Users in the campaign's holdout or the control group: recorded, never sent.
        held_out => "",
        /// Users not yet claimed when the campaign was cancelled.
        cancelled => "",
    }
}

counters! {
    /// Process-wide counters of one run (or of a `serve` process's life).
    pub struct Counters / Counts {
        /// Users scanned by fan-outs.
        users_scanned => "fanout_users_scanned_total",
        /// (user, campaign) pairs finished with: not in the audience, already granted,
        /// delivered, dead-lettered or unreachable. The progress bar's position.
        pairs_settled => "",
        /// Buckets scanned.
        buckets => "",
        /// Batches handed to the provider.
        batches => "fanout_batches_total",
        /// Messages delivered.
        delivered => "fanout_deliveries_total",
        /// Push attempts retried.
        retries => "fanout_retries_total",
        /// Login events of known users.
        logins => "fanout_logins_total",
        /// Login events of unknown users (ignored).
        logins_unknown => "fanout_logins_unknown_user_total",
        /// Messages dead-lettered for an invalid or unregistered push token.
        invalid_tokens => "fanout_invalid_tokens_total",
        /// Users claimed in the store (each is then delivered, dead-lettered or unreachable).
        claimed => "fanout_claims_total",
        /// Users found already granted when claimed.
        already_granted => "fanout_already_granted_total",
        /// Messages dead-lettered (failures past retries or permanent).
        dead_lettered => "fanout_dead_lettered_total",
        /// Messages for users without a push token.
        unreachable => "fanout_unreachable_total",
        /// Users held out of a campaign (its holdout or the control group).
        held_out => "fanout_held_out_total",
        /// Users held for the end of their quiet hours.
        quiet_held => "fanout_quiet_held_total",
        /// Users a frequency cap kept from a campaign occurrence.
        capped => "fanout_capped_total",
        /// Users not yet claimed when their campaign was cancelled.
        cancelled => "fanout_cancelled_total",
    }
}

/// When a target's pushes were answered, first and last (ms since the Unix epoch), for the
/// store's record of a campaign's activity ([`crate::store::campaigns::Activity`]).
#[derive(Debug, Default)]
pub struct SendSpan {
    first: std::sync::atomic::AtomicI64,
    last: std::sync::atomic::AtomicI64,
}

impl SendSpan {
    /// Notes an answer now. Read before written: the workers of a run note their answers
    /// side by side, and a write (even one that changes nothing) takes the cache line from the
    /// other core; the span changes at most once a millisecond.
    pub fn note(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = chrono::Utc::now().timestamp_millis();
        if self.first.load(Relaxed) == 0 {
            let _ = self.first.compare_exchange(0, now, Relaxed, Relaxed);
        }
        if self.last.load(Relaxed) < now {
            self.last.fetch_max(now, Relaxed);
        }
    }

    /// The first and last answer, if any.
    pub fn get(&self) -> Option<(i64, i64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let (first, last) = (self.first.load(Relaxed), self.last.load(Relaxed));
        (first > 0).then_some((first, last.max(first)))
    }
}

/// One process's counters at the end of a run, sent to process 0 of a cluster for the summary.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Tally {
    /// Per run target, in order.
    pub campaigns: Vec<CampaignCounts>,
    /// The process's counters.
    pub counts: Counts,
    /// The push-latency histogram as (µs, count) pairs.
    pub latency_us: Vec<(u64, u64)>,
    /// Each lane's ready-to-delivered histogram, the same way.
    #[serde(default)]
    pub lane_latency_us: [Vec<(u64, u64)>; 3],
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
    /// Its counters (all 0 when skipped).
    #[serde(flatten)]
    pub counts: CampaignCounts,
}

impl CampaignStats {
    /// A snapshot for the summary.
    pub fn summary(&self, id: &str, occurrence: Option<&str>) -> CampaignSummary {
        CampaignSummary {
            id: id.to_owned(),
            occurrence: occurrence.map(str::to_owned),
            skipped: None,
            counts: self.snapshot(),
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
    /// Per lane: from a message's candidate batch reaching the push operator to its delivery.
    lane_latency_us: [Histogram<u64>; 3],
    /// The delivered counter at the last sample in each interval; `None` before any.
    delivered_at: Vec<Option<u64>>,
}

/// 1 µs .. 1 hour at 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds") // ok: constants
}

/// Percentiles of a histogram of µs, in ms.
fn percentiles(h: &Histogram<u64>) -> Latency {
    match h.is_empty() {
        true => Latency::default(),
        false => Latency {
            p50: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99: h.value_at_quantile(0.99) as f64 / 1000.0,
            max: h.max() as f64 / 1000.0,
        },
    }
}

/// A histogram as (µs, count) pairs, for a [`Tally`].
fn pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

impl Recorded {
    fn new() -> Recorded {
        Recorded {
            latency_us: latency_histogram(),
            lane_latency_us: [
                latency_histogram(),
                latency_histogram(),
                latency_histogram(),
            ],
            delivered_at: Vec::new(),
        }
    }

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
    /// The run was stopped by a signal before it finished (a re-run sends the rest).
    pub interrupted: bool,
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
    /// Per priority of the campaigns that delivered (`transactional`, `normal`, `bulk`): time
    /// from a message being ready to push (its candidates reaching the push operator) to the
    /// provider accepting it — the queueing behind other work included.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub push_latency_ms_by_priority: BTreeMap<String, Latency>,
    /// Its distribution.
    #[serde(default)]
    pub push_latency_histogram: LatencyHistogram,
    /// Deliveries over time.
    #[serde(default)]
    pub timeline: Timeline,
}

/// Process-wide counters of one run, with the push-latency histogram and the timeline.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    /// The counters.
    pub count: Counters,
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
        Metrics {
            started: Instant::now(),
            count: Counters::default(),
            recorded: Mutex::new(Recorded::new()),
        }
    }

    /// Records `n` pushes that took `latency` each (one lock for the lot)
    /// and samples the delivered counter for the timeline.
    pub fn record_latency(&self, latency: Duration, n: usize) {
        let Ok(mut r) = self.recorded.lock() else {
            return;
        };
        r.sample(self.elapsed(), self.count.delivered.load(Relaxed));
        let h = &mut r.latency_us;
        let _ = h.record_n((latency.as_micros() as u64).max(1), n as u64);
    }

    /// Records pushes that took `latencies`, each its own (one lock for the lot), and samples
    /// the delivered counter for the timeline.
    pub fn record_latencies(&self, latencies: impl IntoIterator<Item = Duration>) {
        let Ok(mut r) = self.recorded.lock() else {
            return;
        };
        r.sample(self.elapsed(), self.count.delivered.load(Relaxed));
        for latency in latencies {
            let _ = r.latency_us.record((latency.as_micros() as u64).max(1));
        }
    }

    /// Records `n` messages of priority `lane` delivered `latency` after they were ready to
    /// push.
    pub fn record_lane_latency(&self, lane: Priority, latency: Duration, n: usize) {
        if n == 0 {
            return;
        }
        if let Ok(mut r) = self.recorded.lock() {
            let h = &mut r.lane_latency_us[lane.lane()];
            let _ = h.record_n((latency.as_micros() as u64).max(1), n as u64);
        }
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
        let (latency_us, lane_latency_us) = match self.recorded.lock() {
            Ok(r) => (
                pairs(&r.latency_us),
                [0, 1, 2].map(|l| pairs(&r.lane_latency_us[l])),
            ),
            Err(_) => Default::default(),
        };
        Tally {
            campaigns: campaigns.into_iter().map(CampaignStats::snapshot).collect(),
            counts: self.count.snapshot(),
            latency_us,
            lane_latency_us,
        }
    }

    /// Adds another process's tally; its campaign counters go to `campaigns` (the same run
    /// targets, in the same order).
    pub fn absorb<'a>(&self, t: &Tally, campaigns: impl IntoIterator<Item = &'a CampaignStats>) {
        for (stats, counts) in campaigns.into_iter().zip(&t.campaigns) {
            stats.add(counts);
        }
        self.count.add(&t.counts);
        if let Ok(mut r) = self.recorded.lock() {
            for &(us, n) in &t.latency_us {
                let _ = r.latency_us.record_n(us.max(1), n);
            }
            for (h, lane) in r.lane_latency_us.iter_mut().zip(&t.lane_latency_us) {
                for &(us, n) in lane {
                    let _ = h.record_n(us.max(1), n);
                }
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
        let delivered: u64 = campaigns.iter().map(|c| c.counts.delivered).sum();
        let c = self.count.snapshot();
        let (latency, by_priority, histogram, timeline) = match self.recorded.lock() {
            Ok(mut r) => {
                r.sample(self.elapsed(), delivered);
                let by_priority = Priority::ALL
                    .iter()
                    .filter(|p| !r.lane_latency_us[p.lane()].is_empty())
                    .map(|p| {
                        let lane = percentiles(&r.lane_latency_us[p.lane()]);
                        (p.name().to_owned(), lane)
                    })
                    .collect();
                let latency = percentiles(&r.latency_us);
                (latency, by_priority, r.histogram(), r.timeline())
            }
            Err(_) => Default::default(),
        };
        Summary {
            interrupted: false,
            campaigns,
            users_scanned: c.users_scanned,
            buckets: c.buckets,
            batches: c.batches,
            skipped_lines,
            logins: c.logins,
            logins_unknown_user: c.logins_unknown,
            invalid_tokens: c.invalid_tokens,
            elapsed_s: elapsed,
            deliveries_per_s: if elapsed > 0.0 {
                delivered as f64 / elapsed
            } else {
                0.0
            },
            push_latency_ms: latency,
            push_latency_ms_by_priority: by_priority,
            push_latency_histogram: histogram,
            timeline,
        }
    }
}

/// How often the progress is logged when stderr is not a terminal (cron, Kubernetes).
pub const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(10);
/// Overrides [`PROGRESS_LOG_EVERY`] (a duration such as `30s`).
pub const PROGRESS_LOG_ENV: &str = "FANOUT_PROGRESS_EVERY";

/// The run's progress on stderr, from a thread while the run lasts (not with `--quiet`): on a
/// terminal, a bar as wide as the terminal; otherwise a log line every
/// [`PROGRESS_LOG_EVERY`]. Both count settled (user, campaign) pairs — not in the audience,
/// already granted, delivered, dead-lettered, unreachable — against every pair the run will
/// settle, so the ETA comes from the rate pairs are settled at, pushes included.
pub struct Progress {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a progress report says: settled of total, delivered, the delivery rate, the ETA.
fn progress_line(metrics: &Metrics, total: u64) -> String {
    let settled = metrics.count.pairs_settled.load(Relaxed);
    let delivered = metrics.count.delivered.load(Relaxed);
    let elapsed = metrics.elapsed().as_secs_f64().max(1e-3);
    let eta = match settled {
        0 => "?".to_owned(),
        s => format!(
            "{:.0} s",
            total.saturating_sub(s) as f64 * elapsed / s as f64
        ),
    };
    format!(
        "{settled}/{total} pairs settled, {delivered} delivered ({:.0}/s), ETA {eta}",
        delivered as f64 / elapsed
    )
}

impl Progress {
    /// Starts reporting progress through `total_pairs` (user, campaign) pairs, unless `quiet`.
    pub fn start(metrics: Arc<Metrics>, total_pairs: u64, quiet: bool) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        if quiet {
            return Progress { done, thread: None };
        }
        let flag = done.clone();
        let thread = match std::io::stderr().is_terminal() {
            true => std::thread::spawn(move || draw_bar(&metrics, total_pairs, &flag)),
            false => {
                let every = std::env::var(PROGRESS_LOG_ENV)
                    .ok()
                    .and_then(|v| humantime::parse_duration(&v).ok())
                    .unwrap_or(PROGRESS_LOG_EVERY);
                std::thread::spawn(move || log_lines(&metrics, total_pairs, &flag, every))
            }
        };
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

/// The bar on a terminal: its width follows the terminal's.
fn draw_bar(metrics: &Metrics, total: u64, done: &AtomicBool) {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{wide_bar} {percent:>3}% {msg} [{elapsed}, ETA {eta}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    while !done.load(Relaxed) {
        bar.set_position(metrics.count.pairs_settled.load(Relaxed));
        let delivered = metrics.count.delivered.load(Relaxed);
        let rate = delivered as f64 / metrics.elapsed().as_secs_f64().max(1e-3);
        bar.set_message(format!("{delivered} sent ({rate:.0}/s)"));
        std::thread::sleep(Duration::from_millis(200));
    }
    bar.finish_and_clear();
}

/// A log line every `every` while stderr is not a terminal, and one at the end.
fn log_lines(metrics: &Metrics, total: u64, done: &AtomicBool, every: Duration) {
    let mut next = Instant::now() + every;
    while !done.load(Relaxed) {
        if Instant::now() >= next {
            tracing::info!(target: "fanout::progress", "{}", progress_line(metrics, total));
            next += every;
        }
        std::thread::sleep(Duration::from_millis(50).min(every));
    }
    tracing::info!(target: "fanout::progress", "{} (finished)", progress_line(metrics, total));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded() -> Recorded {
        Recorded::new()
    }

    /// Only lanes that delivered appear, by name, and a cluster's tallies add up per lane.
    #[test]
    fn lane_latency_is_summarised_per_priority_that_sent() {
        let m = Metrics::new();
        m.record_lane_latency(Priority::Transactional, Duration::from_millis(50), 99);
        m.record_lane_latency(Priority::Transactional, Duration::from_millis(400), 1);
        m.record_lane_latency(Priority::Bulk, Duration::from_secs(3), 10);
        let other = Metrics::new();
        other.absorb(&m.tally([]), []);
        let s = other.summary(Vec::new(), 0);
        let names: Vec<&str> = s
            .push_latency_ms_by_priority
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(names, ["bulk", "transactional"]);
        let tx = &s.push_latency_ms_by_priority["transactional"];
        assert!(
            (tx.p50 - 50.0).abs() < 0.1 && (tx.max - 400.0).abs() < 0.5,
            "{tx:?}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert!(
            json["push_latency_ms_by_priority"]["bulk"]["p99"]
                .as_f64()
                .unwrap()
                > 2999.0
        );
        let quiet = serde_json::to_value(Metrics::new().summary(Vec::new(), 0)).unwrap();
        assert!(quiet.get("push_latency_ms_by_priority").is_none());
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
