//! `fanout run` and `fanout plan`: wire a job to the dataflow and drive it.
//!
//! Everything that can fail on bad input (job, users, granted pairs, provider URL) is checked
//! before the store is opened or anything is pushed, so bad input never half-applies.

pub mod cluster;
pub mod driver;
pub mod plan;
pub mod targets;

use std::sync::{Arc, Mutex};

use anyhow::Context as _;

use crate::dataflow::{self, Context, RunTarget};
use crate::error::{Error, Result};
use crate::job::{content_hash, Job};
use crate::metrics::{CampaignStats, CampaignSummary, Metrics, Progress, Summary};
use crate::model::Buckets;
use crate::providers::{dispatch::Dispatcher, Provider, ProviderSpec};
use crate::render::Renderer;
use crate::sources::logins::Login;
use crate::sources::{LoadOptions, LoadReport, UserSource};
use crate::store::Store;
use driver::Feed;
use targets::Admission;

/// How a run behaves, beyond the job file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// No progress bar, no report.
    pub quiet: bool,
    /// Count and skip bad input lines instead of stopping.
    pub skip_bad_lines: bool,
    /// Make each target's dead-lettered users claimable again before fanning out.
    pub retry_dead_letters: bool,
    /// Which process of which cluster this is (default: a single process).
    pub cluster: cluster::Cluster,
}

/// Users per epoch, at least; larger when many pushes may be in flight.
const MIN_USERS_PER_EPOCH: u64 = 1 << 18;
/// Provider batches per push task: one claim and one ledger write serve them all.
const TASK_BATCHES: usize = 32;
/// Users per push task, at most.
const MAX_TASK_USERS: usize = 4096;
/// Push tasks a worker may have handed out beyond `concurrency` messages: enough that the
/// tokio threads never wait for a worker to wake up and spawn more (measured: 2 → 16 tasks
/// took 10M users from 0.80 s to 0.62 s).
const TASKS_AHEAD: usize = 16;

/// The inputs of a run, loaded and checked.
pub struct Loaded {
    /// The users.
    pub source: UserSource,
    /// What loading them found.
    pub report: LoadReport,
    /// Each campaign's admission, in job order.
    pub admissions: Vec<Admission>,
    /// Pre-existing grants by campaign id.
    pub granted: Vec<(String, u32)>,
    /// Login events, in input order.
    pub logins: Vec<Login>,
}

/// Loads and checks every input of `job`.
pub fn load(job: &Job, opts: &RunOptions) -> Result<Loaded> {
    let load_opts = LoadOptions {
        skip_bad_lines: opts.skip_bad_lines,
        bucket_size: job.engine.bucket_size,
        keep: opts.cluster.route(Buckets::new(job.engine.bucket_size)),
    };
    let (source, report) = UserSource::open(&job.inputs.users, &load_opts)?;
    if !opts.quiet {
        for e in &report.first_errors {
            eprintln!("fanout: skipped {e}");
        }
        if report.skipped > report.first_errors.len() as u64 {
            eprintln!(
                "fanout: … and {} more bad lines skipped",
                report.skipped - report.first_errors.len() as u64
            );
        }
    }
    let granted = match &job.inputs.granted {
        Some(path) => crate::sources::granted::load(path, opts.skip_bad_lines)?,
        None => Vec::new(),
    };
    let (logins, skipped_logins) = match &job.inputs.logins {
        // A stream is read once the runtime runs (crate::streams).
        Some(url) if is_redis(url) => (Vec::new(), 0),
        Some(path) => crate::sources::logins::load(path, opts.skip_bad_lines)?,
        None => (Vec::new(), 0),
    };
    if skipped_logins > 0 && !opts.quiet {
        eprintln!("fanout: {skipped_logins} bad login lines skipped");
    }
    let admissions = job
        .campaigns
        .iter()
        .map(|c| targets::admit(c, job.engine.now))
        .collect();
    Ok(Loaded {
        source,
        report,
        admissions,
        granted,
        logins,
    })
}

/// Runs `job` to completion and returns its summary.
pub fn run(job: &Job, opts: &RunOptions) -> Result<Summary> {
    let provider = ProviderSpec::parse(&job.provider.url)?;
    // A store split by another process count is refused before anything is read.
    let store_url = opts.cluster.store_url(&job.store)?;
    let loaded = load(job, opts)?;
    let runtime = push_runtime()?;
    // Before the store, so a missing credential or a bad timeout (usage errors, exit 2) leaves
    // the store untouched.
    let provider = provider.open()?;
    let member = opts.cluster.member(Buckets::new(job.engine.bucket_size));
    let store = runtime.block_on(Store::connect_as(&store_url, member))?;
    let outcome = fan_out(job, opts, loaded, provider, &store, &runtime);
    release_on_failure(&store, &runtime, outcome)
}

