//! The push operator: the bridge from a timely worker to async I/O.
//!
//! It never awaits. It stashes candidate batches and cuts them into tasks of at most
//! `task_users` users while fewer than `max_in_flight` messages are out: one campaign's batches
//! that follow each other in id order merge into one task ([`next_task`]). The CPU work of a
//! task happens here, on the worker that owns the users: the claim (on the embedded store, a
//! set operation and a log append; on Redis, network I/O that a tokio task issues and hands
//! back over a channel) and the rendering. The provider calls and the records of their
//! outcomes start here too, and go on on the tokio runtime from their first wait (I/O, a
//! timer, a slot): an instant provider on a local store never leaves the worker
//! (`task::run_or_spawn`). Tasks report back over channels and wake the operator
//! through a `SyncActivator` (guarded by a flag, so a burst of acks wakes it once). Each
//! epoch's capability is held until every task of that epoch is acknowledged: the probe
//! downstream means "delivered" — or, once the dispatcher stops gracefully, that the epoch's
//! work under way has settled and the rest was dropped unclaimed.
//!
//! Candidates queue per priority lane (SPEC Policy → Priority), each lane with its own
//! `max_in_flight` bound, served transactional first: a transactional campaign's candidates
//! never wait behind a bulk backlog here, and reach the dispatcher's own lane budget at once.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;
use timely::scheduling::SyncActivator;

use super::capped::Member;
use super::halts::Halt;
use super::{Candidate, Candidates, Context, Time};
use crate::model::Priority;

mod hold;
mod task;

use hold::{park, repark, shed};
use task::{claim, Ack, AckOnDrop, Answered};

/// Candidate queues, one per priority lane.
const LANES: usize = Priority::ALL.len();

/// One lane's work waiting for a push task: (epoch, work, when it arrived).
type Queue = VecDeque<(Time, Work, Instant)>;

/// Candidates of paused targets waiting for their campaign to be resumed or cancelled
/// ([`super::halts::OnPause::Wait`]): (epoch, one target's candidates, when they arrived).
/// Each counts as queued work of its epoch, so the epoch stays open.
type Parked = Vec<(Time, Candidates, Instant)>;

/// Work for push tasks.
enum Work {
    /// One target's candidates.
    One(Candidates),
    /// Frequency-capped targets' candidates that arrived together (one scan stretch or
    /// more), one entry per target, in the run's decision order: claimed in one step, so
    /// each user meets its capped offers in that order ([`crate::store::claim_capped`]).
    Capped(Vec<Candidates>),
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
            let wake = waker.clone();
            ctx.halts.on_change(Box::new(move || wake.wake()));
            let mut op = Pusher::new(ctx.clone(), waker);
            move |(input, frontier), _output| {
                op.waker.pending.store(false, Ordering::Release);
                op.take_acks();
                input.for_each_stamp(|cap, data| {
                    if let Some(cap) = cap.retain_least(0) {
                        op.stash(cap, data);
                    }
                });
                op.take_answers();
                shed(&ctx, &mut op.queues, &mut op.epochs, &mut op.parked);
                op.start_tasks();
                // An epoch is released once its input is complete and all its work acknowledged.
                op.epochs
                    .retain(|time, e| e.queued > 0 || e.tasks > 0 || frontier.less_equal(time));
            }
        },
    )
}

/// The push operator's state between activations.
struct Pusher {
    ctx: Arc<Context>,
    waker: Arc<Waker>,
    ack_tx: mpsc::Sender<Ack>,
    ack_rx: mpsc::Receiver<Ack>,
    answer_tx: mpsc::Sender<Answered>,
    answer_rx: mpsc::Receiver<Answered>,
    queues: [Queue; LANES],
    epochs: BTreeMap<Time, Epoch>,
    /// Messages out per lane: handed to tasks, not yet acknowledged.
    in_flight: [usize; LANES],
    parked: Parked,
    /// The control states' change count last applied to the queues.
    halts_seen: u64,
}

impl Pusher {
    fn new(ctx: Arc<Context>, waker: Arc<Waker>) -> Pusher {
        let (ack_tx, ack_rx) = mpsc::channel();
        let (answer_tx, answer_rx) = mpsc::channel();
        Pusher {
            halts_seen: ctx.halts.changes(),
            ctx,
            waker,
            ack_tx,
            ack_rx,
            answer_tx,
            answer_rx,
            queues: Default::default(),
            epochs: BTreeMap::new(),
            in_flight: [0; LANES],
            parked: Vec::new(),
        }
    }

