//! What one `serve` process knows of its campaigns beyond the store: each campaign's counters
//! summed over the generations it ran in, the delivered counter and each campaign's settled
//! users sampled once a second, and from them the rates, progress and ETAs the status page
//! shows, and `/metrics`' per-campaign series.
//!
//! A generation counts in the [`CampaignStats`] of its own [`Context`] (a new one each
//! generation): [`Live::begin`] points at it, [`Live::end`] adds its counts to those of the
//! generations before. Every target of a campaign counts for its id: each occurrence of a hot
//! product, a release or expiry of users held for their quiet hours.
//!
//! - **Rate**: users of a campaign this process gave an outcome (every outcome but in flight;
//!   quiet-held included, as that is this generation's last word on them), per second, over
//!   the last minute of samples (less while the process is younger). `None` until two
//!   samples exist, and for a campaign this process never worked on.
//! - **Progress** of a fan-out: its generation scans every bucket of the users once, so the
//!   share `f` of the buckets scanned says how much of the audience was found; of the users
//!   found (`eligible`), `done` have an outcome. Progress is `f × done / eligible` (`f` while
//!   none was found yet), and the users still to settle are estimated as `eligible / f −
//!   done` (not at all while none was found). A lazy coupon grows with logins and has
//!   neither.
//! - **ETA**: the users still to settle over the rate; `None` without a rate, or outside a
//!   fan-out's generation (except 0 once it is all settled).
//!
//! What is kept is bounded: at most [`MAX_CAMPAIGNS`] campaigns (those seen in a generation
//! longest ago are forgotten first), [`DELIVERY_SAMPLES`] seconds of deliveries, one minute
//! of settled samples.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::dataflow::Context;
use crate::metrics::{CampaignCounts, CampaignStats, Metrics};

/// How often the counters are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Samples of the delivered counter kept: ten minutes, one a second.
pub const DELIVERY_SAMPLES: usize = 600;
/// Samples of the settled users kept for the rate: one minute (the rate spans them).
const RATE_SAMPLES: usize = 61;
/// Campaigns whose counts are kept and reported on `/metrics` at most.
pub const MAX_CAMPAIGNS: usize = 500;
/// How long a campaign's series stay on `/metrics` after its last generation ended (so that
/// scrapes see its final counts).
pub const SERIES_LINGER: Duration = Duration::from_secs(600);

/// The per-campaign registry; shared by the generations, the sampler and the listener.
pub struct Live {
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Counts of the generations that ended, by campaign id.
    ended: BTreeMap<String, CampaignCounts>,
    /// The generation running now.
    current: Option<Running>,
    /// When each campaign was last in a generation (at its start or end).
    seen: BTreeMap<String, Instant>,
    /// Each fan-out's scan as its last generation ended.
    last_scan: BTreeMap<String, Scan>,
    /// (when, the delivered counter), oldest first.
    deliveries: VecDeque<(Instant, u64)>,
    /// (when, users with an outcome by campaign), oldest first.
    settled: VecDeque<(Instant, BTreeMap<String, u64>)>,
}

/// A generation running now.
struct Running {
    ctx: Arc<Context>,
    /// The process's scanned-buckets counter when it began.
    buckets_at_start: u64,
    /// Buckets it scans (0 without a fan-out).
    buckets: u64,
}

/// A fan-out's scan in one generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scan {
    /// Share of the buckets scanned, `0.0 ..= 1.0`.
    pub scanned: f64,
    /// Users found and claimed so far.
    pub eligible: u64,
    /// Of them, users with an outcome.
    pub done: u64,
}

impl Scan {
    /// The share of the audience settled (see the [module docs](self)).
    pub fn progress(&self) -> f64 {
        let settled = match self.eligible {
            0 => 1.0,
            n => self.done as f64 / n as f64,
        };
        (self.scanned * settled).clamp(0.0, 1.0)
    }

    /// Users estimated still to settle; `None` while the scan found nobody to go on.
    pub fn remaining(&self) -> Option<f64> {
        if self.scanned <= 0.0 || (self.eligible == 0 && self.scanned < 1.0) {
            return None;
        }
        Some((self.eligible as f64 / self.scanned - self.done as f64).max(0.0))
    }
}

/// What the status page shows of one campaign beyond the store.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct View {
    /// Users given an outcome per second over the last minute.
    pub rate_per_s: Option<f64>,
    /// Share of the fan-out settled, `0.0 ..= 1.0`.
    pub progress: Option<f64>,
    /// Seconds until it is all settled.
    pub eta_s: Option<f64>,
}

