//! `fanout serve`: a long-running process over the same dataflow as `fanout run`.
//!
//! It runs *generations*: each is one timely execution whose targets are the campaigns active
//! at its start: fan-outs due now (job campaigns, campaigns from the stream, the current
//! occurrence of each hot product) and every lazy coupon. Worker 0 feeds the fan-outs' bucket
//! scans, then login batches as the stream delivers them, one epoch each ([`worker`]). A
//! generation ends when something changes what is active: a campaign arrives on the stream, a
//! schedule ticks or a window opens, or SIGINT/SIGTERM asks the process to stop. It then drains
//! (every epoch it fed completes) and the next generation starts with the new set, so targets
//! stay fixed within an execution and the dataflow is the one `run` uses. A signal also stops
//! the dispatcher: nothing is claimed or sent after it, the pushes in flight finish and are
//! recorded, and the users not reached stay for the next start.
//!
//! Nothing is acknowledged to Redis before it is durable: a login entry when the epoch that
//! carried it completed and the store synced; a submitted fan-out campaign when its fan-out
//! completed; a lazy coupon or hot product once kept in its hash ([`submitted`]). After a crash
//! the entries still pending are read again ([`crate::streams`]) and the store's claim makes
//! the repeat harmless.

pub mod attempts;
pub mod campaigns;
mod generation;
pub mod health;
pub mod http;
pub mod live;
pub mod status;
pub mod submitted;
pub mod worker;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use crate::dataflow::halts::{Halt, OnPause, Watching};
use crate::dataflow::Context;
use crate::error::{Error, Result};
use crate::job::{content_hash, Job};
use crate::metrics::Metrics;
use crate::model::{Buckets, Campaign, Kind, Placement};
use crate::providers::dispatch::Dispatcher;
use crate::providers::{Provider, ProviderSpec};
use crate::run::prepare::{self, Engine, Sizing, Targets};
use crate::run::targets::{self, Admission};
use crate::run::{self, display_name, is_redis, RunOptions};
use crate::store::campaigns::State;
use crate::store::{Fence, Store};
use crate::streams::{login_of, StreamReader, LOGINS};
use campaigns::{Admitted, CampaignStream};
use health::Health;
use http::{Exposition, ServeCounters};
use submitted::Submitted;
use worker::{Generation, LoginBatch};

/// How `serve` behaves, beyond the job file.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where the status page, `/metrics` and `/healthz` are served.
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
    /// A transactional campaign arrived: cut the generation short to admit it at once
    /// (shared with the dispatcher and every generation's context as their cut).
    urgent: Arc<AtomicBool>,
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
    let runtime = prepare::push_runtime()?;
    let provider = provider.open()?;
    let store = runtime.block_on(Store::connect(&job.store))?;
    let outcome = Server::start(job, opts, loaded, provider, store.clone(), &runtime)
        .and_then(|(server, submissions)| server.run(submissions));
    run::release_on_failure(&store, &runtime, outcome)
}

/// Serves the status page, `/metrics` and `/healthz` on `opts.listen` (the engine's metrics,
/// the dispatcher's pushes in flight, `serve`'s own counters), and says where. Returns the
/// per-campaign counters the page shows, for the generations to keep.
fn expose(
    job: &Job,
    opts: &ServeOptions,
    store: &Store,
    runtime: &tokio::runtime::Runtime,
    metrics: &Arc<Metrics>,
    dispatcher: &Arc<Dispatcher>,
    counters: &Arc<ServeCounters>,
) -> Result<Arc<live::Live>> {
    let listener = runtime.block_on(http::bind(opts.listen))?;
    let live = Arc::new(live::Live::new(metrics.clone()));
    let health = runtime.block_on(Health::connect(&[
        ("store", Some(job.store.as_str())),
        ("logins", job.inputs.logins.as_deref()),
        ("campaigns", job.inputs.campaigns.as_deref()),
    ]))?;
    let status = status::StatusApi::open(store, &job.store, opts.listen, live.clone());
    let exposition = Arc::new(Exposition {
        metrics: metrics.clone(),
        dispatcher: dispatcher.clone(),
        counters: counters.clone(),
        health,
        live: live.clone(),
        status: runtime.block_on(status)?,
    });
    runtime.spawn(http::serve(listener, exposition));
    if !opts.run.quiet {
        eprintln!(
            "fanout: serving; status on http://{}/ (metrics on /metrics); SIGINT or SIGTERM stops (pushes in flight finish)",
            opts.listen
        );
    }
    Ok(live)
}

/// A fan-out of a generation: its ledger key, and its stream entry to acknowledge when done.
type Finishing = (String, Option<String>);

/// Fan-outs that held users for their quiet hours: ledger key → when the first of them
/// becomes sendable. Each runs again once that time has come.
type Waiting = std::collections::HashMap<String, DateTime<Utc>>;