    /// Gives acknowledged messages back to their lanes' budgets and ended tasks to their
    /// epochs.
    fn take_acks(&mut self) {
        while let Ok(ack) = self.ack_rx.try_recv() {
            self.in_flight[ack.lane] -= ack.messages;
            if let (true, Some(e)) = (ack.ended, self.epochs.get_mut(&ack.time)) {
                e.tasks -= 1;
            }
        }
    }

    /// Queues an epoch's arriving candidates in their lanes: a paused target's are parked,
    /// capped targets' are grouped ([`capped_groups`]).
    fn stash<'a>(
        &mut self,
        cap: Capability<Time>,
        data: impl Iterator<Item = &'a mut Vec<Candidates>>,
    ) {
        let ctx = &self.ctx;
        let time = *cap.time();
        let epoch = self.epochs.entry(time).or_insert(Epoch {
            _cap: cap,
            queued: 0,
            tasks: 0,
        });
        let now = Instant::now();
        let mut capped = Vec::new();
        for c in data.flat_map(|batch| batch.drain(..)) {
            let rt = &ctx.targets[c.target as usize];
            if ctx.halts.of(c.target) == Halt::Paused {
                epoch.queued += park(ctx, (time, c, now), &mut self.parked);
            } else if rt.capped {
                capped.push(c);
            } else {
                epoch.queued += 1;
                let lane = rt.target.campaign.priority.lane();
                self.queues[lane].push_back((time, Work::One(c), now));
            }
        }
        if let Some((lane, work)) = capped_work(ctx, capped) {
            epoch.queued += work.len();
            for w in work {
                self.queues[lane].push_back((time, w, now));
            }
        }
    }

    /// Renders and pushes what remote claims answered.
    fn take_answers(&mut self) {
        while let Ok(answered) = self.answer_rx.try_recv() {
            answered.push(&self.ctx);
        }
    }

    /// Starts tasks, transactional lane first, while each lane has room in its budget.
    fn start_tasks(&mut self) {
        let ctx = self.ctx.clone();
        for lane in 0..LANES {
            while self.in_flight[lane] < ctx.max_in_flight && !ctx.failed() {
                // Looked at before every task: the watcher runs on another thread.
                if ctx.halts.changes() != self.halts_seen {
                    self.halts_seen = ctx.halts.changes();
                    repark(&ctx, &mut self.queues, &mut self.parked, &mut self.epochs);
                }
                let Some((time, members, ready)) =
                    next_task(&mut self.queues[lane], &mut self.epochs, &ctx)
                else {
                    break;
                };
                let messages = members.iter().map(|c| c.users.len()).sum();
                self.in_flight[lane] += messages;
                let ack = Arc::new(AckOnDrop {
                    tx: self.ack_tx.clone(),
                    waker: self.waker.clone(),
                    time,
                    lane,
                    messages: AtomicUsize::new(messages),
                    ready,
                });
                claim(&ctx, members, ack, &self.answer_tx);
                // A task may have ended right here (see `run_or_spawn`): its messages are
                // back in the budget before the next one starts.
                self.take_acks();
            }
        }
    }
}

/// The capped candidates that arrived together as work for push tasks, with the lane of the
/// first target. Each user's capped offers must be claimed in one step, in the run's decision
/// order: several targets' candidates are cut at user ids into [`Work::Capped`] entries of at
/// most about `task_users` users, one member per target, users in id order, members in
/// decision order ([`super::capped::cut`]). One target's candidates in id order offer each
/// user once, so they queue as they came, as [`Work::One`] entries that tasks take up to
/// `task_users` at a time (cutting them all up on arrival held a whole activation's copies at
/// once: freed, the allocator handed the pages back and faulted them in again for the next,
/// a fifth of the policy benchmark's time). `None` if there are none.
fn capped_work(ctx: &Context, capped: Vec<Candidates>) -> Option<(usize, Vec<Work>)> {
    let mut by_target: BTreeMap<(usize, u32), Vec<Vec<Candidate>>> = BTreeMap::new();
    for c in capped {
        let order = ctx.targets[c.target as usize].order;
        by_target
            .entry((order, c.target))
            .or_default()
            .push(c.users);
    }
    let first = by_target.keys().next()?.1;
    let lane = ctx.targets[first as usize].target.campaign.priority.lane();
    let mut members: Vec<Member> = by_target
        .into_iter()
        .map(|((_, target), batches)| (target, batches))
        .collect();
    let work = match members.as_mut_slice() {
        [(target, batches)] if super::capped::strictly_ascending(batches) => {
            let target = *target;
            (std::mem::take(batches).into_iter())
                .map(|users| Work::One(Candidates { target, users }))
                .collect()
        }
        _ => (super::capped::cut(members, ctx.task_users).into_iter())
            .map(Work::Capped)
            .collect(),
    };
    Some((lane, work))
}

