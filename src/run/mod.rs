//! `fanout run` and `fanout plan`: wire a job to the dataflow and drive it.
//!
//! Everything that can fail on bad input (job, users, granted pairs, provider URL) is checked
//! before the store is opened or anything is pushed, so bad input never half-applies.

pub mod cluster;
pub mod driver;
pub mod plan;
pub mod prepare;
pub mod targets;

use std::sync::{Arc, Mutex};

use crate::dataflow::halts::{OnPause, Watching};
use crate::dataflow::{Context, RunTarget};
use crate::error::Result;
use crate::job::{content_hash, Job};
use crate::metrics::{CampaignSummary, Metrics, Progress, Summary};
use crate::model::Buckets;
use crate::providers::dispatch::Dispatcher;
use crate::providers::{Provider, ProviderSpec};
use crate::sources::logins::Login;
use crate::sources::{LoadOptions, LoadReport, UserSource};
use crate::store::Store;
use driver::Feed;
use prepare::{Engine, Line, Sizing, Targets};
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
    let runtime = prepare::push_runtime()?;
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
    let login_stream = read_login_stream(job, opts, &mut loaded, runtime)?;
    let admissions = std::mem::take(&mut loaded.admissions);
    let sizing = Sizing::of(job);
    let buckets = Buckets::new(job.engine.bucket_size);
    let placement = opts.cluster.placement(buckets, sizing.workers);
    let targets = open_targets(job, opts, admissions, &placement, store, runtime)?;
    let fingerprint = cluster_fingerprint(job, &targets);
    if opts.retry_dead_letters {
        revive_dead_letters(&targets.run, runtime)?;
    }
    let (feed, total_pairs) = feed(opts, &mut loaded, &targets, &sizing, buckets);
    let metrics = Arc::new(Metrics::new());
    let engine = Engine {
        source: loaded.source,
        placement,
        dispatcher: prepare::dispatcher(job, provider, metrics.clone(), store, Default::default()),
        metrics: metrics.clone(),
        runtime: runtime.handle().clone(),
        sizing,
        cut: Default::default(),
    };
    let lines = targets.lines;
    let ctx = engine.context(targets.run, targets.caps, OnPause::Wait);
    tracing::info!(
        users = ctx.source.len(),
        targets = ctx.targets.len(),
        buckets = feed.buckets.len(),
        process = opts.cluster.process,
        workers = sizing.workers,
        "fan-out starting"
    );
    let watching = runtime.block_on(Watching::start(store, &ctx, Box::new(|| {})))?;
    let signals = runtime.spawn(on_interrupt(ctx.dispatcher.clone()));
    let syncing = runtime.spawn({
        let (store, ctx) = (store.clone(), ctx.clone());
        async move {
            if let Err(e) = store.sync_every().await {
                ctx.fail(e);
            }
        }
    });
    let progress = Progress::start(metrics.clone(), total_pairs, opts.quiet);
    let shared = Arc::new(cluster::Shared {
        fingerprint,
        tallies: Mutex::new(Vec::new()),
    });
    let result = cluster::execute(&opts.cluster, ctx.clone(), Arc::new(feed), shared.clone());
    progress.finish();
    signals.abort();
    syncing.abort();
    drop(watching);
    result?;
    ctx.take_failure()?;
    let interrupted = ctx.dispatcher.stopping();
    let worker = worker_label(&opts.cluster);
    runtime.block_on(settle(store, &ctx, &worker, login_stream, interrupted))?;
    tracing::info!(
        elapsed_s = metrics.elapsed().as_secs_f64(),
        "fan-out drained, store checkpointed"
    );
    absorb_tallies(&shared, &metrics, &ctx);
    let mut summary = summary(job, &lines, &ctx, &metrics, loaded.report.skipped);
    summary.interrupted = interrupted;
    Ok(summary)
}

/// Process 0 of a cluster reports for every process: the tallies the others sent it are
/// added to its own counters.
fn absorb_tallies(shared: &cluster::Shared, metrics: &Metrics, ctx: &Context) {
    let tallies = (shared.tallies.lock())
        .map(|mut g| std::mem::take(&mut *g))
        .unwrap_or_default();
    for tally in tallies {
        metrics.absorb(&tally, ctx.targets.iter().map(|rt| &rt.stats));
    }
}