/// Passes `outcome` on; when it is a failure, first hands back the store lease, so that an
/// immediate re-run (or restart of `serve`) takes over what this process had in flight at
/// once instead of waiting for the lease to lapse.
pub(crate) fn release_on_failure<T>(
    store: &Store,
    runtime: &tokio::runtime::Runtime,
    outcome: Result<T>,
) -> Result<T> {
    if outcome.is_err() {
        if let Err(e) = runtime.block_on(store.abandon()) {
            tracing::warn!(error = %e, "cannot release the store lease");
        }
    }
    outcome
}

/// [`run`] once its inputs are loaded and its provider and store opened.
fn fan_out(
    job: &Job,
    opts: &RunOptions,
    mut loaded: Loaded,
    provider: Provider,
    store: &Store,
    runtime: &tokio::runtime::Runtime,
) -> Result<Summary> {
    // Logins on a Redis stream: every entry there now, acknowledged once the run is durable.
    let login_stream = match &job.inputs.logins {
        // In a cluster, process 0 feeds the logins: it alone reads (and acknowledges) them.
        Some(url) if is_redis(url) && opts.cluster.process == 0 => {
            let (reader, logins, ids, skipped) = runtime.block_on(
                crate::streams::read_all_logins(url, "fanout-run", opts.skip_bad_lines),
            )?;
            if skipped > 0 && !opts.quiet {
                eprintln!("fanout: {skipped} bad login entries skipped");
            }
            loaded.logins = logins;
            Some((reader, ids))
        }
        _ => None,
    };

    let metrics = Arc::new(Metrics::new());
    let mut run_targets = Vec::new();
    let mut lines: Vec<Option<usize>> = Vec::new(); // summary line → run target index
    let mut skipped: Vec<Option<String>> = Vec::new();
    let mut scan_targets = Vec::new();
    for admission in loaded.admissions {
        let (target, at_login) = match admission {
            Admission::Run(target) => (target, false),
            Admission::AtLogin(target) => (target, true),
            Admission::Skip(why) => {
                lines.push(None);
                skipped.push(Some(why));
                continue;
            }
        };
        if !at_login {
            scan_targets.push(run_targets.len() as u32);
        }
        let ledger = runtime.block_on(store.ledger(&target.ledger_key()))?;
        lines.push(Some(run_targets.len()));
        skipped.push(None);
        run_targets.push(RunTarget {
            renderer: Renderer::new(&target),
            target,
            ledger,
            stats: CampaignStats::default(),
        });
    }
    // The repeated-campaign guard, before anything is pushed.
    let admissions: Vec<(String, String)> = run_targets
        .iter()
        .map(|rt| {
            (
                content_hash(&rt.target.campaign),
                rt.target.campaign.id.clone(),
            )
        })
        .collect();
    runtime.block_on(store.admit(&admissions))?;
    // What the processes of a cluster must agree on (checked before anything is sent).
    let fingerprint = cluster::fingerprint(
        job,
        run_targets.iter().enumerate().map(|(i, rt)| {
            format!(
                "{}|{}|{:?}|{}",
                rt.target.campaign.id,
                content_hash(&rt.target.campaign),
                rt.target.occurrence,
                scan_targets.contains(&(i as u32))
            )
        }),
    );
    if opts.retry_dead_letters {
        for rt in &run_targets {
            let revived = runtime.block_on(rt.ledger.revive_dead())?;
            let name = display_name(&rt.target.campaign.id, rt.target.occurrence.as_deref());
            tracing::info!(campaign = %name, revived, "dead letters made claimable again");
        }
    }
    let granted = granted_pairs(&loaded.granted, &run_targets);

    let buckets = Buckets::new(job.engine.bucket_size);
    let concurrency = job.provider.concurrency.max(1);
    let workers = job.engine.workers.max(1);
    // Per worker: each feeds its own buckets, so a process holds about this many users' work.
    let users_per_epoch = (MIN_USERS_PER_EPOCH.max(4 * concurrency as u64) / workers as u64)
        .max(MIN_USERS_PER_EPOCH / 4);
    let route = opts.cluster.route(buckets);
    let bucket_users: Vec<(u32, u64)> = if scan_targets.is_empty() {
        Vec::new()
    } else {
        loaded
            .source
            .buckets(buckets)
            .into_iter()
            .filter(|&b| route.is_none_or(|r| r.keeps_bucket(b)))
            .map(|b| {
                let (lo, hi) = buckets.bucket_range(b);
                (b, loaded.source.count_in(lo, hi))
            })
            .collect()
    };
    let lazy_targets = run_targets.len() - scan_targets.len();
    // This process's share (the progress bar is per process).
    let own_users: u64 = bucket_users.iter().map(|b| b.1).sum();
    let total_pairs = own_users * scan_targets.len() as u64
        + loaded.logins.len() as u64 * lazy_targets as u64 / opts.cluster.processes as u64;
    let feed = Arc::new(Feed {
        admit: (0..run_targets.len() as u32).collect(),
        buckets: bucket_users,
        users_per_epoch,
        scan_targets,
        granted,
        logins_per_epoch: job.engine.logins_per_epoch.max(1),
        logins: if lazy_targets == 0 {
            Vec::new()
        } else {
            loaded.logins
        },
    });

    let batch = job.engine.batch_max_messages.max(1);
    let task_users = (batch * TASK_BATCHES).min(MAX_TASK_USERS).max(batch);
    let fence = store.fence();
    let dispatcher = Arc::new(
        Dispatcher::new(
            provider,
            concurrency,
            job.provider.rate_per_s,
            job.provider.max_attempts,
            &job.provider.dead_letter,
            metrics.clone(),
        )
        .with_guard(Arc::new(move || fence.check())),
    );
    let ctx = Arc::new(Context {
        source: loaded.source,
        placement: opts.cluster.placement(buckets, workers),
        targets: run_targets,
        dispatcher,
        metrics: metrics.clone(),
        runtime: runtime.handle().clone(),
        batch_max_messages: job.engine.batch_max_messages.max(1),
        task_users,
        batch_max_bytes: job.engine.batch_max_bytes.max(1),
        max_in_flight: concurrency + TASKS_AHEAD * task_users,
        fatal: Mutex::new(None),
    });

    tracing::info!(
        users = ctx.source.len(),
        targets = ctx.targets.len(),
        buckets = feed.buckets.len(),
        process = opts.cluster.process,
        workers = job.engine.workers,
        "fan-out starting"
    );
    let progress = Progress::start(metrics.clone(), total_pairs, opts.quiet);
    let shared = Arc::new(cluster::Shared {
        fingerprint,
        tallies: Mutex::new(Vec::new()),
    });
    let result = execute(
        &opts.cluster,
        workers,
        ctx.clone(),
        feed,
        store.clone(),
        runtime.handle().clone(),
        shared.clone(),
    );
    progress.finish();
    result?;
    if let Ok(mut fatal) = ctx.fatal.lock() {
        if let Some(e) = fatal.take() {
            return Err(e);
        }
    }
    runtime.block_on(async {
        ctx.dispatcher.flush().await?;
        store.checkpoint().await?;
        match &login_stream {
            Some((reader, ids)) => reader.ack(ids).await,
            None => Ok(()),
        }
    })?;
    tracing::info!(
        elapsed_s = metrics.elapsed().as_secs_f64(),
        "fan-out drained, store checkpointed"
    );
    // Process 0 of a cluster reports for every process.
    for tally in shared
        .tallies
        .lock()
        .map(|mut g| std::mem::take(&mut *g))
        .unwrap_or_default()
    {
        metrics.absorb(&tally, ctx.targets.iter().map(|rt| &rt.stats));
    }

    let campaigns = job
        .campaigns
        .iter()
        .zip(lines.iter().zip(skipped))
        .map(|(c, (line, why))| match line {
            Some(i) => {
                let rt = &ctx.targets[*i];
                rt.stats.summary(&c.id, rt.target.occurrence.as_deref())
            }
            None => CampaignSummary {
                id: c.id.clone(),
                occurrence: None,
                skipped: why,
                eligible: 0,
                delivered: 0,
                already_granted: 0,
                dead_lettered: 0,
                unreachable: 0,
            },
        })
        .collect();
    Ok(metrics.summary(campaigns, loaded.report.skipped))
}

