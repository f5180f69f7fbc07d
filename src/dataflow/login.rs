//! Lazy coupons: each login grants every valid, not-yet-granted coupon whose audience matches.
//!
//! ```text
//!  logins ──exchange by bucket──┐
//!  control (admits, granted) ───┴─► match: user looked up once, tested against every active
//!                                   coupon (window by the event's ts, audience), pairs
//!                                   granted or settled dropped ─► candidates ─► push
//! ```
//! A login goes to the worker that owns its user's bucket ([`crate::model::Placement`]), and
//! so do the granted pairs of that user (the control stream is routed like the scan's). So
//! one worker sees every login and every pre-existing grant of a user, and keeps per coupon
//! two roaring bitmaps: the pairs the `granted` input names, and the pairs the store's claim
//! would refuse — done in the store when the coupon was admitted (the embedded store hands
//! that set over as a copy), or proposed in this run. A pair is proposed at most once per run:
//! two logins of one user in an epoch or in two epochs never reach the claim twice, and a
//! later one (or one of a pair already done) is counted as already granted, which is what the
//! claim would answer. The claim stays the arbiter against other runs and for pairs in flight
//! at a crash. No differential arrangement is needed: the state is a few bits per (coupon,
//! user) on the worker of that user.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use roaring::RoaringBitmap;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;

use super::{Candidate, Candidates, Context, Control, Time};
use crate::audience::AudienceFilter;
use crate::sources::logins::Login;

/// An admitted lazy coupon: what a login is tested against.
struct Active {
    /// Index into [`Context::targets`].
    target: u32,
    filter: AudienceFilter,
    /// Its window, ms since the epoch, `[start, end)`.
    start: i64,
    end: i64,
}

/// What the operator remembers of a lazy coupon's pairs on this worker.
#[derive(Default)]
struct Pairs {
    /// Granted before the run (the `granted` input): never granted again, not counted.
    granted: RoaringBitmap,
    /// Pairs the store's claim would refuse: done in the store when the coupon was admitted
    /// (where the store can tell cheaply, [`crate::store::Ledger::done_now`]), or proposed to
    /// the claim in an earlier epoch of this run. Counted as already granted.
    settled: RoaringBitmap,
}

/// Matches `logins` against the lazy coupons admitted on `control` and emits the new pairs as
/// candidate batches for the push operator, per epoch, in id order.
pub fn grants_at_login<'s>(
    logins: Stream<'s, Time, Vec<Login>>,
    control: Stream<'s, Time, Vec<Control>>,
    ctx: Arc<Context>,
) -> Stream<'s, Time, Vec<Candidates>> {
    // To the worker holding the user's bucket: in a cluster only that process loaded the user.
    let placement = ctx.placement;
    let by_bucket = Exchange::new(move |l: &Login| placement.exchange_key(l.user));
    logins.binary_frontier::<_, CapacityContainerBuilder<Vec<Candidates>>, _, _, _, _>(
        control,
        by_bucket,
        Pipeline,
        "GrantsAtLogin",
        move |_cap, _info| {
            let mut active: Vec<Active> = Vec::new();
            let mut pairs: HashMap<u32, Pairs> = HashMap::new();
            let mut controls: BTreeMap<Time, Vec<Control>> = BTreeMap::new();
            let mut waiting: BTreeMap<Time, (Capability<Time>, Vec<Login>)> = BTreeMap::new();
            move |(login_in, _), (control_in, control_frontier), output| {
                login_in.for_each_stamp(|cap, data| {
                    if let Some(cap) = cap.retain_least(0) {
                        let stash = &mut waiting
                            .entry(*cap.time())
                            .or_insert_with(|| (cap, Vec::new()))
                            .1;
                        for batch in data {
                            stash.append(batch);
                        }
                    }
                });
                control_in.for_each_stamp(|cap, data| {
                    if let Some(t) = cap.least() {
                        let stash = controls.entry(*t).or_default();
                        for batch in data {
                            stash.append(batch);
                        }
                    }
                });
                while let Some(entry) = waiting.first_entry() {
                    let time = *entry.key();
                    if control_frontier.less_equal(&time) {
                        break; // admits or grants for `time` may still arrive
                    }
                    while let Some(ready) = controls.first_entry() {
                        if *ready.key() > time {
                            break;
                        }
                        for c in ready.remove() {
                            apply(&ctx, &mut active, &mut pairs, c);
                        }
                    }
                    let (cap, logins) = entry.remove();
                    let found = match_epoch(&ctx, &active, &mut pairs, &logins);
                    if !found.is_empty() {
                        output.session(&cap).give_iterator(found.into_iter());
                    }
                }
            }
        },
    )
}

