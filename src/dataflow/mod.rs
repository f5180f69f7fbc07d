//! The fan-out dataflow: one timely graph, one small operator per file.
//!
//! ```text
//!  admits ──broadcast──┐
//!  granted ─by bucket──┴─ control ─┬──────────┐
//!  scans ───exchange by bucket ────┴─► scan ──┤
//!  logins ──exchange by bucket ─► login ──────┴─► push ──► probe
//! ```
//! - [`scan`]: expands each bucket of user ids into its users (a bounded amount per
//!   activation), tests every admitted campaign's audience against each user once, drops the
//!   pairs the `granted` input names, and emits compact candidate batches per campaign.
//! - [`login`]: tests each login against the admitted lazy coupons on the worker that owns
//!   the user, drops pairs granted before or proposed earlier in the run, and emits the same
//!   candidate batches.
//! - [`push`]: claims candidates in the store, renders, batches and pushes them on the shared
//!   tokio runtime, never blocking the worker; it holds each epoch until every push of that
//!   epoch is acknowledged, so the probe behind it means "delivered".
//! - [`deliver`]: the async work of one batch (claim → render → push → mark done).
//! - [`capped`]: frequency-capped candidates cut into push tasks, a user's offers together.
//!
//! Times are epochs (`u64`): the driver feeds a fixed number of users per epoch and keeps only
//! a few epochs open, which bounds memory (timely has no backpressure of its own).

pub mod capped;
pub mod deliver;
pub mod gather;
pub mod halts;
pub mod login;
pub mod push;
pub mod scan;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::{Concat, Exchange as _, Input, Probe};
use timely::dataflow::{InputHandle, ProbeHandle, Scope};

use crate::error::Error;
use crate::metrics::{CampaignStats, Metrics};
use crate::model::{Placement, Target, UserRef};
use crate::providers::dispatch::Dispatcher;
use crate::render::Renderer;
use crate::sources::logins::Login;
use crate::sources::UserSource;
use crate::store::Ledger;

/// A dataflow time: the epoch a record was fed in.
pub type Time = u64;

/// A request to scan one bucket for some targets (indices into [`Context::targets`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scan {
    /// The bucket id.
    pub bucket: u32,
    /// The targets to test its users against.
    pub targets: Vec<u32>,
}

impl Scan {
    /// What scans are exchanged by: the owner of the bucket ([`Placement::worker_of`]), which
    /// is what loading ([`crate::model::Route`]) assumes.
    pub fn exchange_key(&self, placement: &Placement) -> u64 {
        placement.worker_of(self.bucket) as u64
    }
}

/// Changes to what the scan operator knows: targets admitted, pairs already granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Target `i` is admitted: compile its audience.
    Admit(u32),
    /// `(target, user)` was granted before this engine existed (`+1`), or that grant is
    /// withdrawn (`-1`).
    Granted(u32, u32, isize),
}

/// A user who passed a target's audience test: what the message needs of the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// User id.
    pub id: u32,
    /// Member level.
    pub level: u8,
    /// Loyalty points.
    pub points: u64,
}

impl Candidate {
    /// What the message needs of `user`.
    #[inline(always)]
    pub fn of(user: &UserRef<'_>) -> Candidate {
        Candidate {
            id: user.id,
            level: user.level,
            points: user.points,
        }
    }
}

/// Candidates of one target from one stretch of a bucket, in id order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Candidates {
    /// Index into [`Context::targets`].
    pub target: u32,
    /// The users.
    pub users: Vec<Candidate>,
}

/// A target with what a run needs of it: its ledger and its counters.
#[derive(Debug)]
pub struct RunTarget {
    /// Campaign and occurrence.
    pub target: Target,
    /// Its ledger in the store.
    pub ledger: Ledger,
    /// Its counters.
    pub stats: CampaignStats,
    /// When its pushes were answered, first and last.
    pub sends: crate::metrics::SendSpan,
    /// Renders its messages.
    pub renderer: Renderer,
    /// Who is held out of it (SPEC "Holdouts").
    pub holdout: crate::policy::Holdout,
    /// Its quiet hours, where they apply.
    pub quiet: Option<crate::policy::QuietAt>,
    /// Only these users (held for their quiet hours earlier); `None`: its whole audience.
    pub only: Option<roaring::RoaringBitmap>,
    /// Dead-letter its users instead of sending: their window ended during quiet hours.
    pub expire: bool,
    /// Its sends count against the frequency caps ([`Context::caps`]).
    pub capped: bool,
    /// Where its offers to one user come in the run's decision order (SPEC "Frequency caps":
    /// priority, then job-file order, then tick): lower first.
    pub order: usize,
}

/// The frequency caps of a run and the send time they are checked at.
#[derive(Debug, Clone)]
pub struct CapsAt {
    /// The run's send time in the store's table.
    pub at: crate::store::SendAt,
    /// The caps.
    pub windows: Vec<crate::history::Window>,
}

