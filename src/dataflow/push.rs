//! The push operator: the bridge from a timely worker to async I/O.
//!
//! It never awaits. It stashes candidate batches, cuts them into tasks of at most
//! `task_users` users and spawns each on the shared tokio runtime while fewer than `max_in_flight` messages are
//! out. Tasks report back over a channel and wake the operator through a `SyncActivator`
//! (guarded by a flag, so a burst of acks wakes it once). Each epoch's capability is held until
//! every batch of that epoch is acknowledged: the probe downstream means "delivered" — or,
//! once the dispatcher stops gracefully, that the epoch's work under way has settled and the
//! rest was dropped unclaimed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;
use timely::scheduling::SyncActivator;

use super::{deliver, Candidate, Candidates, Context, Time};

/// One finished batch.
struct Ack {
    time: Time,
    messages: usize,
}

/// An epoch the operator still holds.
struct Epoch {
    /// Held, never read: holding it keeps the epoch open downstream.
    _cap: Capability<Time>,
    /// Candidate batches of this epoch not yet handed to a task.
    queued: usize,
    /// Tasks of this epoch not yet acknowledged.
    tasks: usize,
}

/// Wakes the operator once per burst of acks.
struct Waker {
    activator: SyncActivator,
    pending: AtomicBool,
}

impl Waker {
    fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            // The worker is gone only when the run is over: nothing left to wake.
            let _ = self.activator.activate();
        }
    }
}

/// Acknowledges a batch when its task ends, however it ends.
struct AckOnDrop {
    tx: mpsc::Sender<Ack>,
    waker: Arc<Waker>,
    time: Time,
    messages: usize,
}

impl Drop for AckOnDrop {
    fn drop(&mut self) {
        // The receiver lives as long as the dataflow; after that nobody listens.
        let _ = self.tx.send(Ack {
            time: self.time,
            messages: self.messages,
        });
        self.waker.wake();
    }
}

/// Pushes `candidates`; the output carries no data, only the epochs' progress.
pub fn push<'s>(
    candidates: Stream<'s, Time, Vec<Candidates>>,
    ctx: Arc<Context>,
) -> Stream<'s, Time, Vec<()>> {
    let scope = candidates.scope();
    candidates.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
        Pipeline,
        "Push",
        move |_cap, info| {
            let waker = Arc::new(Waker {
                activator: scope.worker().sync_activator_for(info.address.to_vec()),
                pending: AtomicBool::new(false),
            });
            let (ack_tx, ack_rx) = mpsc::channel::<Ack>();
            let mut queue: VecDeque<(Time, Candidates)> = VecDeque::new();
            let mut epochs: BTreeMap<Time, Epoch> = BTreeMap::new();
            let mut in_flight = 0usize;

            move |(input, frontier), _output| {
                waker.pending.store(false, Ordering::Release);
                while let Ok(ack) = ack_rx.try_recv() {
                    in_flight -= ack.messages;
                    if let Some(e) = epochs.get_mut(&ack.time) {
                        e.tasks -= 1;
                    }
                }
                input.for_each_stamp(|cap, data| {
                    if let Some(cap) = cap.retain_least(0) {
                        let time = *cap.time();
                        let epoch = epochs.entry(time).or_insert(Epoch {
                            _cap: cap,
                            queued: 0,
                            tasks: 0,
                        });
                        for batch in data {
                            epoch.queued += batch.len();
                            queue.extend(batch.drain(..).map(|c| (time, c)));
                        }
                    }
                });

                if ctx.dispatcher.stopping() {
                    // A graceful stop: nothing queued is claimed; it is left for the next run,
                    // and each epoch completes once its tasks under way are acknowledged.
                    queue.clear();
                    epochs.values_mut().for_each(|e| e.queued = 0);
                }
                while in_flight < ctx.max_in_flight && !ctx.failed() {
                    let Some((time, target, users)) = next_task(&mut queue, &mut epochs, &ctx)
                    else {
                        break;
                    };
                    in_flight += users.len();
                    let ack = AckOnDrop {
                        tx: ack_tx.clone(),
                        waker: waker.clone(),
                        time,
                        messages: users.len(),
                    };
                    let ctx2 = ctx.clone();
                    ctx.runtime.spawn(async move {
                        let _ack = ack;
                        if let Err(e) = deliver::deliver(&ctx2, target, users).await {
                            ctx2.fail(e);
                        }
                    });
                }

                // An epoch is released once its input is complete and all its work acknowledged.
                epochs.retain(|time, e| e.queued > 0 || e.tasks > 0 || frontier.less_equal(time));
            }
        },
    )
}

/// Takes the next task's users off the queue: a whole candidate batch if it is small enough,
/// else one provider batch's worth of it. Counts the task in its epoch.
fn next_task(
    queue: &mut VecDeque<(Time, Candidates)>,
    epochs: &mut BTreeMap<Time, Epoch>,
    ctx: &Context,
) -> Option<(Time, u32, Vec<Candidate>)> {
    let (time, front) = queue.front_mut()?;
    let (time, target) = (*time, front.target);
    let whole = front.users.len() <= ctx.task_users;
    let users = if whole {
        std::mem::take(&mut front.users)
    } else {
        front.users.drain(..ctx.batch_max_messages).collect()
    };
    if whole {
        queue.pop_front();
    }
    if let Some(e) = epochs.get_mut(&time) {
        e.queued -= usize::from(whole);
        e.tasks += 1;
    }
    Some((time, target, users))
}