/// Runs the dataflow on `workers` threads of this process (one process of `cluster`). The
/// processes first check that they agree on `shared.fingerprint`; the tallies the other
/// processes send at the end land in `shared.tallies` (on process 0).
fn execute(
    cluster: &cluster::Cluster,
    workers: usize,
    ctx: Arc<Context>,
    feed: Arc<Feed>,
    store: Store,
    runtime: tokio::runtime::Handle,
    shared: Arc<cluster::Shared>,
) -> Result<()> {
    let config = cluster.config(workers);
    let (me, failure) = (cluster.clone(), cluster.clone());
    let failed = {
        let ctx = ctx.clone();
        move || ctx.failed()
    };
    cluster::launch(cluster, workers, failed, move |events| {
        let events = Mutex::new(events);
        let tell = move |e| {
            if let Ok(tx) = events.lock() {
                let _ = tx.send(e);
            }
        };
        let guards = timely::execute(config, move |worker| {
            tell(cluster::Event::Started);
            // One worker of each process makes that process's store durable.
            let syncs = worker.index() % workers == 0;
            let (store, ctx2, runtime) = (store.clone(), ctx.clone(), runtime.clone());
            let sync = move || {
                if !syncs {
                    return;
                }
                let (store, ctx3) = (store.clone(), ctx2.clone());
                runtime.spawn(async move {
                    if let Err(e) = store.sync().await {
                        ctx3.fail(e);
                    }
                });
            };
            if me.is_cluster() {
                let fp = shared.fingerprint;
                let all = dataflow::gather::everyone(worker, syncs.then_some((me.process, fp)));
                if let Some((other, _)) = all.iter().find(|(_, f)| *f != fp) {
                    ctx.fail(me.disagreement(*other));
                }
            }
            if !ctx.failed() {
                driver::drive(worker, ctx.clone(), feed.clone(), sync);
            }
            if me.is_cluster() && !ctx.failed() {
                let mine = (syncs && me.process != 0)
                    .then(|| ctx.metrics.tally(ctx.targets.iter().map(|rt| &rt.stats)));
                let got = dataflow::gather::gather(worker, mine);
                if let Ok(mut g) = shared.tallies.lock() {
                    g.extend(got);
                }
            }
            tell(cluster::Event::Finished);
            if me.is_cluster() && ctx.failed() {
                cluster::hold_connections();
            }
        })
        .map_err(|e| Error::runtime(format!("cannot start timely workers: {e}")))?;
        for result in guards.join() {
            result.map_err(|e| failure.worker_failure(&e))?;
        }
        Ok(())
    })
}