/// Everything the operators share within a process.
pub struct Context {
    /// Where users come from.
    pub source: UserSource,
    /// Bucket size, and which worker owns each bucket.
    pub placement: Placement,
    /// Every target of the run; records carry indices into this.
    pub targets: Vec<RunTarget>,
    /// The provider and its policy.
    pub dispatcher: Arc<Dispatcher>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The runtime push tasks run on.
    pub runtime: tokio::runtime::Handle,
    /// Messages per provider batch.
    pub batch_max_messages: usize,
    /// Users per push task: claimed together, pushed as concurrent provider batches.
    pub task_users: usize,
    /// Serialized bytes per provider batch.
    pub batch_max_bytes: usize,
    /// Messages handed to push tasks but not yet acknowledged, per worker, at most.
    pub max_in_flight: usize,
    /// The first fatal error any task hit; the driver stops when it is set.
    pub fatal: Fatal,
    /// Set to cut a `serve` generation short (a transactional campaign waits): fan-out
    /// candidates still queued are dropped unclaimed, and messages of the other lanes not yet
    /// attempted are handed back to the store ([`crate::store::Ledger::unclaim`]) — the next
    /// generation sends them; login grants and attempts under way finish.
    pub cut: Arc<std::sync::atomic::AtomicBool>,
    /// The frequency caps, where any target is capped.
    pub caps: Option<CapsAt>,
    /// Each target's control state (paused, cancelled), as last read from the store.
    pub halts: halts::Halts,
    /// What a paused target's candidates become.
    pub on_pause: halts::OnPause,
    /// Record buffers of finished push tasks, for the next tasks to render into.
    pub buffers: Arc<deliver::Buffers>,
}

/// A run's first fatal error, and whether there ever was one.
#[derive(Default)]
pub struct Fatal {
    error: Mutex<Option<Error>>,
    /// Set with the first error and never cleared: a cluster worker that looks after the
    /// main thread took the error must still see that the run failed, and hold its
    /// connections ([`crate::run::cluster`]). Seen as a hang in the fault harness under load
    /// (seed 171): the worker said it finished, `launch` returned, the error was taken, the
    /// worker then read "not failed" and ended, its connections closed cleanly, and its peer
    /// waited for the progress of a process that had exited.
    ever: AtomicBool,
}

impl Context {
    /// Records `e` unless an earlier fatal error is already recorded.
    pub fn fail(&self, e: Error) {
        if let Ok(mut f) = self.fatal.error.lock() {
            f.get_or_insert(e);
        }
        self.fatal.ever.store(true, Ordering::Release);
    }

    /// Whether a fatal error was recorded (still true once it is taken).
    pub fn failed(&self) -> bool {
        self.fatal.ever.load(Ordering::Acquire)
    }

