//! What each timely worker does: build the dataflow, feed it in epochs, step until drained.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use timely::worker::Worker;

use timely::dataflow::ProbeHandle;

use crate::dataflow::{self, Context, Handles, Scan, Time};
use crate::sources::logins::Login;

/// How many epochs may be open (fed but not yet delivered) at once.
pub const OPEN_EPOCHS: Time = 3;
/// A parked worker wakes at least this often to notice a fatal error elsewhere.
pub const PARK: Duration = Duration::from_millis(50);

/// The work of one run. Worker 0 (of the whole cluster) feeds the admits, the granted pairs
/// and the logins; every worker feeds the scans of the buckets it owns
/// ([`crate::model::Placement::worker_of`]), in epochs of its own.
pub struct Feed {
    /// Targets to admit at time 0 (fan-out campaigns and lazy coupons).
    pub admit: Vec<u32>,
    /// The fan-out targets every bucket is scanned for.
    pub scan_targets: Vec<u32>,
    /// Pre-existing grants `(target, user)`, fed at time 0.
    pub granted: Vec<(u32, u32)>,
    /// This process's buckets with their user counts, ascending (empty: nothing to scan).
    pub buckets: Vec<(u32, u64)>,
    /// Users a worker feeds per epoch, about.
    pub users_per_epoch: u64,
    /// Login events, fed `logins_per_epoch` an epoch from epoch 1 on, alongside the buckets.
    pub logins: Vec<Login>,
    /// Login events per epoch (≥ 1).
    pub logins_per_epoch: usize,
}

/// Cuts `buckets` (with their user counts) into epochs of about `users_per_epoch` users.
pub fn plan_epochs(
    buckets: impl IntoIterator<Item = (u32, u64)>,
    users_per_epoch: u64,
) -> Vec<Vec<u32>> {
    let mut epochs = Vec::new();
    let mut current = Vec::new();
    let mut users = 0;
    for (b, n) in buckets {
        if !current.is_empty() && users + n > users_per_epoch {
            epochs.push(std::mem::take(&mut current));
            users = 0;
        }
        users += n;
        current.push(b);
    }
    if !current.is_empty() {
        epochs.push(current);
    }
    epochs
}

/// Runs one worker of the fan-out to completion (or until a fatal error anywhere).
pub fn drive(worker: &mut Worker, ctx: Arc<Context>, feed: Arc<Feed>) {
    let mut inputs = Some(worker.dataflow(|scope| dataflow::fan_out(scope, ctx.clone())));
    let fed = panic::catch_unwind(AssertUnwindSafe(|| {
        feed_and_drain(worker, &mut inputs, &ctx, &feed)
    }));
    if let Err(why) = fed {
        // In a cluster a lost peer connection poisons timely's channels and panics the
        // worker. Closing the inputs pushes into those channels and panics again: done during
        // the unwinding, that second panic would abort the process instead of letting it exit
        // 1. So the inputs are closed here, once the first panic is caught, and the first
        // panic then goes on to the worker's join.
        let _ = panic::catch_unwind(AssertUnwindSafe(|| drop(inputs.take())));
        panic::resume_unwind(why);
    }
}

/// [`drive`]'s feeding loop, then the drain; the inputs are taken from `slot` to close them.
fn feed_and_drain(worker: &mut Worker, slot: &mut Option<Handles>, ctx: &Context, feed: &Feed) {
    let Some(inputs) = slot.as_mut() else {
        return;
    };
    let index = worker.index();
    let own = plan_epochs(
        feed.buckets
            .iter()
            .copied()
            .filter(|&(b, _)| ctx.placement.worker_of(b) == index),
        feed.users_per_epoch,
    );
    let logins_here: &[Login] = if index == 0 { &feed.logins } else { &[] };
    if index == 0 {
        for &t in &feed.admit {
            inputs.admits.send(t);
        }
        for &pair in &feed.granted {
            inputs.granted.send(pair);
        }
    }
    {
        let mut epoch: Time = 1;
        let mut login_epochs = logins_here.chunks(feed.logins_per_epoch.max(1));
        let epochs = own.len().max(login_epochs.len());
        for e in 0..epochs {
            inputs.advance_to(epoch);
            for &bucket in own.get(e).into_iter().flatten() {
                inputs.scans.send(Scan {
                    bucket,
                    targets: ctx.targets_for(bucket, &feed.scan_targets),
                });
            }
            for &login in login_epochs.next().into_iter().flatten() {
                inputs.logins.send(login);
            }
            epoch += 1;
            wait_for_open_epochs(worker, &inputs.probe, ctx, epoch);
            // A failure, or a signal: feed nothing more (what is fed drains).
            if ctx.failed() || ctx.dispatcher.stopping() {
                break;
            }
        }
    }
    if let Some(inputs) = slot.take() {
        drain(worker, inputs.close(), ctx);
    }
}

/// Steps `worker` while fewer than [`OPEN_EPOCHS`] epochs before `next` (the epoch to be fed
/// next) are done, or until a fatal error.
pub fn wait_for_open_epochs(
    worker: &mut Worker,
    probe: &ProbeHandle<Time>,
    ctx: &Context,
    next: Time,
) {
    while probe.less_than(&next.saturating_sub(OPEN_EPOCHS)) && !ctx.failed() {
        worker.step_or_park(Some(PARK));
    }
}

/// Steps `worker` until every epoch fed is done (the inputs are closed); returns false on a
/// fatal error instead, after dropping the dataflows: epochs held by unfinished pushes will
/// never complete, and timely steps a worker until its dataflows do (every worker sees the
/// failure).
pub fn drain(worker: &mut Worker, probe: ProbeHandle<Time>, ctx: &Context) -> bool {
    while !probe.done() && !ctx.failed() {
        worker.step_or_park(Some(PARK));
    }
    if !ctx.failed() {
        return true;
    }
    for dataflow in worker.installed_dataflows() {
        worker.drop_dataflow(dataflow);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_cover_every_bucket_once_in_order() {
        let buckets: Vec<(u32, u64)> = (0..100).map(|b| (b * 3, u64::from(b % 7) * 10)).collect();
        let epochs = plan_epochs(buckets.clone(), 100);
        let flat: Vec<u32> = epochs.iter().flatten().copied().collect();
        assert_eq!(flat, buckets.iter().map(|b| b.0).collect::<Vec<_>>());
        for e in &epochs {
            let users: u64 = e.iter().map(|b| u64::from(b / 3 % 7) * 10).sum();
            assert!(users <= 100 || e.len() == 1);
        }
        assert!(plan_epochs(Vec::new(), 10).is_empty());
    }
}