/// The tokio runtime pushes run on: two threads (the timely workers are the others).
pub fn push_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("fanout-push")
        .build()
        .context("cannot start the tokio runtime")?)
}

/// Pre-existing grants `(campaign id, user)` as `(target index, user)` pairs. SPEC: granted
/// pairs are for promotions and coupons; a hot product's every occurrence is its own delivery.
pub fn granted_pairs(granted: &[(String, u32)], targets: &[RunTarget]) -> Vec<(u32, u32)> {
    granted
        .iter()
        .flat_map(|(campaign, user)| {
            targets
                .iter()
                .enumerate()
                .filter(move |(_, rt)| {
                    rt.target.campaign.id == *campaign && rt.target.occurrence.is_none()
                })
                .map(move |(i, _)| (i as u32, *user))
        })
        .collect()
}

/// Whether an input names a Redis server rather than a file.
pub fn is_redis(input: &str) -> bool {
    input.starts_with("redis://") || input.starts_with("rediss://")
}

/// How a campaign occurrence is named for people: `id` or `id @ occurrence`.
pub fn display_name(id: &str, occurrence: Option<&str>) -> String {
    match occurrence {
        Some(o) => format!("{id} @ {o}"),
        None => id.to_owned(),
    }
}

/// The short report printed on stderr after a run.
pub fn report(summary: &Summary) -> String {
    let mut out = String::new();
    for c in &summary.campaigns {
        let name = display_name(&c.id, c.occurrence.as_deref());
        match &c.skipped {
            Some(why) => out.push_str(&format!("{name}: skipped, {why}\n")),
            None => out.push_str(&format!(
                "{name}: eligible {}, delivered {}, already granted {}, dead-lettered {}, unreachable {}\n",
                c.eligible, c.delivered, c.already_granted, c.dead_lettered, c.unreachable
            )),
        }
    }
    out.push_str(&format!(
        "{} users scanned in {} buckets, {} batches, {:.2} s, {:.0} deliveries/s, push latency p50 {:.1} ms p99 {:.1} ms\n",
        summary.users_scanned,
        summary.buckets,
        summary.batches,
        summary.elapsed_s,
        summary.deliveries_per_s,
        summary.push_latency_ms.p50,
        summary.push_latency_ms.p99
    ));
    if summary.skipped_lines > 0 {
        out.push_str(&format!(
            "{} bad input lines skipped\n",
            summary.skipped_lines
        ));
    }
    out
}