    /// Whether the generation is being cut short ([`Context::cut`]).
    pub fn is_cut(&self) -> bool {
        self.cut.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether target `t` is a lazy coupon (granted at login, never scanned).
    pub fn is_lazy(&self, t: u32) -> bool {
        self.targets
            .get(t as usize)
            .is_some_and(|rt| rt.target.campaign.is_lazy())
    }

    /// Of `scan_targets`, those bucket `bucket` is scanned for: every target of a whole
    /// audience, and a target of a few held users (a release, an expiry) only where the
    /// bucket holds one of them.
    pub fn targets_for(&self, bucket: u32, scan_targets: &[u32]) -> Vec<u32> {
        // `[lo, hi)`, `hi` up to 2^32.
        let (lo, hi) = self.placement.buckets.bucket_range(bucket);
        let last = u32::try_from(hi.saturating_sub(1)).unwrap_or(u32::MAX);
        let lo = u32::try_from(lo).unwrap_or(u32::MAX);
        scan_targets
            .iter()
            .copied()
            .filter(|&t| match &self.targets[t as usize].only {
                None => true,
                Some(only) => only.range(lo..=last).next().is_some(),
            })
            .collect()
    }

    /// The fatal error recorded, if any, as an `Err` (taken out).
    pub fn take_failure(&self) -> Result<(), Error> {
        match self.fatal.error.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The input handles and probe of one worker's fan-out dataflow.
pub struct Handles {
    /// Bucket scans.
    pub scans: InputHandle<Time, CapacityContainerBuilder<Vec<Scan>>>,
    /// Admitted targets (fan-out campaigns and lazy coupons alike).
    pub admits: InputHandle<Time, CapacityContainerBuilder<Vec<u32>>>,
    /// Pre-existing grants `(target, user)`.
    pub granted: InputHandle<Time, CapacityContainerBuilder<Vec<(u32, u32)>>>,
    /// Login events.
    pub logins: InputHandle<Time, CapacityContainerBuilder<Vec<Login>>>,
    /// Passes time `t` once every push of epochs before `t` is acknowledged.
    pub probe: ProbeHandle<Time>,
}

impl Handles {
    /// Moves every input to epoch `t`.
    pub fn advance_to(&mut self, t: Time) {
        self.scans.advance_to(t);
        self.admits.advance_to(t);
        self.granted.advance_to(t);
        self.logins.advance_to(t);
    }

    /// Closes every input; what is left is the probe.
    pub fn close(self) -> ProbeHandle<Time> {
        self.probe
    }
}

/// Builds the fan-out dataflow in `scope`: bucket scans for fan-out campaigns, logins for lazy
/// coupons, one push operator for both.
pub fn fan_out(scope: Scope<'_, Time>, ctx: Arc<Context>) -> Handles {
    let mut scans = InputHandle::new();
    let mut admits = InputHandle::new();
    let mut logins = InputHandle::new();
    let mut granted = InputHandle::new();
    let placement = ctx.placement;
    let admitted = scope
        .input_from(&mut admits)
        .container::<Vec<u32>>()
        .broadcast()
        .container::<Vec<u32>>();
    let granted_by_bucket = scope
        .input_from(&mut granted)
        .container::<Vec<(u32, u32)>>()
        .exchange(move |(_, user)| placement.exchange_key(*user))
        .map(|(t, u)| Control::Granted(t, u, 1));
    let control = admitted.map(Control::Admit).concat(granted_by_bucket);
    let scan_stream = scope.input_from(&mut scans).container::<Vec<Scan>>();
    let scanned = scan::scan(scan_stream, control.clone(), ctx.clone());

    let login_stream = scope.input_from(&mut logins).container::<Vec<Login>>();
    let at_login = login::grants_at_login(login_stream, control, ctx.clone());

    let (probe, _) = push::push(scanned.concat(at_login), ctx).probe();
    Handles {
        scans,
        admits,
        granted,
        logins,
        probe,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Buckets, Route};
    use timely::dataflow::channels::pact::Exchange as Pact;
    use timely::dataflow::operators::Operator;

    /// What timely's exchange delivers to a worker is what [`Route`] loads there: 4 workers
    /// standing for 2 processes × 2 workers (process `p` has workers `2p, 2p + 1`); and the
    /// same buckets stay with the same process at 2 × 1 workers.
    #[test]
    fn exchanges_deliver_each_bucket_and_user_where_the_loader_keeps_it() {
        let buckets = Buckets::new(7);
        let placement = Placement::new(buckets, 2, 2);
        for b in 0..1000 {
            let one_worker_each = Placement::new(buckets, 2, 1);
            assert_eq!(
                placement.worker_of(b) / 2,
                one_worker_each.worker_of(b),
                "bucket {b} moved to another process with another worker count"
            );
        }
        let misrouted = timely::execute(timely::Config::process(4), move |worker| {
            let index = worker.index();
            let route = Route::process(buckets, 2, index / 2);
            let bad = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            let (mut scans, mut users) = (InputHandle::new(), InputHandle::new());
            worker.dataflow::<u64, _, _>(|scope| {
                let (bad1, bad2) = (bad.clone(), bad.clone());
                scope.input_from(&mut scans).container::<Vec<Scan>>().sink(
                    Pact::new(move |s: &Scan| s.exchange_key(&placement)),
                    "Scans",
                    move |(i, _)| {
                        i.for_each_stamp(|_, data| {
                            for s in data.flatten() {
                                let here = placement.worker_of(s.bucket) == index;
                                if !route.keeps_bucket(s.bucket) || !here {
                                    bad1.borrow_mut().push(u64::from(s.bucket));
                                }
                            }
                        })
                    },
                );
                scope.input_from(&mut users).container::<Vec<u32>>().sink(
                    Pact::new(move |id: &u32| placement.exchange_key(*id)),
                    "Users",
                    move |(i, _)| {
                        i.for_each_stamp(|_, data| {
                            for id in data.flatten() {
                                if !route.keeps(*id) {
                                    bad2.borrow_mut().push(u64::from(*id));
                                }
                            }
                        })
                    },
                );
            });
            if index == 0 {
                for bucket in 0..200 {
                    scans.send(Scan {
                        bucket,
                        targets: Vec::new(),
                    });
                }
                for id in (1..5000).step_by(3).chain([u32::MAX]) {
                    users.send(id);
                }
            }
            drop((scans, users));
            while worker.step() {}
            bad.take()
        })
        .unwrap()
        .join();
        for (w, r) in misrouted.into_iter().enumerate() {
            assert_eq!(
                r.unwrap(),
                Vec::<u64>::new(),
                "worker {w} got records it does not own"
            );
        }
    }
}