/// Applies one control record: an admit of a lazy coupon activates it; a grant (or its
/// withdrawal) of a lazy coupon's pair is remembered. Fan-out targets are the scan's.
fn apply(ctx: &Context, active: &mut Vec<Active>, pairs: &mut HashMap<u32, Pairs>, c: Control) {
    match c {
        Control::Admit(t) => {
            if let Some(coupon) = lazy_coupon(ctx, t) {
                let p = pairs.entry(t).or_default();
                if let Some(done) = ctx.targets[t as usize].ledger.done_now() {
                    p.settled |= done;
                }
                active.push(coupon);
            }
        }
        Control::Granted(t, user, diff) => {
            if ctx.is_lazy(t) {
                let granted = &mut pairs.entry(t).or_default().granted;
                if diff > 0 {
                    granted.insert(user);
                } else {
                    granted.remove(user);
                }
            }
        }
    }
}

/// One epoch's logins against the active coupons: the pairs neither granted before the run
/// nor settled, as candidate batches in id order.
fn match_epoch(
    ctx: &Context,
    active: &[Active],
    pairs: &mut HashMap<u32, Pairs>,
    logins: &[Login],
) -> Vec<Candidates> {
    let mut found: Vec<Vec<Candidate>> = vec![Vec::new(); active.len()];
    let mut known = 0u64;
    for login in logins {
        let user = u64::from(login.user);
        ctx.source.for_each_in(user, user + 1, |u| {
            known += 1;
            for (k, coupon) in active.iter().enumerate() {
                if (coupon.start..coupon.end).contains(&login.ts_ms) && coupon.filter.matches(&u) {
                    found[k].push(Candidate::of(&u));
                }
            }
        });
    }
    let counts = &ctx.metrics.count;
    counts.logins.fetch_add(known, Relaxed);
    counts
        .logins_unknown
        .fetch_add(logins.len() as u64 - known, Relaxed);
    let pairs_here = logins.len() as u64 * active.len() as u64;
    let mut out = Vec::new();
    for (coupon, mut users) in active.iter().zip(found) {
        if users.is_empty() {
            continue;
        }
        users.sort_unstable_by_key(|c| c.id);
        users.dedup_by_key(|c| c.id);
        let Some(p) = pairs.get_mut(&coupon.target) else {
            continue;
        };
        let mut repeated = 0u64;
        users.retain(|c| {
            if p.granted.contains(c.id) {
                false
            } else if p.settled.contains(c.id) {
                repeated += 1;
                false
            } else {
                true
            }
        });
        if repeated > 0 {
            ctx.targets[coupon.target as usize]
                .stats
                .already_granted
                .fetch_add(repeated, Relaxed);
        }
        if users.is_empty() {
            continue;
        }
        p.settled.extend(users.iter().map(|c| c.id));
        out.push(Candidates {
            target: coupon.target,
            users,
        });
    }
    // Every pair of a login and an active coupon not handed on is settled here.
    let proposed: u64 = out.iter().map(|c| c.users.len() as u64).sum();
    counts
        .pairs_settled
        .fetch_add(pairs_here.saturating_sub(proposed), Relaxed);
    out
}

/// Target `t` as an active lazy coupon: its audience and window, if it is one.
fn lazy_coupon(ctx: &Context, t: u32) -> Option<Active> {
    if !ctx.is_lazy(t) {
        return None;
    }
    let c = &ctx.targets[t as usize].target.campaign;
    Some(Active {
        target: t,
        filter: AudienceFilter::compile(&c.audience, ctx.source.tags()),
        start: c.start.timestamp_millis(),
        end: c.end.timestamp_millis(),
    })
}