/// Users of `c` with an outcome: every counter but `eligible` and `already_granted` (who
/// were never claimed). Spelled out so that a new outcome fails to compile here until it is
/// counted.
pub fn outcomes(c: &CampaignCounts) -> u64 {
    let CampaignCounts {
        eligible: _,
        already_granted: _,
        delivered,
        dead_lettered,
        unreachable,
        capped,
        quiet_held,
        held_out,
        cancelled,
    } = *c;
    delivered + dead_lettered + unreachable + capped + quiet_held + held_out + cancelled
}

/// `a + b`, counter by counter.
fn sum(a: &CampaignCounts, b: &CampaignCounts) -> CampaignCounts {
    let total = CampaignStats::default();
    total.add(a);
    total.add(b);
    total.snapshot()
}

impl Live {
    /// A registry over the process's `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Live {
            metrics,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The process's counters and latency histogram.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the maps whole: a panic elsewhere cannot leave them half-done.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A generation over `ctx` starts.
    pub fn begin(&self, ctx: &Arc<Context>) {
        let fan_outs = ctx.targets.iter().any(|t| !t.target.campaign.is_lazy());
        let buckets = match fan_outs {
            true => ctx.source.buckets(ctx.placement.buckets).len() as u64,
            false => 0,
        };
        let mut inner = self.lock();
        inner.saw(ctx);
        inner.current = Some(Running {
            ctx: ctx.clone(),
            buckets_at_start: self.metrics.count.buckets.load(Relaxed),
            buckets,
        });
    }

    /// The generation over `ctx` ended: its counts join the earlier generations'.
    pub fn end(&self, ctx: &Arc<Context>) {
        let mut inner = self.lock();
        let Some(running) = inner.current.take_if(|r| Arc::ptr_eq(&r.ctx, ctx)) else {
            return;
        };
        for (id, scan) in self.scans(&running) {
            inner.last_scan.insert(id, scan);
        }
        for (id, counts) in generation_counts(ctx) {
            let before = inner.ended.get(&id).copied().unwrap_or_default();
            inner.ended.insert(id, sum(&before, &counts));
        }
        inner.saw(ctx);
        inner.bound();
    }

    /// Samples the counters now; [`Live::sample_every_second`] calls it.
    pub fn sample(&self, at: Instant) {
        let delivered = self.metrics.count.delivered.load(Relaxed);
        let mut inner = self.lock();
        let settled = inner
            .counts()
            .into_iter()
            .map(|(id, c)| (id, outcomes(&c)))
            .collect();
        push_bounded(&mut inner.deliveries, (at, delivered), DELIVERY_SAMPLES + 1);
        push_bounded(&mut inner.settled, (at, settled), RATE_SAMPLES);
    }

