//! What each timely worker does in one generation of `serve`: worker 0 feeds the generation's
//! bucket scans and, as they arrive, login batches from the stream, one epoch each; every
//! epoch that completes is made durable and its stream entries acknowledged.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use timely::dataflow::ProbeHandle;
use timely::worker::Worker;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::Receiver;

use crate::dataflow::{self, Context, Handles, Scan, Time};
use crate::run::driver::{drain, wait_for_open_epochs};
use crate::sources::logins::Login;

/// How long worker 0 idles between looks at the login channel and the stop flags.
const IDLE: Duration = Duration::from_millis(10);

/// Login events read from the stream, with the entry ids to acknowledge once they are done.
#[derive(Debug, Default)]
pub struct LoginBatch {
    /// The events, in stream order.
    pub logins: Vec<Login>,
    /// Every entry id the batch stands for (bad entries included: nothing to do for them).
    pub ids: Vec<String>,
}

/// The work of one generation, and how worker 0 learns that it should end.
pub struct Generation {
    /// Targets admitted at time 0.
    pub admit: Vec<u32>,
    /// Pre-existing grants `(target, user)`, fed at time 0.
    pub granted: Vec<(u32, u32)>,
    /// The fan-out targets every scanned bucket is tested against.
    pub scan_targets: Vec<u32>,
    /// Bucket ids per epoch.
    pub epochs: Vec<Vec<u32>>,
    /// Login batches; shared by the generations of one `serve`.
    pub logins: Arc<Mutex<Receiver<LoginBatch>>>,
    /// True once the generation should end (after its scans are fed): a new campaign, a
    /// schedule tick, or shutdown. A generation with scans also ends once they are done.
    pub should_end: Box<dyn Fn() -> bool + Send + Sync>,
    /// True on shutdown: stop feeding at once, even scans.
    pub shutting_down: Box<dyn Fn() -> bool + Send + Sync>,
    /// True once a transactional campaign waits: stop feeding (the context's cut then
    /// sheds the rest of the generation's fan-out work), so it starts in the next one.
    pub cut_short: Box<dyn Fn() -> bool + Send + Sync>,
    /// Called with the entry ids of every completed epoch (possibly none): make the store
    /// durable, then acknowledge them.
    pub on_durable: Box<dyn Fn(Vec<String>) + Send + Sync>,
    /// Why this process may no longer act, once its store lease was taken over
    /// ([`crate::store::Fence::lost`]): looked at while idle, where no store call would tell.
    pub lost: Box<dyn Fn() -> Option<crate::error::Error> + Send + Sync>,
}

/// What worker 0 reports when the generation ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fed {
    /// Every scan epoch was fed and delivered (the fan-out targets are done).
    pub scans_complete: bool,
}

/// Runs one worker of a generation until it ends and drains (or a fatal error anywhere).
pub fn drive(worker: &mut Worker, ctx: Arc<Context>, generation: Arc<Generation>) -> Fed {
    let mut inputs = worker.dataflow(|scope| dataflow::fan_out(scope, ctx.clone()));
    let mut acks = Acks {
        pending: VecDeque::new(),
        probe: inputs.probe.clone(),
        ctx: ctx.clone(),
        generation: generation.clone(),
    };
    let mut fed = Fed::default();
    if worker.index() == 0 {
        feed_time_zero(&mut inputs, &generation);
        fed.scans_complete = feed(worker, &mut inputs, &mut acks);
    }
    if drain(worker, inputs.close(), &ctx) {
        acks.release(true);
    }
    if ctx.failed() || ctx.dispatcher.stopping() || ctx.is_cut() {
        fed.scans_complete = false;
    }
    fed
}

/// The fed epochs whose stream entries wait for them to complete.
struct Acks {
    /// (epoch, entry ids), oldest first.
    pending: VecDeque<(Time, Vec<String>)>,
    probe: ProbeHandle<Time>,
    ctx: Arc<Context>,
    generation: Arc<Generation>,
}

impl Acks {
    /// Acknowledges, oldest first, every epoch the probe has passed (all of them once
    /// drained). Nothing once the dispatcher has stopped: an epoch that completes after that
    /// may have dropped work unclaimed, so its entries stay pending for the next run.
    fn release(&mut self, all: bool) {
        if self.ctx.dispatcher.stopping() {
            return;
        }
        let done = (self.pending.iter())
            .take_while(|(t, _)| all || !self.probe.less_than(&(t + 1)))
            .count();
        if done > 0 {
            let ids = self
                .pending
                .drain(..done)
                .flat_map(|(_, ids)| ids)
                .collect();
            (self.generation.on_durable)(ids);
        }
    }
}

/// Worker 0's loop: feeds the generation's scans and the login batches as they arrive, an
/// epoch each, until the generation should end; whether every scan was fed.
fn feed(worker: &mut Worker, inputs: &mut Handles, acks: &mut Acks) -> bool {
    let (ctx, generation) = (acks.ctx.clone(), acks.generation.clone());
    let probe = acks.probe.clone();
    // Inputs always stand at the epoch to be fed next, so every fed epoch can complete
    // without waiting for the next batch to arrive.
    let mut epoch: Time = 1;
    inputs.advance_to(epoch);
    let mut buckets = generation.epochs.iter().peekable();
    // The epoch the last scan was fed in: once the probe passes it the fan-outs are
    // done, and the generation ends so that their entries are acknowledged at once.
    let mut last_scan: Option<Time> = None;
    loop {
        if (generation.shutting_down)() || ctx.failed() || (generation.cut_short)() {
            break;
        }
        let next_scan = buckets.next();
        // Checked before taking a batch, so a steady flow of logins cannot keep a
        // generation from ending, and no batch is taken that would not be fed.
        let scans_done = last_scan.is_some_and(|e| !probe.less_than(&(e + 1)));
        if next_scan.is_none() && (scans_done || (generation.should_end)()) {
            break;
        }
        let batch = next_batch(&generation.logins);
        if next_scan.is_none() && batch.is_none() {
            if let Some(lost) = (generation.lost)() {
                // Taken over (say after a stall past the lease): stop, exit 1.
                ctx.fail(lost);
                break;
            }
            worker.step_or_park(Some(IDLE));
            acks.release(false);
            continue;
        }
        if next_scan.is_some() {
            last_scan = Some(epoch);
        }
        for &bucket in next_scan.into_iter().flatten() {
            inputs.scans.send(Scan {
                bucket,
                targets: ctx.targets_for(bucket, &generation.scan_targets),
            });
        }
        // Every epoch is acknowledged when it completes, login ids or not: that is also
        // when the store is made durable.
        let mut ids = Vec::new();
        if let Some(b) = batch {
            for login in b.logins {
                inputs.logins.send(login);
            }
            ids = b.ids;
        }
        acks.pending.push_back((epoch, ids));
        epoch += 1;
        inputs.advance_to(epoch);
        wait_for_open_epochs(worker, &probe, &ctx, epoch);
        acks.release(false);
    }
    buckets.peek().is_none()
}

/// Feeds the generation's admitted targets and pre-existing grants, at time 0.
fn feed_time_zero(inputs: &mut Handles, generation: &Generation) {
    for &t in &generation.admit {
        inputs.admits.send(t);
    }
    for &pair in &generation.granted {
        inputs.granted.send(pair);
    }
}

/// The next login batch the stream reader has ready, if any.
fn next_batch(logins: &Mutex<Receiver<LoginBatch>>) -> Option<LoginBatch> {
    match logins.lock() {
        Ok(mut rx) => match rx.try_recv() {
            Ok(b) => Some(b),
            Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => None,
        },
        Err(_) => None,
    }
}
