//! `fanout serve`: a long-running process over the same dataflow as `fanout run`.
//!
//! It runs *generations*: each is one timely execution whose targets are the campaigns active
//! at its start: fan-outs due now (job campaigns, campaigns from the stream, the current
//! occurrence of each hot product) and every lazy coupon. Worker 0 feeds the fan-outs' bucket
//! scans, then login batches as the stream delivers them, one epoch each ([`worker`]). A
//! generation ends when something changes what is active: a campaign arrives on the stream, a
//! schedule ticks or a window opens, or SIGINT/SIGTERM asks the process to stop. It then drains
//! (every epoch it fed completes) and the next generation starts with the new set, so targets
//! stay fixed within an execution and the dataflow is the one `run` uses.
//!
//! Nothing is acknowledged to Redis before it is durable: a login entry when the epoch that
//! carried it completed and the store synced; a submitted fan-out campaign when its fan-out
//! completed; a lazy coupon or hot product once kept in its hash ([`submitted`]). After a crash
//! the entries still pending are read again ([`crate::streams`]) and the store's claim makes
//! the repeat harmless.

pub mod http;
pub mod submitted;
pub mod worker;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use crate::dataflow::{Context, RunTarget};
use crate::error::{Error, Result};
use crate::job::{content_hash, Job};
use crate::metrics::{CampaignStats, Metrics};
use crate::model::{Buckets, Campaign, Kind, Placement};
use crate::providers::{dispatch::Dispatcher, Provider, ProviderSpec};
use crate::render::Renderer;
use crate::run::targets::{self, Admission};
use crate::run::{self, display_name, is_redis, RunOptions};
use crate::store::Store;
use crate::streams::{login_of, StreamReader, CAMPAIGNS, LOGINS};
use http::{Exposition, ServeCounters};
use submitted::{Registry, Submitted};
use worker::{Generation, LoginBatch};

/// How `serve` behaves, beyond the job file.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where `/metrics` and `/healthz` are served.
    pub listen: SocketAddr,
    /// This process's consumer name in the group `fanout`.
    pub consumer: String,
    /// Options shared with `run`.
    pub run: RunOptions,
}

/// Longest a generation runs before the active set is looked at again, even if nothing
/// announced a change (a cheap safety net; re-planning re-runs nothing already done).
const MAX_GENERATION: Duration = Duration::from_secs(60);
/// How long a stream read waits for new entries.
const READ_BLOCK: Duration = Duration::from_millis(200);
/// Login batches read ahead of the dataflow (backpressure on the stream reader).
const BATCHES_AHEAD: usize = 4;
/// Users per epoch of a fan-out, at least.
const MIN_USERS_PER_EPOCH: u64 = 1 << 18;
/// Users per push task, at most (as in `run`).
const MAX_TASK_USERS: usize = 4096;
/// Push tasks a worker may hand out beyond `concurrency` messages (as in `run`).
const TASKS_AHEAD: usize = 16;

/// A campaign `serve` knows of.
struct Active {
    campaign: Arc<Campaign>,
    /// The stream entry to acknowledge once its fan-out is done (submitted fan-outs only).
    entry: Option<String>,
}

/// Flags the generations, the readers and the signal handler share.
#[derive(Default)]
struct Flags {
    /// SIGINT or SIGTERM arrived: drain and exit.
    shutdown: AtomicBool,
    /// A campaign arrived: end the generation to admit it.
    replan: AtomicBool,
}

/// Runs `serve` until SIGINT or SIGTERM (then drains and returns `Ok`) or a fatal error.
pub fn serve(job: &Job, opts: &ServeOptions) -> Result<()> {
    let provider = ProviderSpec::parse(&job.provider.url)?;
    if let Some(url) = job.inputs.campaigns.as_deref().filter(|u| !is_redis(u)) {
        return Err(Error::Usage(format!(
            "inputs.campaigns = {url:?}: campaigns are submitted on a Redis stream: expected redis://host:port/db"
        )));
    }
    let loaded = run::load(job, &opts.run)?;
    let runtime = run::push_runtime()?;
    let provider = provider.open()?;
    let store = runtime.block_on(Store::connect(&job.store))?;
    let outcome = serve_on(job, opts, loaded, provider, store.clone(), &runtime);
    run::release_on_failure(&store, &runtime, outcome)
}

