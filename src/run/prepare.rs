//! What `run`, `serve` and `plan` share, written once: how big the engine's units of work
//! are ([`Sizing`]), which targets a pass admits with their ledgers ([`Targets`]), which
//! granted pairs apply to them, the dispatcher, the context the dataflow runs in, and the
//! tokio runtime the I/O runs on.

use std::sync::Arc;

use anyhow::Context as _;

use super::targets::Admission;
use crate::dataflow::halts::{Halts, OnPause};
use crate::dataflow::{CapsAt, Context, RunTarget};
use crate::error::Result;
use crate::history::Window;
use crate::job::{content_hash, Job};
use crate::metrics::{CampaignStats, Metrics};
use crate::model::{Campaign, Placement, Priority, Target};
use crate::policy::{Holdout, Policy, QuietAt};
use crate::providers::{dispatch::Dispatcher, Provider};
use crate::render::Renderer;
use crate::sources::UserSource;
use crate::store::Store;
use chrono::{DateTime, Utc};

/// Users per epoch of a process, at least; larger when many pushes may be in flight.
const MIN_USERS_PER_EPOCH: u64 = 1 << 18;
/// Provider batches per push task: one claim and one ledger write serve them all.
const TASK_BATCHES: usize = 32;
/// Users per push task, at most.
const MAX_TASK_USERS: usize = 4096;
/// Push tasks a worker may have handed out beyond `concurrency` messages: enough that the
/// tokio threads never wait for a worker to wake up and spawn more (measured: 2 → 16 tasks
/// took 10M users from 0.80 s to 0.62 s).
const TASKS_AHEAD: usize = 16;

/// How big the engine's units of work are, from the job: one place for every constant that
/// `run`, `serve` and `plan` would otherwise each keep a copy of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// Timely worker threads of this process.
    pub workers: usize,
    /// Provider calls in flight at most (the dispatcher's slots).
    pub concurrency: usize,
    /// Users a process feeds per epoch, about.
    pub users_per_epoch: u64,
    /// Login events per epoch.
    pub logins_per_epoch: usize,
    /// Messages per provider batch.
    pub batch_max_messages: usize,
    /// Serialized bytes per provider batch.
    pub batch_max_bytes: usize,
    /// Users per push task: claimed together, pushed as concurrent provider batches.
    pub task_users: usize,
    /// Messages a worker may have handed to push tasks and not yet seen acknowledged.
    pub max_in_flight: usize,
}

impl Sizing {
    /// The sizing of `job`.
    pub fn of(job: &Job) -> Sizing {
        let concurrency = job.provider.concurrency.max(1);
        let batch = job.engine.batch_max_messages.max(1);
        // Whole provider batches, so that a task cut off at its size cuts no batch short.
        let task_users = (batch * TASK_BATCHES)
            .min(MAX_TASK_USERS / batch * batch)
            .max(batch);
        Sizing {
            workers: job.engine.workers.max(1),
            concurrency,
            users_per_epoch: MIN_USERS_PER_EPOCH.max(4 * concurrency as u64),
            logins_per_epoch: job.engine.logins_per_epoch.max(1),
            batch_max_messages: batch,
            batch_max_bytes: job.engine.batch_max_bytes.max(1),
            task_users,
            max_in_flight: concurrency + TASKS_AHEAD * task_users,
        }
    }

    /// Users one worker feeds per epoch when every worker feeds its own buckets (`run`):
    /// the process's share split over its workers, but not so small that epochs are all
    /// overhead.
    pub fn users_per_worker_epoch(&self) -> u64 {
        (self.users_per_epoch / self.workers as u64).max(MIN_USERS_PER_EPOCH / 4)
    }
}

/// A job campaign's place in a pass: the index of its run target, or why it sends nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `Targets::run[i]`.
    Target(usize),
    /// Skipped, for this reason.
    Skipped(String),
}

/// The targets a pass runs, with their ledgers open.
pub struct Targets {
    /// Every admitted target; dataflow records carry indices into this.
    pub run: Vec<RunTarget>,
    /// Which of them fan out (the others are lazy coupons, granted at login).
    pub scan: Vec<u32>,
    /// One per admission, in order.
    pub lines: Vec<Line>,
    /// The frequency caps and the run's send time, where any target is capped.
    pub caps: Option<CapsAt>,
}

