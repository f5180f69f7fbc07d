//! What each timely worker does in one generation of `serve`: worker 0 feeds the generation's
//! bucket scans and, as they arrive, login batches from the stream, one epoch each; every
//! epoch that completes is made durable and its stream entries acknowledged.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use differential_dataflow::input::InputSession;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::InputHandle;
use timely::worker::Worker;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::Receiver;

use crate::dataflow::{self, Context, Handles, Scan, Time};
use crate::sources::logins::Login;

/// Epochs that may be open (fed, not yet delivered) at once.
const OPEN_EPOCHS: Time = 3;
/// How long worker 0 idles between looks at the login channel and the stop flags.
const IDLE: Duration = Duration::from_millis(10);
/// A parked worker wakes at least this often.
const PARK: Duration = Duration::from_millis(50);

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
    /// schedule tick, or shutdown.
    pub should_end: Box<dyn Fn() -> bool + Send + Sync>,
    /// True on shutdown: stop feeding at once, even scans.
    pub shutting_down: Box<dyn Fn() -> bool + Send + Sync>,
    /// Called with the entry ids of every completed epoch (possibly none): make the store
    /// durable, then acknowledge them.
    pub on_durable: Box<dyn Fn(Vec<String>) + Send + Sync>,
}

/// What worker 0 reports when the generation ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fed {
    /// Every scan epoch was fed and delivered (the fan-out targets are done).
    pub scans_complete: bool,
}

/// Runs one worker of a generation until it ends and drains (or a fatal error anywhere).
pub fn drive(worker: &mut Worker, ctx: Arc<Context>, generation: Arc<Generation>) -> Fed {
    let Handles {
        mut scans,
        mut admits,
        mut granted,
        mut logins,
        probe,
    } = worker.dataflow(|scope| dataflow::fan_out(scope, ctx.clone()));
    let mut fed = Fed::default();
    let mut acks: VecDeque<(Time, Vec<String>)> = VecDeque::new();
    // Acknowledges, oldest first, every epoch the probe has passed.
    let release = |acks: &mut VecDeque<(Time, Vec<String>)>, all: bool| {
        let mut ids = Vec::new();
        let mut any = false;
        while let Some((t, _)) = acks.front() {
            if !all && probe.less_than(&(t + 1)) {
                break;
            }
            if let Some((_, batch)) = acks.pop_front() {
                ids.extend(batch);
                any = true;
            }
        }
        if any {
            (generation.on_durable)(ids);
        }
    };

    if worker.index() == 0 {
        for &t in &generation.admit {
            admits.send(t);
        }
        for &pair in &generation.granted {
            granted.insert(pair);
        }
        // Inputs always stand at the epoch to be fed next, so every fed epoch can complete
        // without waiting for the next batch to arrive.
        let mut epoch: Time = 1;
        advance(&mut scans, &mut admits, &mut granted, &mut logins, epoch);
        let mut buckets = generation.epochs.iter().peekable();
        loop {
            if (generation.shutting_down)() || ctx.failed() {
                break;
            }
            let next_scan = buckets.next();
            // Checked before taking a batch, so a steady flow of logins cannot keep a
            // generation from ending, and no batch is taken that would not be fed.
            if next_scan.is_none() && (generation.should_end)() {
                break;
            }
            let batch = match generation.logins.lock() {
                Ok(mut rx) => match rx.try_recv() {
                    Ok(b) => Some(b),
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => None,
                },
                Err(_) => None,
            };
            if next_scan.is_none() && batch.is_none() {
                worker.step_or_park(Some(IDLE));
                release(&mut acks, false);
                continue;
            }
            for &bucket in next_scan.into_iter().flatten() {
                scans.send(Scan {
                    bucket,
                    targets: generation.scan_targets.clone(),
                });
            }
            // Every epoch is acknowledged when it completes, login ids or not: that is also
            // when the store is made durable.
            let mut ids = Vec::new();
            if let Some(b) = batch {
                for login in b.logins {
                    logins.send(login);
                }
                ids = b.ids;
            }
            acks.push_back((epoch, ids));
            epoch += 1;
            advance(&mut scans, &mut admits, &mut granted, &mut logins, epoch);
            while probe.less_than(&epoch.saturating_sub(OPEN_EPOCHS)) && !ctx.failed() {
                worker.step_or_park(Some(PARK));
            }
            release(&mut acks, false);
        }
        fed.scans_complete = buckets.peek().is_none();
    }
    drop((scans, admits, granted, logins));
    while !probe.done() && !ctx.failed() {
        worker.step_or_park(Some(PARK));
    }
    if ctx.failed() {
        for dataflow in worker.installed_dataflows() {
            worker.drop_dataflow(dataflow);
        }
        fed.scans_complete = false;
    } else {
        release(&mut acks, true);
    }
    fed
}

/// Moves every input of the dataflow to `epoch`.
fn advance(
    scans: &mut InputHandle<Time, CapacityContainerBuilder<Vec<Scan>>>,
    admits: &mut InputHandle<Time, CapacityContainerBuilder<Vec<u32>>>,
    granted: &mut InputSession<Time, (u32, u32), isize>,
    logins: &mut InputHandle<Time, CapacityContainerBuilder<Vec<Login>>>,
    epoch: Time,
) {
    scans.advance_to(epoch);
    admits.advance_to(epoch);
    granted.advance_to(epoch);
    granted.flush();
    logins.advance_to(epoch);
}