/// Who pushed, as a campaign's activity records it.
fn worker_label(cluster: &cluster::Cluster) -> String {
    match cluster.is_cluster() {
        true => format!(
            "run pid {} (process {} of {})",
            std::process::id(),
            cluster.process,
            cluster.processes
        ),
        false => format!("run pid {}", std::process::id()),
    }
}

/// After the dataflow: the provider flushed, the campaigns' activity noted, the store
/// checkpointed, and the logins read from a stream acknowledged — unless the run was cut
/// short, when not every login was matched and they stay pending, read again next time.
async fn settle(
    store: &Store,
    ctx: &Context,
    worker: &str,
    login_stream: Option<(crate::streams::StreamReader, Vec<String>)>,
    interrupted: bool,
) -> Result<()> {
    ctx.dispatcher.flush().await?;
    prepare::note_activity(store, ctx, worker).await?;
    store.checkpoint().await?;
    match &login_stream {
        Some((reader, ids)) if !interrupted => reader.ack(ids).await,
        _ => Ok(()),
    }
}

/// The run's targets: the job's admissions and, outside a cluster, the releases and
/// expiries of users held for their quiet hours in earlier occurrences (in a cluster every
/// process must admit the same targets, and each sees only its own users), with their
/// ledgers open; admitted through the repeated-campaign guard before anything is pushed and
/// recorded, so `fanout report` knows each campaign's window without the job file.
fn open_targets(
    job: &Job,
    opts: &RunOptions,
    mut admissions: Vec<Admission>,
    placement: &crate::model::Placement,
    store: &Store,
    runtime: &tokio::runtime::Runtime,
) -> Result<Targets> {
    runtime.block_on(async {
        if !opts.cluster.is_cluster() {
            admissions.extend(
                prepare::held_admissions(
                    store,
                    &job.campaigns,
                    &job.policy,
                    job.engine.now,
                    opts.retry_dead_letters,
                )
                .await?,
            );
        }
        let targets =
            Targets::open(store, admissions, placement, &job.policy, job.engine.now).await?;
        store.admit(&targets.admissions()).await?;
        store.save_campaigns(&targets.campaigns()).await?;
        Ok(targets)
    })
}

/// Waits for SIGINT or SIGTERM, then stops the dispatcher: nothing more is claimed or handed
/// to the provider, the pushes in flight finish and are recorded, and the run drains. A
/// stopped dispatcher is what marks the run interrupted.
async fn on_interrupt(dispatcher: Arc<Dispatcher>) {
    let Some(mut signals) = crate::signals::StopSignals::listen() else {
        return;
    };
    signals.next().await;
    tracing::warn!("interrupted: stopping; pushes in flight finish, the rest is left for a re-run");
    dispatcher.stop_sending();
    // A second one does not wait for the drain: like a crash, the next run re-sends what was
    // in flight, with the same keys.
    signals.next().await;
    eprintln!("fanout: interrupted twice: exiting without draining; re-run to finish");
    std::process::exit(130);
}

/// Logins on a Redis stream: every entry there now, read into `loaded` and acknowledged once
/// the run is durable. In a cluster, process 0 alone reads (and acknowledges) them.
fn read_login_stream(
    job: &Job,
    opts: &RunOptions,
    loaded: &mut Loaded,
    runtime: &tokio::runtime::Runtime,
) -> Result<Option<(crate::streams::StreamReader, Vec<String>)>> {
    let Some(url) = job.inputs.logins.as_deref() else {
        return Ok(None);
    };
    if !is_redis(url) || opts.cluster.process != 0 {
        return Ok(None);
    }
    let (reader, logins, ids, skipped) = runtime.block_on(crate::streams::read_all_logins(
        url,
        "fanout-run",
        opts.skip_bad_lines,
    ))?;
    if skipped > 0 && !opts.quiet {
        eprintln!("fanout: {skipped} bad login entries skipped");
    }
    loaded.logins = logins;
    Ok(Some((reader, ids)))
}