impl Targets {
    /// Opens the ledger of every admitted target, in order, sharded for `placement`'s workers;
    /// each target's holdout and quiet hours follow `policy`, its sends happening at `now`.
    pub async fn open(
        store: &Store,
        admissions: Vec<Admission>,
        placement: &Placement,
        policy: &Policy,
        now: DateTime<Utc>,
    ) -> Result<Targets> {
        store.shard_by(placement);
        let mut targets = Targets {
            run: Vec::new(),
            scan: Vec::new(),
            lines: Vec::new(),
            caps: None,
        };
        for admission in admissions {
            let (target, at_login, only, expire) = match admission {
                Admission::Run(target) => (target, false, None, false),
                Admission::AtLogin(target) => (target, true, None, false),
                Admission::Release(target, held) => (target, false, Some(held), false),
                Admission::Expire(target, held) => (target, false, Some(held), true),
                Admission::Skip(why) => {
                    targets.lines.push(Line::Skipped(why));
                    continue;
                }
            };
            if !at_login {
                targets.scan.push(targets.run.len() as u32);
            }
            let ledger = store.ledger(&target.ledger_key()).await?;
            targets.lines.push(Line::Target(targets.run.len()));
            let campaign = &target.campaign;
            let capped = !policy.frequency_caps.is_empty()
                && !at_login
                && !expire
                && campaign.priority != Priority::Transactional;
            targets.run.push(RunTarget {
                capped,
                order: 0,
                renderer: Renderer::new(&target),
                holdout: Holdout::new(&target.campaign, policy),
                quiet: QuietAt::new(&target.campaign, policy, now).filter(|_| !expire),
                only,
                expire,
                target,
                ledger,
                stats: CampaignStats::default(),
                sends: Default::default(),
            });
        }
        decision_order(&mut targets.run);
        if targets.run.iter().any(|rt| rt.capped) {
            let caps = &policy.frequency_caps;
            let at = store
                .send_slot(now.timestamp(), Window::horizon_s(caps))
                .await?;
            targets.caps = Some(CapsAt {
                at,
                windows: Window::of(caps),
            });
        }
        Ok(targets)
    }

    /// Lazy coupons among them.
    pub fn lazy(&self) -> usize {
        self.run.len() - self.scan.len()
    }

    /// The campaign of each, for the store's campaign records.
    pub fn campaigns(&self) -> Vec<&Campaign> {
        self.run.iter().map(|rt| &*rt.target.campaign).collect()
    }

    /// `(content hash, campaign id)` of each, for the repeated-campaign guard.
    pub fn admissions(&self) -> Vec<(String, String)> {
        self.run
            .iter()
            .map(|rt| {
                let c = &rt.target.campaign;
                (content_hash(c), c.id.clone())
            })
            .collect()
    }
}

/// Numbers `targets` in the order a user's offers are decided (SPEC "Frequency caps"):
/// priority, then the campaign's place in the job (its first target's), then the occurrence
/// (RFC 3339 ticks, so in time order) — a release of an earlier tick before the current one.
fn decision_order(targets: &mut [RunTarget]) {
    let mut first_seen: Vec<&str> = Vec::new();
    let mut keys = Vec::with_capacity(targets.len());
    for (i, rt) in targets.iter().enumerate() {
        let c = &rt.target.campaign;
        let rank = match first_seen.iter().position(|id| *id == c.id) {
            Some(rank) => rank,
            None => {
                first_seen.push(&c.id);
                first_seen.len() - 1
            }
        };
        keys.push((c.priority.lane(), rank, rt.target.occurrence.clone(), i));
    }
    keys.sort();
    for (order, (_, _, _, i)) in keys.into_iter().enumerate() {
        targets[i].order = order;
    }
}

/// What the users `campaigns` held for their quiet hours need at `now` beyond what their
/// admissions do: a [`Admission::Release`] for each earlier occurrence of a scheduled campaign
/// still in its window, an [`Admission::Expire`] for each ledger whose window ended. Only
/// ledgers with such users unsettled ([`Store::quiet_unsettled`]; dead-lettered ones too
/// when `revive_dead`); none without quiet hours in `policy`.
pub async fn held_admissions(
    store: &Store,
    campaigns: &[Arc<Campaign>],
    policy: &Policy,
    now: DateTime<Utc>,
    revive_dead: bool,
) -> Result<Vec<Admission>> {
    let mut out = Vec::new();
    if policy.quiet_hours.is_none() {
        return Ok(out);
    }
    for campaign in campaigns {
        for (occurrence, open) in super::targets::held_ledgers(campaign, now) {
            let target = Target::new(campaign.clone(), occurrence);
            let held = store
                .quiet_unsettled(&target.ledger_key(), revive_dead)
                .await?;
            if held.is_empty() {
                continue;
            }
            out.push(match open {
                true => Admission::Release(target, held),
                false => Admission::Expire(target, held),
            });
        }
    }
    Ok(out)
}