/// Takes the next task's users off a lane's queue: a capped group whole; else up to
/// `task_users` of one target's candidates, from as many of the entries at the front as
/// belong to that target and epoch and follow each other in id order (a worker's buckets
/// arrive as one entry each: merged, a task's claim, log record and acknowledgement serve
/// several of them). Counts the task in its epoch.
fn next_task(
    queue: &mut Queue,
    epochs: &mut BTreeMap<Time, Epoch>,
    ctx: &Context,
) -> Option<(Time, Vec<Candidates>, Instant)> {
    let (time, front, ready) = queue.front_mut()?;
    let (time, ready) = (*time, *ready);
    let (members, emptied) = match front {
        Work::Capped(group) => {
            let group = std::mem::take(group);
            queue.pop_front();
            (group, 1)
        }
        Work::One(c) => {
            let target = c.target;
            let (users, emptied) = take_users(queue, time, target, ctx.task_users);
            (vec![Candidates { target, users }], emptied)
        }
    };
    if let Some(e) = epochs.get_mut(&time) {
        e.queued -= emptied;
        e.tasks += 1;
    }
    Some((time, members, ready))
}

/// Up to `limit` users of `target` from the front of `queue`: whole entries of epoch `time`
/// while they fit and go on in id order, then part of the next one if the task has room.
/// Returns them with the count of entries taken whole (popped). Takes at least one user when
/// the front entry is `target`'s.
fn take_users(queue: &mut Queue, time: Time, target: u32, limit: usize) -> (Vec<Candidate>, usize) {
    let mut users: Vec<Candidate> = Vec::new();
    let mut emptied = 0;
    while let Some((t, Work::One(c), _)) = queue.front_mut() {
        let in_order = users
            .last()
            .is_none_or(|last| c.users.first().is_none_or(|u| u.id > last.id));
        if *t != time || c.target != target || !in_order || users.len() >= limit {
            break;
        }
        let room = limit - users.len();
        if c.users.len() > room {
            // The entry's tail stays queued; an empty task takes the head's vector as it is
            // (a drain would copy the head out and then move the tail down).
            let tail = c.users.split_off(room);
            let head = std::mem::replace(&mut c.users, tail);
            if users.is_empty() {
                users = head;
            } else {
                users.extend_from_slice(&head);
            }
            break;
        }
        if users.is_empty() {
            // Alone, the entry's own vector serves.
            users = std::mem::take(&mut c.users);
        } else {
            // Grown once to the task's size, not doubled entry by entry (a no-op after that).
            users.reserve_exact(limit - users.len());
            users.append(&mut c.users);
        }
        queue.pop_front();
        emptied += 1;
    }
    (users, emptied)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue of one target's entries, ids ascending, of the given sizes.
    fn queue(sizes: &[usize]) -> (Queue, Vec<u32>) {
        let now = Instant::now();
        let mut next = 0u32;
        let mut all = Vec::new();
        let q = sizes
            .iter()
            .map(|&n| {
                let users: Vec<Candidate> = (0..n)
                    .map(|_| {
                        next += 3;
                        all.push(next);
                        Candidate {
                            id: next,
                            level: 1,
                            points: u64::from(next),
                        }
                    })
                    .collect();
                (1, Work::One(Candidates { target: 0, users }), now)
            })
            .collect();
        (q, all)
    }

    #[test]
    fn tasks_take_every_user_once_in_order_and_at_most_the_limit() {
        for (sizes, limit) in [
            (vec![8192, 8192, 100], 3200),
            (vec![10, 3, 7, 5000, 1], 64),
            (vec![1; 20], 7),
            (vec![3200, 3200], 3200),
        ] {
            let (mut q, all) = queue(&sizes);
            let (mut taken, mut popped) = (Vec::new(), 0);
            while !q.is_empty() {
                let (users, emptied) = take_users(&mut q, 1, 0, limit);
                assert!(!users.is_empty() && users.len() <= limit, "{sizes:?}");
                // A task is full unless the queue ran out.
                assert!(users.len() == limit || q.is_empty(), "{sizes:?}");
                taken.extend(users.iter().map(|u| u.id));
                popped += emptied;
            }
            assert_eq!(taken, all, "{sizes:?} by {limit}");
            assert_eq!(popped, sizes.len(), "{sizes:?}");
        }
    }
}