/// What the processes of a cluster must agree on (checked before anything is sent).
fn cluster_fingerprint(job: &Job, targets: &Targets) -> u32 {
    cluster::fingerprint(
        job,
        targets.run.iter().enumerate().map(|(i, rt)| {
            format!(
                "{}|{}|{:?}|{}",
                rt.target.campaign.id,
                content_hash(&rt.target.campaign),
                rt.target.occurrence,
                targets.scan.contains(&(i as u32))
            )
        }),
    )
}

/// `--retry-dead-letters`: makes each target's dead-lettered users claimable again.
fn revive_dead_letters(targets: &[RunTarget], runtime: &tokio::runtime::Runtime) -> Result<()> {
    for rt in targets {
        let revived = runtime.block_on(rt.ledger.revive_dead())?;
        let name = display_name(&rt.target.campaign.id, rt.target.occurrence.as_deref());
        tracing::info!(campaign = %name, revived, "dead letters made claimable again");
    }
    Ok(())
}

/// What the workers feed, and how many (user, campaign) pairs that is for this process (the
/// progress bar is per process).
fn feed(
    opts: &RunOptions,
    loaded: &mut Loaded,
    targets: &Targets,
    sizing: &Sizing,
    buckets: Buckets,
) -> (Feed, u64) {
    let route = opts.cluster.route(buckets);
    let bucket_users: Vec<(u32, u64)> = if targets.scan.is_empty() {
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
    let own_users: u64 = bucket_users.iter().map(|b| b.1).sum();
    let total_pairs = own_users * targets.scan.len() as u64
        + loaded.logins.len() as u64 * targets.lazy() as u64 / opts.cluster.processes as u64;
    let logins = match targets.lazy() {
        0 => Vec::new(),
        _ => std::mem::take(&mut loaded.logins),
    };
    let feed = Feed {
        admit: (0..targets.run.len() as u32).collect(),
        buckets: bucket_users,
        users_per_epoch: sizing.users_per_worker_epoch(),
        scan_targets: targets.scan.clone(),
        granted: prepare::granted_pairs(&loaded.granted, &targets.run),
        logins_per_epoch: sizing.logins_per_epoch,
        logins,
    };
    (feed, total_pairs)
}

/// The run's summary: one line per job campaign, in job order.
fn summary(
    job: &Job,
    lines: &[Line],
    ctx: &Context,
    metrics: &Metrics,
    skipped_lines: u64,
) -> Summary {
    let line = |id: &str, line: &Line| match line {
        Line::Target(i) => {
            let rt = &ctx.targets[*i];
            rt.stats.summary(id, rt.target.occurrence.as_deref())
        }
        Line::Skipped(why) => CampaignSummary {
            id: id.to_owned(),
            occurrence: None,
            skipped: Some(why.clone()),
            counts: Default::default(),
        },
    };
    // One line per job campaign, in job order; then one per earlier occurrence or ended
    // window whose users held for their quiet hours this run released or dead-lettered.
    let mut campaigns: Vec<CampaignSummary> = job
        .campaigns
        .iter()
        .zip(lines)
        .map(|(c, l)| line(&c.id, l))
        .collect();
    for l in lines.iter().skip(job.campaigns.len()) {
        if let Line::Target(i) = l {
            campaigns.push(line(&ctx.targets[*i].target.campaign.id, l));
        }
    }
    metrics.summary(campaigns, skipped_lines)
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
            None => {
                let n = &c.counts;
                out.push_str(&format!(
                    "{name}: eligible {}, delivered {}, already granted {}, dead-lettered {}, unreachable {}",
                    n.eligible, n.delivered, n.already_granted, n.dead_lettered, n.unreachable
                ));
                // Policy outcomes, where policy bound.
                for (what, n) in [
                    ("held out", n.held_out),
                    ("capped", n.capped),
                    ("quiet-held", n.quiet_held),
                    ("cancelled", n.cancelled),
                ] {
                    if n > 0 {
                        out.push_str(&format!(", {what} {n}"));
                    }
                }
                out.push('\n');
            }
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