/// Whether a pre-existing grant of campaign `campaign` covers `target`. SPEC: granted pairs
/// are for promotions and coupons; a hot product's every occurrence is its own delivery.
pub fn granted_covers(campaign: &str, target: &Target) -> bool {
    target.campaign.id == campaign && target.occurrence.is_none()
}

/// Pre-existing grants `(campaign id, user)` as `(target index, user)` pairs.
pub fn granted_pairs(granted: &[(String, u32)], targets: &[RunTarget]) -> Vec<(u32, u32)> {
    granted
        .iter()
        .flat_map(|(campaign, user)| {
            targets
                .iter()
                .enumerate()
                .filter(move |(_, rt)| granted_covers(campaign, &rt.target))
                .map(move |(i, _)| (i as u32, *user))
        })
        .collect()
}

/// The dispatcher of `job`'s provider: its slots, rate and retries, fenced by `store`'s
/// lease (a run that may have lost it sends nothing more), yielding to `cut` (`serve`'s
/// generations cut short for a transactional campaign; `run` never sets it).
pub fn dispatcher(
    job: &Job,
    provider: Provider,
    metrics: Arc<Metrics>,
    store: &Store,
    cut: Arc<std::sync::atomic::AtomicBool>,
) -> Arc<Dispatcher> {
    let fence = store.fence();
    Arc::new(
        Dispatcher::new(
            provider,
            job.provider.concurrency.max(1),
            job.provider.rate_per_s,
            job.provider.max_attempts,
            &job.provider.dead_letter,
            metrics,
        )
        .with_guard(Arc::new(move || fence.check()))
        .with_cut(cut),
    )
}

/// What the dataflow's operators share in one pass.
pub struct Engine {
    /// Where users come from.
    pub source: UserSource,
    /// Which worker owns each bucket.
    pub placement: Placement,
    /// The provider and its policy.
    pub dispatcher: Arc<Dispatcher>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The runtime push tasks run on.
    pub runtime: tokio::runtime::Handle,
    /// Sizes.
    pub sizing: Sizing,
    /// The flag that cuts a `serve` generation short ([`Context::cut`]); never set by `run`.
    pub cut: Arc<std::sync::atomic::AtomicBool>,
}

impl Engine {
    /// The dataflow's context for `targets`, capped by `caps`, its paused targets' candidates
    /// handled as `on_pause` says.
    pub fn context(
        &self,
        targets: Vec<RunTarget>,
        caps: Option<CapsAt>,
        on_pause: OnPause,
    ) -> Arc<Context> {
        Arc::new(Context {
            halts: Halts::new(targets.len()),
            on_pause,
            source: self.source.clone(),
            placement: self.placement,
            targets,
            dispatcher: self.dispatcher.clone(),
            metrics: self.metrics.clone(),
            runtime: self.runtime.clone(),
            batch_max_messages: self.sizing.batch_max_messages,
            task_users: self.sizing.task_users,
            batch_max_bytes: self.sizing.batch_max_bytes,
            max_in_flight: self.sizing.max_in_flight,
            fatal: Default::default(),
            cut: self.cut.clone(),
            caps,
            buffers: Arc::default(),
        })
    }
}

/// Records in `store` what each campaign of `ctx` pushed, first and last, as `worker`'s
/// ([`Store::note_activity`]): at the end of a run or a `serve` generation.
pub async fn note_activity(store: &Store, ctx: &Context, worker: &str) -> Result<()> {
    let mut spans: Vec<(&str, i64, i64)> = Vec::new();
    for rt in &ctx.targets {
        let Some((first, last)) = rt.sends.get() else {
            continue;
        };
        let id = rt.target.campaign.id.as_str();
        match spans.iter_mut().find(|(c, _, _)| *c == id) {
            Some(span) => *span = (id, span.1.min(first), span.2.max(last)),
            None => spans.push((id, first, last)),
        }
    }
    for (id, first, last) in spans {
        store.note_activity(id, first, last, worker).await?;
    }
    Ok(())
}

/// The tokio runtime pushes run on, one thread per core of the machine (at least two): the
/// timely workers hand it their claims, renders and provider calls.
pub fn push_runtime() -> Result<tokio::runtime::Runtime> {
    let threads = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(2)
        .max(2);
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .thread_name("fanout-push")
        .build()
        .context("cannot start the tokio runtime")?)
}
