//! The push operator: the bridge from a timely worker to async I/O.
//!
//! It never awaits. It stashes candidate batches and cuts them into tasks of at most
//! `task_users` users while fewer than `max_in_flight` messages are out. The CPU work of a
//! task happens here, on the worker that owns the users: the claim (on the embedded store, a
//! set operation and a log append; on Redis, network I/O that a tokio task issues and hands
//! back over a channel) and the rendering. The provider calls and the records of their
//! outcomes start here too, and go on on the tokio runtime from their first wait (I/O, a
//! timer, a slot): an instant provider on a local store never leaves the worker
//! ([`run_or_spawn`]). Tasks report back over channels and wake the operator
//! through a `SyncActivator` (guarded by a flag, so a burst of acks wakes it once). Each
//! epoch's capability is held until every task of that epoch is acknowledged: the probe
//! downstream means "delivered" — or, once the dispatcher stops gracefully, that the epoch's
//! work under way has settled and the rest was dropped unclaimed.
//!
//! Candidates queue per priority lane (SPEC Policy → Priority), each lane with its own
//! `max_in_flight` bound, served transactional first: a transactional campaign's candidates
//! never wait behind a bulk backlog here, and reach the dispatcher's own lane budget at once.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;
use timely::scheduling::SyncActivator;

use super::deliver::Outcome;
use super::halts::{Halt, OnPause};
use super::{deliver, Candidate, Candidates, Context, Time};
use crate::error::Result;
use crate::model::Priority;
use crate::store::{CappedClaim, Claim, Ledger};

/// Candidate queues, one per priority lane.
const LANES: usize = Priority::ALL.len();

/// One lane's work waiting for a push task: (epoch, work, when it arrived).
type Queue = VecDeque<(Time, Work, Instant)>;

/// Candidates of paused targets waiting for their campaign to be resumed or cancelled
/// ([`OnPause::Wait`]): (epoch, one target's candidates, when they arrived). Each counts as
/// queued work of its epoch, so the epoch stays open.
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

/// Messages of a task given back to its lane's budget: all that are left when the task
/// ends (`ended`), or those it waits with for a paused campaign ([`AckOnDrop::lend`]).
struct Ack {
    time: Time,
    lane: usize,
    messages: usize,
    ended: bool,
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
    lane: usize,
    /// Messages it still counts in its lane's budget.
    messages: AtomicUsize,
    /// When the task's candidates reached the operator: its lane latency counts from here.
    ready: Instant,
}

impl AckOnDrop {
    /// Gives `n` of the task's messages back to the lane's budget while they wait for their
    /// paused campaign: the lane's other campaigns go on. When resumed they are sent beyond
    /// the budget (at most what was claimed before the pause).
    fn lend(&self, n: usize) {
        let n = n.min(self.messages.load(Ordering::Acquire));
        if n == 0 {
            return;
        }
        self.messages.fetch_sub(n, Ordering::AcqRel);
        self.send(n, false);
    }

    fn send(&self, messages: usize, ended: bool) {
        // The receiver lives as long as the dataflow; after that nobody listens.
        let _ = self.tx.send(Ack {
            time: self.time,
            lane: self.lane,
            messages,
            ended,
        });
        self.waker.wake();
    }
}

impl Drop for AckOnDrop {
    fn drop(&mut self) {
        self.send(self.messages.load(Ordering::Acquire), true);
    }
}

