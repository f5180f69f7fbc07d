//! `fanout plan`: what a run would do, without pushing anything.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;

use super::prepare::{granted_covers, Sizing};
use super::targets::Admission;
use super::{load, RunOptions};
use crate::audience::AudienceFilter;
use crate::dataflow::scan::stretch_of;
use crate::error::Result;
use crate::history::{History, Window};
use crate::job::Job;
use crate::model::{Buckets, Priority};
use crate::policy::{Holdout, QuietAt};
use crate::providers::ProviderSpec;
use crate::store::campaigns::State;
use crate::store::Store;

/// One campaign's line of the plan.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PlanLine {
    /// Campaign id.
    pub id: String,
    /// Occurrence, for scheduled campaigns.
    pub occurrence: Option<String>,
    /// Why it would send nothing.
    pub skipped: Option<String>,
    /// Its control state in the store (`running`, `paused` or `cancelled`): a run waits for a
    /// paused campaign to be resumed or cancelled, and settles a cancelled one's eligible
    /// users as `cancelled` without sending.
    pub state: State,
    /// A lazy coupon: `eligible` users get it at their next login inside its window.
    pub at_login: bool,
    /// Users in the audience.
    pub audience: u64,
    /// Of those, already granted (granted input or store).
    pub already_granted: u64,
    /// Of the campaign's grants in the store, dead-lettered ones: granted, never delivered
    /// (`run --retry-dead-letters` sends them again).
    pub dead_lettered: u64,
    /// Users a run would settle: push to, or hold out.
    pub eligible: u64,
    /// Of those, held out (the campaign's holdout or the control group): recorded, not sent.
    pub held_out: u64,
    /// Of those, inside their quiet hours now: held, sent by a later run.
    pub quiet_held: u64,
    /// When the first of them leaves their quiet hours (RFC 3339), if any is held.
    pub releases_at: Option<String>,
    /// Of those, kept from it by a frequency cap.
    pub capped: u64,
    /// Of those, settled `cancelled` (every one, when the campaign is cancelled).
    pub cancelled: u64,
    /// Provider batches that takes, at most: per candidate batch of the scan (a stretch of a
    /// bucket), as a run would cut them if it pushed each alone. A run merges the stretches a
    /// worker scanned in a row into push tasks (and claims the capped campaigns' users of a
    /// scan activation together), and packs them into fewer, fuller batches.
    pub batches: u64,
}

impl PlanLine {
    /// What a run does with a cancelled campaign: every eligible user settled `cancelled`
    /// before any policy decision, nothing sent (SPEC's order of decisions).
    fn cancel(&mut self) {
        self.cancelled = self.eligible;
        self.held_out = 0;
        self.quiet_held = 0;
        self.releases_at = None;
        self.capped = 0;
        self.batches = 0;
    }
}

/// The plan of a job.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Plan {
    /// Per campaign.
    pub campaigns: Vec<PlanLine>,
    /// Users in the source.
    pub users: u64,
    /// Buckets holding users.
    pub buckets: u64,
    /// Lazy coupons waiting for logins.
    pub active_lazy_coupons: u64,
    /// Estimated seconds for the run: the longer of the engine's own work and the pushes.
    pub eta_s: f64,
    /// The engine's share: the users scanned at the rate this plan scanned them, and every
    /// eligible pair at [`PAIR_COST`] scans' worth, over the workers.
    pub engine_s: f64,
    /// The provider's share: eligible ÷ min(concurrency ÷ latency, rate_per_s).
    pub push_s: f64,
    /// The provider latency assumed, in milliseconds.
    pub latency_ms: f64,
    /// Whether that latency is a guess (a remote provider's, not configured or measured).
    pub latency_guessed: bool,
}

/// What claiming, rendering and recording one eligible pair costs a run, in scans of one
/// user (generate and test): `bench/run`'s engine case spends about five times the bare
/// scan's CPU per user (README, Benchmarks), four of them on the pair.
pub const PAIR_COST: f64 = 4.0;