/// What one `serve` process wires once and every generation uses.
struct Server<'a> {
    job: &'a Job,
    store: Store,
    runtime: &'a tokio::runtime::Runtime,
    engine: Engine,
    /// Pre-existing grants `(campaign id, user)` from the job's input.
    granted: Vec<(String, u32)>,
    flags: Arc<Flags>,
    counters: Arc<ServeCounters>,
    /// The campaign stream, its kept campaigns and its entries' attempts.
    campaigns: Option<CampaignStream>,
    /// The login stream, for acknowledging login entries once durable.
    login_acker: Option<Arc<StreamReader>>,
    /// Login batches; shared by the generations.
    logins: Arc<Mutex<mpsc::Receiver<LoginBatch>>>,
    /// No report on stderr.
    quiet: bool,
    /// Who this process is in the store's campaign activity records.
    worker: String,
    /// Per-campaign counters across generations, for the status page and `/metrics`.
    live: Arc<live::Live>,
}

impl<'a> Server<'a> {
    /// Opens the streams, starts their readers, `/metrics` and the signal handler.
    fn start(
        job: &'a Job,
        opts: &ServeOptions,
        loaded: run::Loaded,
        provider: Provider,
        store: Store,
        runtime: &'a tokio::runtime::Runtime,
    ) -> Result<(Server<'a>, mpsc::UnboundedReceiver<Submitted>)> {
        let metrics = Arc::new(Metrics::new());
        let counters = Arc::new(ServeCounters::default());
        let flags = Arc::new(Flags::default());
        let dispatcher =
            prepare::dispatcher(job, provider, metrics.clone(), &store, flags.urgent.clone());
        // A process that may have lost its lease reads no new entries (`crate::streams`).
        let fence = store.fence();
        let (login_acker, logins) = open_logins(
            job,
            opts,
            &loaded,
            runtime,
            &flags,
            &counters,
            fence.clone(),
        )?;
        let campaigns = match &job.inputs.campaigns {
            Some(url) => Some(runtime.block_on(CampaignStream::open(
                url,
                &opts.consumer,
                fence,
                &counters,
            ))?),
            None => None,
        };
        let (campaign_tx, campaign_rx) = mpsc::unbounded_channel::<Submitted>();
        if let Some(c) = &campaigns {
            runtime.spawn(campaigns::read(
                c.reader.clone(),
                campaign_tx,
                flags.clone(),
            ));
        }
        let live = expose(job, opts, &store, runtime, &metrics, &dispatcher, &counters)?;
        runtime.spawn(on_signals(flags.clone(), dispatcher.clone()));
        let sizing = Sizing::of(job);
        let engine = Engine {
            source: loaded.source,
            placement: Placement::new(Buckets::new(job.engine.bucket_size), 1, sizing.workers),
            dispatcher,
            metrics,
            runtime: runtime.handle().clone(),
            sizing,
            cut: flags.urgent.clone(),
        };
        let server = Server {
            job,
            store,
            runtime,
            engine,
            granted: loaded.granted,
            flags,
            counters,
            campaigns,
            login_acker,
            logins: Arc::new(Mutex::new(logins)),
            quiet: opts.run.quiet,
            worker: format!("serve {} pid {}", opts.consumer, std::process::id()),
            live,
        };
        Ok((server, campaign_rx))
    }

    /// Runs generations until shutdown, then stops in order: gives back the attempts at the
    /// campaign entries still pending, makes the provider's output and the store durable.
    fn run(&self, submissions: mpsc::UnboundedReceiver<Submitted>) -> Result<()> {
        let mut active = self.initial_campaigns()?;
        let served = self.generations(&mut active, submissions);
        self.give_back_attempts(&active);
        served?;
        self.runtime.block_on(async {
            self.engine.dispatcher.flush().await?;
            self.store.checkpoint().await
        })?;
        let m = &self.engine.metrics.count;
        if !self.quiet {
            eprintln!(
                "fanout: stopped: {} delivered, {} dead-lettered, {} unreachable",
                m.delivered.load(Relaxed),
                m.dead_lettered.load(Relaxed),
                m.unreachable.load(Relaxed)
            );
        }
        Ok(())
    }

    /// Runs generations until shutdown (or a fatal error).
    fn generations(
        &self,
        active: &mut Vec<Active>,
        mut submissions: mpsc::UnboundedReceiver<Submitted>,
    ) -> Result<()> {
        let mut ran: HashSet<String> = HashSet::new();
        let mut waiting = Waiting::new();
        while !self.flags.shutdown.load(Relaxed) {
            self.flags.replan.store(false, Relaxed);
            self.flags.urgent.store(false, Relaxed);
            while let Ok(s) = submissions.try_recv() {
                self.admit(s, active)?;
            }
            let (complete, finishing) = self.generation(active, &ran, &mut waiting)?;
            if complete {
                self.finish(finishing, active, &mut ran)?;
            }
        }
        Ok(())
    }

    /// Admits one submitted campaign ([`CampaignStream::admit`]) into `active`.
    fn admit(&self, s: Submitted, active: &mut Vec<Active>) -> Result<()> {
        let Some(stream) = &self.campaigns else {
            return Ok(());
        };
        let (campaign, entry) =
            match self
                .runtime
                .block_on(stream.admit(s, &self.store, &self.counters))?
            {
                Admitted::Refused => return Ok(()),
                Admitted::Kept(c) => (c, None),
                Admitted::FanOut(c, entry) => (c, Some(entry)),
            };
        match active.iter_mut().find(|a| a.campaign.id == campaign.id) {
            Some(a) => {
                a.campaign = campaign;
                a.entry = entry.or(a.entry.take());
            }
            None => active.push(Active { campaign, entry }),
        }
        Ok(())
    }