/// [`serve`] once its inputs are loaded and its provider and store opened.
fn serve_on(
    job: &Job,
    opts: &ServeOptions,
    loaded: run::Loaded,
    provider: Provider,
    store: Store,
    runtime: &tokio::runtime::Runtime,
) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let counters = Arc::new(ServeCounters::default());
    let fence = store.fence();
    let dispatcher = Arc::new(
        Dispatcher::new(
            provider,
            job.provider.concurrency.max(1),
            job.provider.rate_per_s,
            job.provider.max_attempts,
            &job.provider.dead_letter,
            metrics.clone(),
        )
        .with_guard(Arc::new(move || fence.check())),
    );
    let flags = Arc::new(Flags::default());

    // Streams and kept campaigns.
    let registry = match &job.inputs.campaigns {
        Some(url) => Some(runtime.block_on(Registry::open(url))?),
        None => None,
    };
    let campaign_reader = match &job.inputs.campaigns {
        Some(url) => Some(Arc::new(runtime.block_on(StreamReader::open(
            url,
            CAMPAIGNS,
            &opts.consumer,
        ))?)),
        None => None,
    };
    let (login_tx, login_rx) = mpsc::channel::<LoginBatch>(BATCHES_AHEAD);
    let mut login_acker = None;
    match &job.inputs.logins {
        Some(url) if is_redis(url) => {
            let reader = runtime.block_on(StreamReader::open(url, LOGINS, &opts.consumer))?;
            login_acker = Some(Arc::new(runtime.block_on(StreamReader::open(
                url,
                LOGINS,
                &opts.consumer,
            ))?));
            runtime.spawn(read_logins(
                reader,
                login_tx,
                job.engine.logins_per_epoch.max(1),
                flags.clone(),
                counters.clone(),
            ));
        }
        // A file of logins is one batch, fed first.
        _ if !loaded.logins.is_empty() => {
            let batch = LoginBatch {
                logins: loaded.logins.clone(),
                ids: Vec::new(),
            };
            if login_tx.try_send(batch).is_err() {
                return Err(Error::runtime("cannot queue the login file"));
            }
        }
        _ => {}
    }
    let (campaign_tx, mut campaign_rx) = mpsc::unbounded_channel::<Submitted>();
    if let Some(reader) = &campaign_reader {
        runtime.spawn(read_campaigns(reader.clone(), campaign_tx, flags.clone()));
    }

    // /metrics, /healthz and the signals.
    let listener = runtime.block_on(http::bind(opts.listen))?;
    let exposition = Arc::new(Exposition {
        metrics: metrics.clone(),
        dispatcher: dispatcher.clone(),
        counters: counters.clone(),
    });
    runtime.spawn(http::serve(listener, exposition));
    runtime.spawn(on_signals(flags.clone()));
    if !opts.run.quiet {
        eprintln!(
            "fanout: serving; metrics on http://{}/metrics; SIGINT or SIGTERM drains and stops",
            opts.listen
        );
    }

    // The job's campaigns, then those kept by earlier `serve`s.
    let admissions: Vec<(String, String)> = job
        .campaigns
        .iter()
        .map(|c| (content_hash(c), c.id.clone()))
        .collect();
    runtime.block_on(store.admit(&admissions))?;
    counters
        .campaigns_admitted
        .fetch_add(job.campaigns.len() as u64, Relaxed);
    let mut active: Vec<Active> = job
        .campaigns
        .iter()
        .map(|c| Active {
            campaign: c.clone(),
            entry: None,
        })
        .collect();
    if let Some(registry) = &registry {
        for (c, _) in runtime.block_on(registry.load())? {
            if !active.iter().any(|a| a.campaign.id == c.id) {
                active.push(Active {
                    campaign: c,
                    entry: None,
                });
            }
        }
    }

    let logins = Arc::new(Mutex::new(login_rx));
    let mut ran: HashSet<String> = HashSet::new();
    let buckets = Buckets::new(job.engine.bucket_size);
    let concurrency = job.provider.concurrency.max(1);
    let users_per_epoch = MIN_USERS_PER_EPOCH.max(4 * concurrency as u64);
    let batch = job.engine.batch_max_messages.max(1);
    let task_users = (batch * 32).min(MAX_TASK_USERS).max(batch);
    while !flags.shutdown.load(Relaxed) {
        flags.replan.store(false, Relaxed);
        while let Ok(s) = campaign_rx.try_recv() {
            admit_submitted(
                s,
                &mut active,
                &store,
                registry.as_ref(),
                campaign_reader.as_deref(),
                &counters,
                runtime,
            )?;
        }
        let now = Utc::now();
        let mut run_targets = Vec::new();
        let mut scan_targets = Vec::new();
        let mut finishing: Vec<(String, Option<String>)> = Vec::new(); // (ledger key, entry)
        for a in &active {
            let (target, at_login) = match targets::admit(&a.campaign, now) {
                Admission::Run(t) if !ran.contains(&t.ledger_key()) => (t, false),
                Admission::AtLogin(t) => (t, true),
                Admission::Run(_) | Admission::Skip(_) => continue,
            };
            if !at_login {
                scan_targets.push(run_targets.len() as u32);
                finishing.push((target.ledger_key(), a.entry.clone()));
            }
            let ledger = runtime.block_on(store.ledger(&target.ledger_key()))?;
            run_targets.push(RunTarget {
                renderer: Renderer::new(&target),
                target,
                ledger,
                stats: CampaignStats::default(),
            });
        }
        let deadline = next_change(&active, now);
        tracing::info!(
            fan_outs = scan_targets.len(),
            lazy = run_targets.len() - scan_targets.len(),
            next_change_in_s = (deadline - now).num_seconds(),
            "generation starting"
        );
        let epochs = if scan_targets.is_empty() {
            Vec::new()
        } else {
            let source = &loaded.source;
            run::driver::plan_epochs(
                source.buckets(buckets).into_iter().map(|b| {
                    let (lo, hi) = buckets.bucket_range(b);
                    (b, source.count_in(lo, hi))
                }),
                users_per_epoch,
            )
        };
        let ctx = Arc::new(Context {
            source: loaded.source.clone(),
            placement: Placement::new(buckets, 1, job.engine.workers),
            targets: run_targets,
            dispatcher: dispatcher.clone(),
            metrics: metrics.clone(),
            runtime: runtime.handle().clone(),
            batch_max_messages: batch,
            task_users,
            batch_max_bytes: job.engine.batch_max_bytes.max(1),
            max_in_flight: concurrency + TASKS_AHEAD * task_users,
            fatal: Mutex::new(None),
        });
        let granted = run::granted_pairs(&loaded.granted, &ctx.targets);
        let generation = Arc::new(Generation {
            admit: (0..ctx.targets.len() as u32).collect(),
            granted,
            scan_targets,
            epochs,
            logins: logins.clone(),
            should_end: {
                let flags = flags.clone();
                Box::new(move || {
                    flags.replan.load(Relaxed)
                        || flags.shutdown.load(Relaxed)
                        || Utc::now() >= deadline
                })
            },
            shutting_down: {
                let flags = flags.clone();
                Box::new(move || flags.shutdown.load(Relaxed))
            },
            on_durable: {
                let (store, acker, ctx, handle) = (
                    store.clone(),
                    login_acker.clone(),
                    ctx.clone(),
                    runtime.handle().clone(),
                );
                Box::new(move |ids: Vec<String>| {
                    let (store, acker, ctx) = (store.clone(), acker.clone(), ctx.clone());
                    handle.spawn(async move {
                        if let Err(e) = store.sync().await {
                            ctx.fail(e);
                            return;
                        }
                        if let (Some(acker), false) = (acker, ids.is_empty()) {
                            if let Err(e) = acker.ack(&ids).await {
                                // Left pending: read again after a restart, claimed as done.
                                tracing::warn!(error = %e, "cannot acknowledge logins");
                            }
                        }
                    });
                })
            },
        });
        counters.generations.fetch_add(1, Relaxed);
        let complete = execute(job.engine.workers, ctx.clone(), generation)?;
        if let Ok(mut fatal) = ctx.fatal.lock() {
            if let Some(e) = fatal.take() {
                return Err(e);
            }
        }
        for rt in &ctx.targets {
            let s = rt
                .stats
                .summary(&rt.target.campaign.id, rt.target.occurrence.as_deref());
            if s.eligible + s.already_granted > 0 {
                tracing::info!(
                    campaign = %display_name(&s.id, s.occurrence.as_deref()),
                    eligible = s.eligible,
                    delivered = s.delivered,
                    already_granted = s.already_granted,
                    "generation done"
                );
            }
        }
        if complete {
            let mut done_entries = Vec::new();
            for (key, entry) in finishing {
                ran.insert(key);
                done_entries.extend(entry);
            }
            if let (Some(reader), false) = (&campaign_reader, done_entries.is_empty()) {
                runtime.block_on(async {
                    store.sync().await?;
                    reader.ack(&done_entries).await
                })?;
                active.iter_mut().for_each(|a| {
                    if a.entry.as_ref().is_some_and(|e| done_entries.contains(e)) {
                        a.entry = None;
                    }
                });
            }
        }
    }
    runtime.block_on(async {
        dispatcher.flush().await?;
        store.checkpoint().await
    })?;
    if !opts.run.quiet {
        eprintln!(
            "fanout: drained and stopped: {} delivered, {} dead-lettered, {} unreachable",
            metrics.delivered.load(Relaxed),
            metrics.dead_lettered.load(Relaxed),
            metrics.unreachable.load(Relaxed)
        );
    }
    Ok(())
}