/// Computes the plan of `job`; opens the store read-only.
pub fn plan(job: &Job, opts: &RunOptions) -> Result<Plan> {
    let provider = ProviderSpec::parse(&job.provider.url)?;
    let loaded = load(job, opts)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| crate::error::Error::runtime(format!("cannot start tokio: {e}")))?;
    let store = runtime.block_on(Store::connect_read_only(&job.store))?;
    let states = runtime.block_on(store.states())?;
    let buckets = Buckets::new(job.engine.bucket_size);
    let sizing = Sizing::of(job);
    let source = &loaded.source;
    let mut lines = Vec::new();
    let mut sends = Vec::new();
    let mut scan_s: Option<f64> = None;
    for (campaign, admission) in job.campaigns.iter().zip(&loaded.admissions) {
        let (target, at_login) = match admission {
            Admission::Skip(why) => {
                lines.push(PlanLine {
                    id: campaign.id.clone(),
                    skipped: Some(why.clone()),
                    ..PlanLine::default()
                });
                continue;
            }
            Admission::Run(t) => (t, false),
            Admission::AtLogin(t) => (t, true),
            // Not among a job's own admissions (see `prepare::held_admissions`).
            Admission::Release(..) | Admission::Expire(..) => continue,
        };
        let scan = Scan {
            job,
            loaded: &loaded,
            store: &store,
            buckets,
            sizing: &sizing,
        };
        let (mut line, took, send) = runtime.block_on(scan.line(target, at_login))?;
        scan_s.get_or_insert(took);
        line.state = states.get(&campaign.id).copied().unwrap_or_default();
        if line.state == State::Cancelled {
            line.cancel();
            lines.push(line);
            continue;
        }
        if !at_login && campaign.priority != Priority::Transactional {
            sends.push((campaign.priority.lane(), lines.len(), send));
        }
        lines.push(line);
    }
    if !job.policy.frequency_caps.is_empty() {
        runtime.block_on(apply_caps(&store, job, &mut lines, sends))?;
    }
    let users = source.len();
    let (engine_s, push_s) = estimate(job, &provider, &lines, scan_s, users, sizing.workers);
    let latency = provider.typical_latency();
    let latency_guessed = matches!(provider, ProviderSpec::Http(_) | ProviderSpec::Fcm(_));
    let active_lazy_coupons = lines.iter().filter(|l| l.at_login).count() as u64;
    Ok(Plan {
        active_lazy_coupons,
        campaigns: lines,
        users,
        buckets: source.buckets(buckets).len() as u64,
        eta_s: millis(engine_s.max(push_s)),
        engine_s: millis(engine_s),
        push_s: millis(push_s),
        latency_ms: latency.as_secs_f64() * 1e3,
        latency_guessed,
    })
}

/// Seconds the engine's work and the pushes take: the users scanned at the rate the plan
/// scanned them plus every pair a run pushes at [`PAIR_COST`], over the workers; those pairs at
/// the provider's rate (concurrency ÷ latency, at most `rate_per_s`).
fn estimate(
    job: &Job,
    provider: &ProviderSpec,
    lines: &[PlanLine],
    scan_s: Option<f64>,
    users: u64,
    workers: usize,
) -> (f64, f64) {
    // What the run pushes: every fan-out's eligible users it neither holds out nor holds.
    let total: u64 = lines
        .iter()
        .filter(|l| !l.at_login)
        .map(|l| l.eligible - l.held_out - l.quiet_held - l.capped - l.cancelled)
        .sum();
    let latency = provider.typical_latency();
    let mut per_s =
        job.provider.concurrency as f64 / latency.max(Duration::from_micros(1)).as_secs_f64();
    if job.provider.rate_per_s > 0 {
        per_s = per_s.min(job.provider.rate_per_s as f64);
    }
    let per_user_s = scan_s.unwrap_or(0.0) / users.max(1) as f64;
    let engine_s = per_user_s * (users as f64 + PAIR_COST * total as f64) / workers.max(1) as f64;
    (engine_s, total as f64 / per_s)
}

/// What one campaign's line of the plan reads.
struct Scan<'a> {
    job: &'a Job,
    loaded: &'a super::Loaded,
    store: &'a Store,
    buckets: Buckets,
    sizing: &'a Sizing,
}