    /// Samples the counters every [`SAMPLE_EVERY`] until the runtime stops.
    pub async fn sample_every_second(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sample(Instant::now());
        }
    }

    /// Deliveries per second in each sampled interval, oldest first (at most
    /// [`DELIVERY_SAMPLES`]).
    pub fn deliveries_per_s(&self) -> Vec<f64> {
        let inner = self.lock();
        let d = &inner.deliveries;
        d.iter()
            .zip(d.iter().skip(1))
            .map(|((t0, n0), (t1, n1))| {
                let dt = t1.duration_since(*t0).as_secs_f64().max(1e-3);
                n1.saturating_sub(*n0) as f64 / dt
            })
            .collect()
    }

    /// Rate, progress and ETA of every campaign this process worked on, by id.
    pub fn views(&self) -> BTreeMap<String, View> {
        let inner = self.lock();
        let rates = inner.rates();
        let mut scans: BTreeMap<String, (Scan, bool)> = inner
            .last_scan
            .iter()
            .map(|(id, s)| (id.clone(), (*s, false)))
            .collect();
        if let Some(running) = &inner.current {
            for (id, scan) in self.scans(running) {
                scans.insert(id, (scan, true));
            }
        }
        let mut views: BTreeMap<String, View> = rates
            .iter()
            .map(|(id, rate)| {
                let view = View {
                    rate_per_s: Some(*rate),
                    ..View::default()
                };
                (id.clone(), view)
            })
            .collect();
        for (id, (scan, running)) in scans {
            let view = views.entry(id.clone()).or_default();
            view.progress = Some(scan.progress());
            view.eta_s = match (scan.remaining(), view.rate_per_s) {
                (Some(r), _) if r < 0.5 => Some(0.0),
                (Some(r), Some(rate)) if running && rate > 0.0 => Some(r / rate),
                _ => None,
            };
        }
        views
    }

    /// The per-campaign series in the Prometheus text format, for the active campaigns: those
    /// of the generation running now, and those of generations that ended less than
    /// [`SERIES_LINGER`] ago (at most [`MAX_CAMPAIGNS`]). One counter per
    /// [`CampaignCounts`] field (`fanout_campaign_delivered_total{campaign="…"}`, …) summed
    /// over this process's generations, and the gauge `fanout_campaign_in_flight`.
    pub fn expose(&self, out: &mut String) {
        self.expose_at(out, Instant::now());
    }

    /// [`Live::expose`] as of `now`.
    fn expose_at(&self, out: &mut String, now: Instant) {
        let inner = self.lock();
        let running: BTreeSet<&str> = inner.current.iter().flat_map(|r| ids(&r.ctx)).collect();
        let counts = inner.counts();
        let shown: Vec<(&String, &CampaignCounts)> = counts
            .iter()
            .filter(|(id, _)| {
                running.contains(id.as_str())
                    || inner
                        .seen
                        .get(*id)
                        .is_some_and(|at| now.saturating_duration_since(*at) < SERIES_LINGER)
            })
            .take(MAX_CAMPAIGNS)
            .collect();
        let Some((_, first)) = shown.first() else {
            return;
        };
        for (i, (field, doc, _)) in first.fields().into_iter().enumerate() {
            let name = format!("fanout_campaign_{field}_total");
            let help = doc.split_whitespace().collect::<Vec<_>>().join(" ");
            let _ = writeln!(out, "# HELP {name} Per campaign: {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (id, c) in &shown {
                let value = c.fields().get(i).map_or(0, |f| f.2);
                let _ = writeln!(out, "{name}{{campaign=\"{}\"}} {value}", label(id));
            }
        }
        let name = "fanout_campaign_in_flight";
        let _ = writeln!(
            out,
            "# HELP {name} Per campaign: users claimed by this process and not yet given an outcome.\n# TYPE {name} gauge"
        );
        for (id, c) in &shown {
            let in_flight = c.eligible.saturating_sub(outcomes(c));
            let _ = writeln!(out, "{name}{{campaign=\"{}\"}} {in_flight}", label(id));
        }
    }

    /// Each fan-out campaign's scan in `running`.
    fn scans(&self, running: &Running) -> BTreeMap<String, Scan> {
        if running.buckets == 0 {
            return BTreeMap::new();
        }
        let scanned_buckets = self
            .metrics
            .count
            .buckets
            .load(Relaxed)
            .saturating_sub(running.buckets_at_start);
        let scanned = (scanned_buckets as f64 / running.buckets as f64).min(1.0);
        let fan_outs: BTreeSet<&str> = running
            .ctx
            .targets
            .iter()
            .filter(|t| !t.target.campaign.is_lazy())
            .map(|t| t.target.campaign.id.as_str())
            .collect();
        generation_counts(&running.ctx)
            .into_iter()
            .filter(|(id, _)| fan_outs.contains(id.as_str()))
            .map(|(id, c)| {
                let scan = Scan {
                    scanned,
                    eligible: c.eligible,
                    done: outcomes(&c),
                };
                (id, scan)
            })
            .collect()
    }
}

impl Inner {
    /// Every campaign's counts: the ended generations' plus the running one's.
    fn counts(&self) -> BTreeMap<String, CampaignCounts> {
        let mut all = self.ended.clone();
        if let Some(running) = &self.current {
            for (id, c) in generation_counts(&running.ctx) {
                let before = all.get(&id).copied().unwrap_or_default();
                all.insert(id, sum(&before, &c));
            }
        }
        all
    }

    /// Users given an outcome per second over the samples kept, by campaign.
    fn rates(&self) -> BTreeMap<String, f64> {
        let (Some((t0, first)), Some((t1, last))) = (self.settled.front(), self.settled.back())
        else {
            return BTreeMap::new();
        };
        let dt = t1.duration_since(*t0).as_secs_f64();
        if dt <= 0.0 {
            return BTreeMap::new();
        }
        last.iter()
            .map(|(id, n)| {
                // A campaign first seen after the oldest sample started from 0.
                let before = first.get(id).copied().unwrap_or(0);
                (id.clone(), n.saturating_sub(before) as f64 / dt)
            })
            .collect()
    }

    /// Notes that the campaigns of `ctx` are in a generation now.
    fn saw(&mut self, ctx: &Context) {
        let now = Instant::now();
        for id in ids(ctx) {
            self.seen.insert(id.to_owned(), now);
        }
    }

    /// Keeps at most [`MAX_CAMPAIGNS`] campaigns, dropping those seen longest ago.
    fn bound(&mut self) {
        let excess = self.seen.len().saturating_sub(MAX_CAMPAIGNS);
        if excess == 0 {
            return;
        }
        let mut by_age: Vec<(Instant, String)> =
            self.seen.iter().map(|(id, at)| (*at, id.clone())).collect();
        by_age.sort();
        for (_, id) in by_age.into_iter().take(excess) {
            self.seen.remove(&id);
            self.ended.remove(&id);
            self.last_scan.remove(&id);
        }
    }
}