/// Runs one generation on `workers` threads; true if its fan-outs completed.
fn execute(workers: usize, ctx: Arc<Context>, generation: Arc<Generation>) -> Result<bool> {
    let communication = if workers <= 1 {
        timely::CommunicationConfig::Thread
    } else {
        timely::CommunicationConfig::Process(workers)
    };
    let config = timely::Config {
        communication,
        worker: timely::WorkerConfig::default(),
    };
    let guards = timely::execute(config, move |worker| {
        worker::drive(worker, ctx.clone(), generation.clone())
    })
    .map_err(|e| Error::runtime(format!("cannot start timely workers: {e}")))?;
    let mut complete = true;
    for (i, result) in guards.join().into_iter().enumerate() {
        let fed = result.map_err(|e| Error::runtime(format!("a worker failed: {e}")))?;
        if i == 0 {
            complete = fed.scans_complete;
        }
    }
    Ok(complete)
}

/// Admits one submitted campaign: the duplicate guard, then kept (lazy coupon, hot product:
/// acknowledged now) or queued for its fan-out (acknowledged when done). A bad or duplicate
/// submission is logged, counted and acknowledged: sending it again would not change it.
fn admit_submitted(
    s: Submitted,
    active: &mut Vec<Active>,
    store: &Store,
    registry: Option<&Registry>,
    reader: Option<&StreamReader>,
    counters: &ServeCounters,
    runtime: &tokio::runtime::Runtime,
) -> Result<()> {
    let ack = |entry: &str| -> Result<()> {
        match reader {
            Some(r) => runtime.block_on(r.ack(&[entry.to_owned()])),
            None => Ok(()),
        }
    };
    let campaign = match s.campaign {
        Ok(c) => c,
        Err(why) => {
            tracing::error!(error = %why, "submitted campaign refused");
            counters.campaigns_rejected.fetch_add(1, Relaxed);
            return ack(&s.entry);
        }
    };
    match runtime.block_on(store.admit(&[(content_hash(&campaign), campaign.id.clone())])) {
        Ok(()) => {}
        Err(e @ Error::Duplicate { .. }) => {
            tracing::error!(error = %e, entry = %s.entry, "submitted campaign refused");
            counters.campaigns_rejected.fetch_add(1, Relaxed);
            return ack(&s.entry);
        }
        Err(e) => return Err(e),
    }
    counters.campaigns_admitted.fetch_add(1, Relaxed);
    tracing::info!(campaign = %campaign.id, entry = %s.entry, "campaign admitted");
    let kept = match registry {
        Some(r) => runtime.block_on(r.keep(&campaign, &s.job))?,
        None => false,
    };
    if kept {
        ack(&s.entry)?;
    }
    let entry = (!kept).then_some(s.entry);
    match active.iter_mut().find(|a| a.campaign.id == campaign.id) {
        Some(a) => {
            a.campaign = campaign;
            a.entry = entry.or(a.entry.take());
        }
        None => active.push(Active { campaign, entry }),
    }
    Ok(())
}