impl Scan<'_> {
    /// The line of `target` (`at_login`: a lazy coupon), the seconds its scan of the users
    /// took, and the users a run would claim for sending (before frequency caps).
    async fn line(
        &self,
        target: &crate::model::Target,
        at_login: bool,
    ) -> Result<(PlanLine, f64, Vec<u32>)> {
        let (job, source) = (self.job, &self.loaded.source);
        let campaign = &target.campaign;
        let ledger = self.store.ledger(&target.ledger_key()).await?;
        // The same pairs `run` drops (none for a hot product's occurrence).
        let pre: HashSet<u32> = (self.loaded.granted.iter())
            .filter(|(c, _)| granted_covers(c, target))
            .map(|(_, u)| *u)
            .collect();
        let filter = AudienceFilter::compile(&campaign.audience, source.tags());
        let mut members = Vec::new();
        let started = std::time::Instant::now();
        source.for_each_in(0, u64::MAX, |u| {
            if filter.matches(&u) {
                members.push(u.id);
            }
        });
        let took = started.elapsed().as_secs_f64();
        let audience = members.len() as u64;
        members.retain(|id| !pre.contains(id));
        let policy = Policy {
            holdout: Holdout::new(campaign, &job.policy),
            quiet: QuietAt::new(campaign, &job.policy, job.engine.now),
            source,
        };
        let cut =
            batches_as_run_cuts(&ledger, &members, &policy, self.buckets, self.sizing).await?;
        let releases_at = (policy.quiet.as_ref())
            .and_then(QuietAt::release)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        let line = PlanLine {
            id: campaign.id.clone(),
            occurrence: target.occurrence.as_deref().map(str::to_owned),
            skipped: None,
            at_login,
            audience,
            already_granted: audience - cut.eligible,
            dead_lettered: ledger.counts().await?.dead,
            eligible: cut.eligible,
            held_out: cut.held_out,
            quiet_held: cut.quiet_held,
            releases_at,
            capped: 0,
            cancelled: 0,
            state: State::Running,
            batches: if at_login { 0 } else { cut.batches },
        };
        Ok((line, took, cut.send))
    }
}

/// What a run would do with a campaign's members not yet settled.
struct Cut {
    /// Members not done in the ledger.
    eligible: u64,
    /// Of those, held out.
    held_out: u64,
    /// Of those, inside their quiet hours.
    quiet_held: u64,
    /// Provider batches for the rest.
    batches: u64,
    /// The rest: the users a run would claim for sending.
    send: Vec<u32>,
}

/// The policy a plan applies to one campaign, as `run` would.
struct Policy<'a> {
    holdout: Holdout,
    quiet: Option<QuietAt>,
    source: &'a crate::sources::UserSource,
}

/// Of `members` (ascending ids), those not done in `ledger`, those of them `policy` holds
/// out or holds for their quiet hours, and the provider batches a run cuts the rest into:
/// per candidate batch of the scan (a stretch of a bucket), the users it sends in batches of
/// `batch_max_messages`.
async fn batches_as_run_cuts(
    ledger: &crate::store::Ledger,
    members: &[u32],
    policy: &Policy<'_>,
    buckets: Buckets,
    sizing: &Sizing,
) -> Result<Cut> {
    let done = ledger.done_now();
    let mut cut = Cut {
        eligible: 0,
        held_out: 0,
        quiet_held: 0,
        batches: 0,
        send: Vec::new(),
    };
    for group in members.chunk_by(|a, b| stretch_of(&buckets, *a) == stretch_of(&buckets, *b)) {
        let open: Vec<u32> = match &done {
            Some(done) => group
                .iter()
                .copied()
                .filter(|&id| !done.contains(id))
                .collect(),
            None => {
                let mut open = Vec::with_capacity(group.len());
                for part in group.chunks(10_000) {
                    for (id, done) in part.iter().zip(ledger.are_done(part).await?) {
                        if !done {
                            open.push(*id);
                        }
                    }
                }
                open
            }
        };
        cut.eligible += open.len() as u64;
        let eligible = open.len();
        let mut send = open;
        let mut holdout = policy.holdout.scan();
        send.retain(|&id| !holdout.holds(id));
        cut.held_out += (eligible - send.len()) as u64;
        if let Some(quiet) = &policy.quiet {
            let held = quiet.split(&mut send, |&id| id, policy.source.zones());
            cut.quiet_held += held.len() as u64;
        }
        cut.batches += (send.len() as u64).div_ceil(sizing.batch_max_messages as u64);
        cut.send.extend(send);
    }
    Ok(cut)
}