    /// At an orderly stop: the campaign entries still pending did not make this process die,
    /// so its attempts at them are given back (see [`attempts`]).
    fn give_back_attempts(&self, active: &[Active]) {
        let Some(stream) = &self.campaigns else {
            return;
        };
        let pending: Vec<String> = active.iter().filter_map(|a| a.entry.clone()).collect();
        if let Err(e) = self.runtime.block_on(stream.give_back(&pending)) {
            tracing::warn!(error = %e, "cannot give back the attempts at pending campaigns");
        }
    }

    /// The job's campaigns (admitted through the repeated-campaign guard), then those kept by
    /// earlier `serve`s.
    fn initial_campaigns(&self) -> Result<Vec<Active>> {
        let job = self.job;
        let admissions: Vec<(String, String)> = job
            .campaigns
            .iter()
            .map(|c| (content_hash(c), c.id.clone()))
            .collect();
        let campaigns: Vec<&Campaign> = job.campaigns.iter().map(|c| &**c).collect();
        self.runtime.block_on(async {
            self.store.admit(&admissions).await?;
            self.store.save_campaigns(&campaigns).await
        })?;
        self.counters
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
        if let Some(stream) = &self.campaigns {
            for (c, _) in self.runtime.block_on(stream.registry.load())? {
                if !active.iter().any(|a| a.campaign.id == c.id) {
                    active.push(Active {
                        campaign: c,
                        entry: None,
                    });
                }
            }
        }
        Ok(active)
    }

    /// After a generation whose fan-outs completed: they are not run again, and their stream
    /// entries are acknowledged once the store is durable.
    fn finish(
        &self,
        finishing: Vec<Finishing>,
        active: &mut [Active],
        ran: &mut HashSet<String>,
    ) -> Result<()> {
        let mut done_entries = Vec::new();
        for (key, entry) in finishing {
            ran.insert(key);
            done_entries.extend(entry);
        }
        let Some(stream) = &self.campaigns else {
            return Ok(());
        };
        if done_entries.is_empty() {
            return Ok(());
        }
        self.runtime.block_on(async {
            self.store.sync().await?;
            stream.ack(&done_entries).await
        })?;
        for a in active.iter_mut() {
            if a.entry.as_ref().is_some_and(|e| done_entries.contains(e)) {
                a.entry = None;
            }
        }
        Ok(())
    }
}

/// The login stream's reader task (or the login file as one batch): returns the stream's
/// acknowledger and the channel the batches arrive on.
fn open_logins(
    job: &Job,
    opts: &ServeOptions,
    loaded: &run::Loaded,
    runtime: &tokio::runtime::Runtime,
    flags: &Arc<Flags>,
    counters: &Arc<ServeCounters>,
    fence: Fence,
) -> Result<(Option<Arc<StreamReader>>, mpsc::Receiver<LoginBatch>)> {
    let (tx, rx) = mpsc::channel::<LoginBatch>(BATCHES_AHEAD);
    match &job.inputs.logins {
        Some(url) if is_redis(url) => {
            let reader = runtime
                .block_on(StreamReader::open(url, LOGINS, &opts.consumer))?
                .on_group_lost(count_group_lost(counters))
                .fenced_by(fence);
            let acker = runtime.block_on(StreamReader::open(url, LOGINS, &opts.consumer))?;
            runtime.spawn(read_logins(
                reader,
                tx,
                job.engine.logins_per_epoch.max(1),
                flags.clone(),
                counters.clone(),
            ));
            Ok((Some(Arc::new(acker)), rx))
        }
        // A file of logins is one batch, fed first.
        _ if !loaded.logins.is_empty() => {
            let batch = LoginBatch {
                logins: loaded.logins.clone(),
                ids: Vec::new(),
            };
            if tx.try_send(batch).is_err() {
                return Err(Error::runtime("cannot queue the login file"));
            }
            Ok((None, rx))
        }
        _ => Ok((None, rx)),
    }
}

/// Counts a stream's consumer group found gone and re-created.
fn count_group_lost(counters: &Arc<ServeCounters>) -> impl Fn() + Send + Sync + 'static {
    let counters = counters.clone();
    move || {
        counters.stream_groups_recreated.fetch_add(1, Relaxed);
    }
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

/// On SIGINT or SIGTERM: stops claiming and sending at once (what is in flight finishes and
/// is recorded; the rest stays for the next start), then sets the shutdown flag.
async fn on_signals(flags: Arc<Flags>, dispatcher: Arc<Dispatcher>) {
    let Some(mut signals) = crate::signals::StopSignals::listen() else {
        return;
    };
    signals.next().await;
    tracing::info!("signal received: stopping; pushes in flight finish");
    dispatcher.stop_sending();
    flags.shutdown.store(true, Relaxed);
}