/// A claim a remote store answered, back on the worker to be rendered and pushed.
struct Answered {
    /// Each target claimed, with its users.
    members: Vec<(u32, Vec<Candidate>)>,
    /// One answer per member.
    claims: Result<Vec<CappedClaim>>,
    /// The task's acknowledgement, passed on to its pushes.
    ack: Arc<AckOnDrop>,
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
        if let Some((lane, groups)) = capped_groups(ctx, capped) {
            epoch.queued += groups.len();
            for group in groups {
                self.queues[lane].push_back((time, Work::Capped(group), now));
            }
        }
    }

    /// Renders and pushes what remote claims answered.
    fn take_answers(&mut self) {
        while let Ok(a) = self.answer_rx.try_recv() {
            match a.claims {
                Ok(claims) => push_members(&self.ctx, a.members, claims, &a.ack),
                Err(e) => self.ctx.fail(e),
            }
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

/// Drops queued work that must not be claimed now: everything on a graceful stop (left for
/// the next run; each epoch completes once its tasks under way are acknowledged), and in a
/// generation cut short the fan-out work of the lanes below transactional (left unclaimed for
/// the next generation; login grants, whose stream entries are acknowledged with the epoch,
/// are kept).
fn shed(
    ctx: &Context,
    queues: &mut [Queue; LANES],
    epochs: &mut BTreeMap<Time, Epoch>,
    parked: &mut Parked,
) {
    if ctx.dispatcher.stopping() {
        queues.iter_mut().for_each(VecDeque::clear);
        parked.clear();
        epochs.values_mut().for_each(|e| e.queued = 0);
    } else if ctx.is_cut() {
        for queue in &mut queues[Priority::Normal.lane()..] {
            queue.retain(|(time, work, _)| {
                let keep = matches!(work, Work::One(c) if ctx.is_lazy(c.target));
                if !keep {
                    if let Some(e) = epochs.get_mut(time) {
                        e.queued -= 1;
                    }
                }
                keep
            });
        }
    }
}

/// A paused target's candidates: parked, counting as one entry of queued work of their
/// epoch (returns 1), or — in `serve` ([`OnPause::Drop`]) — dropped unclaimed (returns 0).
fn park(ctx: &Context, entry: (Time, Candidates, Instant), parked: &mut Parked) -> usize {
    match ctx.on_pause {
        OnPause::Wait => {
            parked.push(entry);
            1
        }
        OnPause::Drop => {
            ctx.halts.note_dropped(entry.1.target);
            0
        }
    }
}

/// After the control states changed: queued work of targets now paused is parked (or
/// dropped), and parked work of targets no longer paused goes back to its lane — a cancelled
/// target's to be settled as cancelled when it is claimed ([`SetApart::decide`]). Each epoch's
/// count of queued entries follows.
fn repark(
    ctx: &Context,
    queues: &mut [Queue; LANES],
    parked: &mut Parked,
    epochs: &mut BTreeMap<Time, Epoch>,
) {
    let paused = |t: u32| ctx.halts.of(t) == Halt::Paused;
    let mut recount = |time: Time, added: usize, removed: usize| {
        if let Some(e) = epochs.get_mut(&time) {
            e.queued = (e.queued + added).saturating_sub(removed);
        }
    };
    for queue in queues.iter_mut() {
        let mut kept = VecDeque::with_capacity(queue.len());
        for (time, work, ready) in queue.drain(..) {
            match work {
                Work::One(c) if paused(c.target) => {
                    recount(time, park(ctx, (time, c, ready), parked), 1);
                }
                Work::Capped(group) if group.iter().any(|c| paused(c.target)) => {
                    let (stop, go): (Vec<Candidates>, Vec<Candidates>) =
                        group.into_iter().partition(|c| paused(c.target));
                    let added: usize = stop
                        .into_iter()
                        .map(|c| park(ctx, (time, c, ready), parked))
                        .sum();
                    if go.is_empty() {
                        recount(time, added, 1);
                    } else {
                        recount(time, added, 0);
                        kept.push_back((time, Work::Capped(go), ready));
                    }
                }
                work => kept.push_back((time, work, ready)),
            }
        }
        *queue = kept;
    }
    let (still, going): (Parked, Parked) = std::mem::take(parked)
        .into_iter()
        .partition(|(_, c, _)| paused(c.target));
    *parked = still;
    let mut capped: BTreeMap<Time, (Vec<Candidates>, Instant)> = BTreeMap::new();
    for (time, c, ready) in going {
        if ctx.targets[c.target as usize].capped {
            recount(time, 0, 1);
            let entry = capped.entry(time).or_insert((Vec::new(), ready));
            entry.0.push(c);
            entry.1 = entry.1.min(ready);
            continue;
        }
        let lane = ctx.targets[c.target as usize]
            .target
            .campaign
            .priority
            .lane();
        queues[lane].push_back((time, Work::One(c), ready));
    }
    for (time, (members, ready)) in capped {
        if let Some((lane, groups)) = capped_groups(ctx, members) {
            recount(time, groups.len(), 0);
            for group in groups {
                queues[lane].push_back((time, Work::Capped(group), ready));
            }
        }
    }
}

/// The capped candidates that arrived together as [`Work::Capped`] entries of at most about
/// `task_users` users each, cut at user ids so that each user's capped offers stay in one
/// entry: per entry one member per target, users in id order, members in the run's decision
/// order ([`super::capped::cut`]); with the lane of the first. `None` if there are none.
fn capped_groups(ctx: &Context, capped: Vec<Candidates>) -> Option<(usize, Vec<Vec<Candidates>>)> {
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
    let members = by_target
        .into_iter()
        .map(|((_, target), batches)| (target, batches))
        .collect();
    Some((lane, super::capped::cut(members, ctx.task_users)))
}

/// Takes the next task's users off a lane's queue: a whole entry if it is small enough (a
/// capped group always is), else one provider batch's worth of a target's candidates. Counts
/// the task in its epoch.
fn next_task(
    queue: &mut Queue,
    epochs: &mut BTreeMap<Time, Epoch>,
    ctx: &Context,
) -> Option<(Time, Vec<Candidates>, Instant)> {
    let (time, front, ready) = queue.front_mut()?;
    let (time, ready) = (*time, *ready);
    let (members, whole) = match front {
        Work::One(c) if c.users.len() <= ctx.task_users => (vec![std::mem::take(c)], true),
        Work::One(c) => {
            let users = c.users.drain(..ctx.batch_max_messages).collect();
            let part = Candidates {
                target: c.target,
                users,
            };
            (vec![part], false)
        }
        Work::Capped(group) => (std::mem::take(group), true),
    };
    if whole {
        queue.pop_front();
    }
    if let Some(e) = epochs.get_mut(&time) {
        e.queued -= usize::from(whole);
        e.tasks += 1;
    }
    Some((time, members, ready))
}

/// Claims a task's users (of one target, or of a capped group's members): at once on a
/// local store, else on the runtime, the answer coming back over `answers` (and waking the
/// worker). Users held out of a target are claimed apart, settled as held out in the same
/// step, and never rendered; users in their quiet hours are held, not claimed.
fn claim(
    ctx: &Arc<Context>,
    members: Vec<Candidates>,
    ack: Arc<AckOnDrop>,
    answers: &mpsc::Sender<Answered>,
) {
    if ctx.dispatcher.stopping() {
        // A graceful stop: nothing more is claimed; the users stay unclaimed for the next run.
        return;
    }
    let mut aparts = Vec::with_capacity(members.len());
    let mut sending = Vec::with_capacity(members.len());
    for c in members {
        let rt = &ctx.targets[c.target as usize];
        let mut users = c.users;
        if let Some(only) = &rt.only {
            users.retain(|u| only.contains(u.id));
        }
        let (apart, users) = SetApart::decide(ctx, c.target, users);
        aparts.push((c.target, apart));
        if !users.is_empty() {
            sending.push((c.target, users));
        }
    }
    let ledgers: Vec<(Ledger, Vec<u32>)> = sending
        .iter()
        .map(|(t, users)| {
            let ids = users.iter().map(|u| u.id).collect();
            (ctx.targets[*t as usize].ledger.clone(), ids)
        })
        .collect();
    let capped = sending
        .first()
        .is_some_and(|(t, _)| ctx.targets[*t as usize].capped);
    let recorded: Option<Result<()>> = aparts
        .iter()
        .map(|(t, apart)| apart.record_local(ctx, *t))
        .collect();
    let local = match recorded {
        Some(Ok(())) => claim_local(ctx, &ledgers, capped),
        Some(Err(e)) => Some(Err(e)),
        None => None,
    };
    match local {
        Some(Ok(claims)) => push_members(ctx, sending, claims, &ack),
        // The task ends here; its ack goes back as it drops.
        Some(Err(e)) => ctx.fail(e),
        None => {
            let (answers, ctx) = (answers.clone(), ctx.clone());
            ctx.runtime.clone().spawn(async move {
                let claims = async {
                    for (t, apart) in &aparts {
                        apart.record(&ctx, *t).await?;
                    }
                    claim_remote(&ctx, &ledgers, capped).await
                }
                .await;
                let waker = ack.waker.clone();
                let answer = Answered {
                    members: sending,
                    claims,
                    ack,
                };
                // Nobody listens once the dataflow is gone: the ack drops with the answer.
                let _ = answers.send(answer);
                waker.wake();
            });
        }
    }
}

/// The claim of `ledgers` on a local store; `None` where the store is remote. A capped
/// group's members are claimed in one step, under the caps at the run's send time.
fn claim_local(
    ctx: &Context,
    ledgers: &[(Ledger, Vec<u32>)],
    capped: bool,
) -> Option<Result<Vec<CappedClaim>>> {
    match (capped, &ctx.caps) {
        (true, Some(caps)) => crate::store::claim_capped_local(ledgers, caps.at, &caps.windows),
        _ => ledgers
            .iter()
            .map(|(ledger, ids)| {
                ledger.claim_local(ids).map(|claim| {
                    claim.map(|claim| CappedClaim {
                        claim,
                        capped: Vec::new(),
                    })
                })
            })
            .collect(),
    }
}

/// [`claim_local`] on a remote store.
async fn claim_remote(
    ctx: &Context,
    ledgers: &[(Ledger, Vec<u32>)],
    capped: bool,
) -> Result<Vec<CappedClaim>> {
    match (capped, &ctx.caps) {
        (true, Some(caps)) => crate::store::claim_capped(ledgers, caps.at, &caps.windows).await,
        _ => {
            let mut out = Vec::with_capacity(ledgers.len());
            for (ledger, ids) in ledgers {
                out.push(CappedClaim {
                    claim: ledger.claim(ids).await?,
                    capped: Vec::new(),
                });
            }
            Ok(out)
        }
    }
}

/// Counts each member's capped users, then renders and pushes what its claim granted.
fn push_members(
    ctx: &Arc<Context>,
    members: Vec<(u32, Vec<Candidate>)>,
    claims: Vec<CappedClaim>,
    ack: &Arc<AckOnDrop>,
) {
    for ((target, users), answer) in members.into_iter().zip(claims) {
        deliver::count_capped(ctx, target, answer.capped.len() as u64);
        render_and_push(ctx, target, &users, answer.claim, ack.clone());
    }
}

/// The users policy sets apart before the claim (SPEC "Order of decisions", after "already
/// granted", which each store answers): held out, then inside their quiet hours.
#[derive(Default)]
struct SetApart {
    cancelled: Vec<u32>,
    held_out: Vec<u32>,
    quiet: Vec<u32>,
}

impl SetApart {
    /// Splits `users` of target `target` into those set apart and those to claim for
    /// sending. Every user of a cancelled campaign is set apart as cancelled.
    fn decide(ctx: &Context, target: u32, users: Vec<Candidate>) -> (SetApart, Vec<Candidate>) {
        let rt = &ctx.targets[target as usize];
        let mut apart = SetApart::default();
        if ctx.halts.of(target) == Halt::Cancelled {
            apart.cancelled = users.into_iter().map(|c| c.id).collect();
            return (apart, Vec::new());
        }
        let mut users = users;
        if !rt.holdout.is_none() {
            let (held, send): (Vec<Candidate>, Vec<Candidate>) =
                users.into_iter().partition(|c| rt.holdout.holds(c.id));
            apart.held_out = held.into_iter().map(|c| c.id).collect();
            users = send;
        }
        if let Some(quiet) = &rt.quiet {
            let (held, send) = quiet.split(users, |c| c.id, |id| ctx.source.tz(id));
            apart.quiet = held;
            users = send;
        }
        (apart, users)
    }

    /// Records them in a local store at once; `None` where the store is remote.
    fn record_local(&self, ctx: &Context, target: u32) -> Option<Result<()>> {
        let ledger = &ctx.targets[target as usize].ledger;
        let steps: [(&[u32], LocalStep, Outcome); 3] = [
            (
                &self.cancelled,
                Ledger::claim_cancelled_local,
                Outcome::Cancelled,
            ),
            (
                &self.held_out,
                Ledger::claim_held_out_local,
                Outcome::HeldOut,
            ),
            (&self.quiet, Ledger::hold_quiet_local, Outcome::QuietHeld),
        ];
        for (ids, step, outcome) in steps {
            if ids.is_empty() {
                continue;
            }
            match step(ledger, ids)? {
                Ok(claim) => deliver::count_set_apart(ctx, target, &claim, outcome),
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(()))
    }

    /// Records them in the store.
    async fn record(&self, ctx: &Context, target: u32) -> Result<()> {
        let ledger = &ctx.targets[target as usize].ledger;
        if !self.cancelled.is_empty() {
            let claim = ledger.claim_cancelled(&self.cancelled).await?;
            deliver::count_set_apart(ctx, target, &claim, Outcome::Cancelled);
        }
        if !self.held_out.is_empty() {
            let claim = ledger.claim_held_out(&self.held_out).await?;
            deliver::count_set_apart(ctx, target, &claim, Outcome::HeldOut);
        }
        if !self.quiet.is_empty() {
            let claim = ledger.hold_quiet(&self.quiet).await?;
            deliver::count_set_apart(ctx, target, &claim, Outcome::QuietHeld);
        }
        Ok(())
    }
}

/// A local store's step of [`SetApart::record_local`].
type LocalStep = fn(&Ledger, &[u32]) -> Option<Result<Claim>>;

/// Counts a claim, renders what it granted and hands the messages to the runtime to push.
fn render_and_push(
    ctx: &Arc<Context>,
    target: u32,
    users: &[Candidate],
    claim: Claim,
    ack: Arc<AckOnDrop>,
) {
    deliver::count_claim(ctx, target, &claim);
    if claim.claimed.is_empty() {
        return;
    }
    let rendered = match deliver::render(ctx, target, users, claim.claimed) {
        Ok(rendered) => rendered,
        Err(e) => return ctx.fail(e),
    };
    let ready = ack.ready;
    let ctx2 = ctx.clone();
    if ctx.targets[target as usize].expire {
        run_or_spawn(&ctx.runtime, async move {
            let _ack = ack;
            let ended = crate::run::targets::WINDOW_ENDED;
            if let Err(e) = deliver::dead_letter(&ctx2, rendered, ended).await {
                ctx2.fail(e);
            }
        });
        return;
    }
    run_or_spawn(&ctx.runtime, async move {
        // Out of tokio's cooperative budget: a task holds thousands of pushes, and with the
        // budget a wake-up polled only 128 of its ready ones before going to the back of the
        // queue, so a 200 ms push was recorded late (200,000 in flight on 2 cores: 0.33–0.44
        // of concurrency ÷ latency, p99 606–846 ms; without: 0.47, p99 500–546 ms). Each
        // push still awaits its I/O, so the task yields whenever it waits.
        let lend = |n| ack.lend(n);
        let sent = deliver::send(&ctx2, rendered, ready, &lend);
        if let Err(e) = tokio::task::unconstrained(sent).await {
            ctx2.fail(e);
        }
    });
}

/// Runs `task` here, on the worker, as far as it goes without waiting; the rest — once it
/// waits for I/O, a timer, a slot or a rate token — goes on on the runtime. A provider that
/// answers at once and a local store complete a push task right here, with its records still
/// in this core's cache (handing every task to the runtime's threads made them cross cores).
/// A `log:` provider's write, an ordinary file write, is made here too.
fn run_or_spawn(runtime: &tokio::runtime::Handle, task: impl Future<Output = ()> + Send + 'static) {
    let mut task = Box::pin(task);
    // Inside the runtime's context: timers and I/O made in the first poll belong to it.
    let _inside = runtime.enter();
    let mut here = std::task::Context::from_waker(std::task::Waker::noop());
    if task.as_mut().poll(&mut here).is_pending() {
        // The runtime polls it at once, with a waker of its own in place of the no-op one.
        runtime.spawn(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A task that never waits ends on the calling thread (the worker); one that waits for a
    /// timer goes on on the runtime, whose waker replaces the first poll's, and ends there.
    #[test]
    fn a_task_runs_here_until_it_waits_then_on_the_runtime() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-runtime")
            .enable_all()
            .build()
            .expect("runtime");
        let (tx, rx) = mpsc::channel();
        let here = std::thread::current().id();

        let done = tx.clone();
        run_or_spawn(runtime.handle(), async move {
            let _ = done.send(("instant", std::thread::current().id()));
        });
        // Ended before run_or_spawn returned, on this thread.
        assert_eq!(rx.try_recv(), Ok(("instant", here)));

        let (started, waited) = (tx.clone(), tx);
        run_or_spawn(runtime.handle(), async move {
            let _ = started.send(("started", std::thread::current().id()));
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = waited.send(("waited", std::thread::current().id()));
        });
        assert_eq!(rx.try_recv(), Ok(("started", here)));
        let (what, thread) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("never woken");
        assert_eq!(what, "waited");
        assert_ne!(thread, here, "the rest ran on the runtime");
    }
}