/// Counts in each line the users a frequency cap would keep from it: `sends` are the capped
/// lines' users to claim `(lane, line, users)`; each user's offers are decided as `run`
/// decides them — by lane, then job order — against the user's history in the store and
/// the sends decided before, at the run's send time.
async fn apply_caps(
    store: &Store,
    job: &Job,
    lines: &mut [PlanLine],
    mut sends: Vec<(usize, usize, Vec<u32>)>,
) -> Result<()> {
    let caps = &job.policy.frequency_caps;
    let mut ids: Vec<u32> = sends
        .iter()
        .flat_map(|(_, _, u)| u.iter().copied())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let (mut table, stored) = store.histories(&ids).await?;
    let t = job.engine.now.timestamp();
    let slot = table
        .alloc(t, Window::horizon_s(caps))
        .map_err(crate::error::Error::runtime)?;
    let windows = Window::of(caps);
    let mut histories: HashMap<u32, History> = ids.into_iter().zip(stored).collect();
    sends.sort_by_key(|(lane, line, _)| (*lane, *line));
    for (_, line, users) in sends {
        for id in users {
            let h = histories.entry(id).or_default();
            if h.admits(&table, t, &windows) {
                *h = h.with_send(&table, slot);
            } else {
                lines[line].capped += 1;
            }
        }
    }
    Ok(())
}

/// `s` to the millisecond (a plan's JSON says 0.001, not 7.7e-07).
fn millis(s: f64) -> f64 {
    (s * 1e3).round() / 1e3
}

/// How long a number of seconds reads.
fn seconds(s: f64) -> String {
    match s {
        s if s < 0.1 => "under 0.1 s".to_owned(),
        s if s < 100.0 => format!("{s:.1} s"),
        s => format!("{s:.0} s"),
    }
}

/// The plan as a table for people.
pub fn render(plan: &Plan) -> String {
    let mut out = format!(
        "{:<32} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8}\n",
        "campaign",
        "audience",
        "granted",
        "dead",
        "eligible",
        "held out",
        "quiet",
        "capped",
        "batches"
    );
    for l in &plan.campaigns {
        let name = super::display_name(&l.id, l.occurrence.as_deref());
        match &l.skipped {
            Some(why) => out.push_str(&format!("{name:<32} skipped: {why}\n")),
            None => out.push_str(&format!(
                "{name:<32} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8}{}{}{}\n",
                l.audience,
                l.already_granted,
                l.dead_lettered,
                l.eligible,
                l.held_out,
                l.quiet_held,
                l.capped,
                l.batches,
                if l.at_login { "  (at next login)" } else { "" },
                match &l.releases_at {
                    Some(t) => format!("  (quiet hours end for the first at {t})"),
                    None => String::new(),
                },
                match l.state {
                    State::Paused =>
                        "  (paused: a run waits until it is resumed or cancelled)".to_owned(),
                    State::Cancelled => format!(
                        "  (cancelled: nothing sent, {} settled cancelled)",
                        l.cancelled
                    ),
                    _ => String::new(),
                }
            )),
        }
    }
    if plan.campaigns.iter().any(|l| l.dead_lettered > 0) {
        out.push_str("granted counts dead letters too (`dead`: never delivered; `fanout run --retry-dead-letters` sends them again)\n");
    }
    out.push_str(&format!(
        "{} users in {} buckets; {} lazy coupons active; estimated run time {}: the engine {}, \
         the pushes {} (at {:.0} ms a push{})\n",
        plan.users,
        plan.buckets,
        plan.active_lazy_coupons,
        seconds(plan.eta_s),
        seconds(plan.engine_s),
        seconds(plan.push_s),
        plan.latency_ms,
        if plan.latency_guessed {
            ", a guess for this provider: not measured"
        } else {
            ""
        },
    ));
    out
}