/// When the active set next changes by itself: a window opens or a schedule ticks (at most
/// [`MAX_GENERATION`] from now).
fn next_change(active: &[Active], now: DateTime<Utc>) -> DateTime<Utc> {
    let cap = now + chrono::Duration::from_std(MAX_GENERATION).unwrap_or(chrono::Duration::zero());
    let mut next = cap;
    for a in active {
        let c = &a.campaign;
        if c.start > now {
            next = next.min(c.start);
        } else if c.kind == Kind::HotProduct && c.is_live_at(now) {
            if let Some(tick) = targets::next_tick(c, now) {
                next = next.min(tick);
            }
        }
    }
    next
}

/// Reads login entries (first those left pending by a crash) into batches for the dataflow,
/// until shutdown. A bad entry is logged, counted and acknowledged with its batch.
async fn read_logins(
    reader: StreamReader,
    tx: mpsc::Sender<LoginBatch>,
    per_batch: usize,
    flags: Arc<Flags>,
    counters: Arc<ServeCounters>,
) {
    let mut backlog = match reader.reclaim().await {
        Ok(entries) => entries,
        Err(e) => {
            tracing::error!(error = %e, "cannot reclaim pending logins");
            Vec::new()
        }
    };
    if !backlog.is_empty() {
        tracing::info!(entries = backlog.len(), "pending logins taken back");
    }
    backlog.reverse();
    while !flags.shutdown.load(Relaxed) {
        let entries = if backlog.is_empty() {
            match reader.read(per_batch, READ_BLOCK).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "reading logins failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        } else {
            let n = backlog.len().saturating_sub(per_batch);
            let mut page = backlog.split_off(n);
            page.reverse();
            page
        };
        if entries.is_empty() {
            continue;
        }
        let mut batch = LoginBatch::default();
        for entry in entries {
            match login_of(&entry) {
                Ok(login) => batch.logins.push(login),
                Err(why) => {
                    tracing::warn!(error = %why, "login entry skipped");
                    counters.logins_bad.fetch_add(1, Relaxed);
                }
            }
            batch.ids.push(entry.id);
        }
        if tx.send(batch).await.is_err() {
            break;
        }
    }
}

/// Reads submitted campaigns (first those left pending) and asks for a new generation.
async fn read_campaigns(
    reader: Arc<StreamReader>,
    tx: mpsc::UnboundedSender<Submitted>,
    flags: Arc<Flags>,
) {
    let mut first = match reader.reclaim().await {
        Ok(entries) => entries,
        Err(e) => {
            tracing::error!(error = %e, "cannot reclaim pending campaigns");
            Vec::new()
        }
    };
    while !flags.shutdown.load(Relaxed) {
        let entries = if first.is_empty() {
            match reader.read(100, READ_BLOCK).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "reading campaigns failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        } else {
            std::mem::take(&mut first)
        };
        for entry in &entries {
            if tx.send(submitted::submitted(entry)).is_err() {
                return;
            }
        }
        if !entries.is_empty() {
            flags.replan.store(true, Relaxed);
        }
    }
}

/// Sets the shutdown flag on SIGINT or SIGTERM.
async fn on_signals(flags: Arc<Flags>) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received: draining");
    flags.shutdown.store(true, Relaxed);
}
