//! A push task: claims its users, renders what the claim granted and hands the messages
//! to the runtime to push, acknowledging its messages to the operator when it ends.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use super::{Time, Waker};
use crate::dataflow::deliver::{self, Outcome};
use crate::dataflow::halts::Halt;
use crate::dataflow::{Candidate, Candidates, Context};
use crate::error::Result;
use crate::store::{CappedClaim, Claim, Ledger};

/// Messages of a task given back to its lane's budget: all that are left when the task
/// ends (`ended`), or those it waits with for a paused campaign ([`AckOnDrop::lend`]).
pub(super) struct Ack {
    pub(super) time: Time,
    pub(super) lane: usize,
    pub(super) messages: usize,
    pub(super) ended: bool,
}

/// Acknowledges a batch when its task ends, however it ends.
pub(super) struct AckOnDrop {
    pub(super) tx: mpsc::Sender<Ack>,
    pub(super) waker: Arc<Waker>,
    pub(super) time: Time,
    pub(super) lane: usize,
    /// Messages it still counts in its lane's budget.
    pub(super) messages: AtomicUsize,
    /// When the task's candidates reached the operator: its lane latency counts from here.
    pub(super) ready: Instant,
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
pub(super) struct Answered {
    /// Each target claimed, with its users.
    members: Vec<(u32, Vec<Candidate>)>,
    /// One answer per member.
    claims: Result<Vec<CappedClaim>>,
    /// The task's acknowledgement, passed on to its pushes.
    ack: Arc<AckOnDrop>,
}

impl Answered {
    /// Renders and pushes what the claim granted (or fails the run with its error).
    pub(super) fn push(self, ctx: &Arc<Context>) {
        match self.claims {
            Ok(claims) => push_members(ctx, self.members, claims, &self.ack),
            Err(e) => ctx.fail(e),
        }
    }
}

/// Claims a task's users (of one target, or of a capped group's members): at once on a
/// local store, else on the runtime, the answer coming back over `answers` (and waking the
/// worker). Users held out of a target are claimed apart, settled as held out in the same
/// step, and never rendered; users in their quiet hours are held, not claimed.
pub(super) fn claim(
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
        // In place: a task's users are taken apart, never copied into new lists (freeing
        // those made the allocator hand pages back and fault them in again, task by task).
        let mut users = users;
        if !rt.holdout.is_none() {
            let mut holdout = rt.holdout.scan();
            users.retain(|c| {
                let held = holdout.holds(c.id);
                if held {
                    apart.held_out.push(c.id);
                }
                !held
            });
        }
        if let Some(quiet) = &rt.quiet {
            apart.quiet = quiet.split(&mut users, |c| c.id, ctx.source.zones());
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