/// The campaign ids of `ctx`'s targets.
fn ids(ctx: &Context) -> impl Iterator<Item = &str> {
    ctx.targets.iter().map(|t| t.target.campaign.id.as_str())
}

/// The counts of `ctx`'s targets, summed by campaign id.
fn generation_counts(ctx: &Context) -> BTreeMap<String, CampaignCounts> {
    let mut by_id: BTreeMap<String, CampaignCounts> = BTreeMap::new();
    for rt in &ctx.targets {
        let c = by_id.entry(rt.target.campaign.id.clone()).or_default();
        *c = sum(c, &rt.stats.snapshot());
    }
    by_id
}

/// Appends `item`, dropping the oldest beyond `max`.
fn push_bounded<T>(q: &mut VecDeque<T>, item: T, max: usize) {
    q.push_back(item);
    while q.len() > max {
        q.pop_front();
    }
}

/// `id` as a Prometheus label value (campaign ids need no escaping; this keeps it so).
fn label(id: &str) -> String {
    id.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_and_remaining_extrapolate_from_the_share_scanned() {
        let half = Scan {
            scanned: 0.5,
            eligible: 100,
            done: 50,
        };
        assert_eq!(half.progress(), 0.25);
        assert_eq!(half.remaining(), Some(150.0));
        let found_none = Scan {
            scanned: 0.25,
            eligible: 0,
            done: 0,
        };
        assert_eq!(found_none.progress(), 0.25);
        assert_eq!(found_none.remaining(), None);
        let not_started = Scan {
            scanned: 0.0,
            eligible: 0,
            done: 0,
        };
        assert_eq!(not_started.remaining(), None);
        let all = Scan {
            scanned: 1.0,
            eligible: 7,
            done: 7,
        };
        assert_eq!((all.progress(), all.remaining()), (1.0, Some(0.0)));
    }

    #[test]
    fn rates_span_the_samples_kept_and_deliveries_are_per_interval() {
        let live = Live::new(Arc::new(Metrics::new()));
        let t0 = Instant::now();
        {
            let mut inner = live.lock();
            inner.ended.insert(
                "a".into(),
                CampaignCounts {
                    delivered: 10,
                    ..CampaignCounts::default()
                },
            );
        }
        live.sample(t0);
        live.metrics.count.delivered.store(30, Relaxed);
        {
            let mut inner = live.lock();
            let a = inner.ended.get_mut("a").unwrap();
            a.delivered = 30;
            a.held_out = 10;
            inner.ended.insert(
                "b".into(),
                CampaignCounts {
                    capped: 4,
                    ..CampaignCounts::default()
                },
            );
        }
        live.sample(t0 + Duration::from_secs(2));
        let views = live.views();
        assert_eq!(views["a"].rate_per_s, Some(15.0));
        assert_eq!(views["b"].rate_per_s, Some(2.0));
        assert_eq!(views["a"].progress, None, "no fan-out scan seen");
        assert_eq!(live.deliveries_per_s(), vec![15.0]);
        for i in 0..(DELIVERY_SAMPLES as u64 + 50) {
            live.sample(t0 + Duration::from_secs(3 + i));
        }
        assert_eq!(live.deliveries_per_s().len(), DELIVERY_SAMPLES);
        assert_eq!(live.lock().settled.len(), RATE_SAMPLES);
    }

    #[test]
    fn only_active_campaigns_are_exposed_with_every_counter() {
        let live = Live::new(Arc::new(Metrics::new()));
        let t0 = Instant::now();
        let later = t0 + SERIES_LINGER + Duration::from_secs(1);
        {
            let mut inner = live.lock();
            let c = CampaignCounts {
                eligible: 5,
                delivered: 3,
                unreachable: 1,
                ..CampaignCounts::default()
            };
            inner.ended.insert("spring".into(), c);
            inner.ended.insert("old".into(), c);
            inner.seen.insert("spring".into(), later);
            inner.seen.insert("old".into(), t0);
        }
        let mut out = String::new();
        live.expose_at(&mut out, later);
        assert!(out.contains("fanout_campaign_delivered_total{campaign=\"spring\"} 3\n"));
        assert!(out.contains("fanout_campaign_cancelled_total{campaign=\"spring\"} 0\n"));
        assert!(out.contains("fanout_campaign_in_flight{campaign=\"spring\"} 1\n"));
        assert!(!out.contains("campaign=\"old\""), "{out}");
        assert_eq!(
            out.matches("# TYPE fanout_campaign_delivered_total")
                .count(),
            1
        );
    }
}
