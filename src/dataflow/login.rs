//! Lazy coupons: each login grants every valid, not-yet-granted coupon whose audience matches.
//!
//! ```text
//!  logins ─exchange by bucket┐
//!  admits ──broadcast───────┴─► match: user looked up once, tested against every active
//!                                coupon (window by the event's ts, audience) ─► (coupon, user)
//!      ─► antijoin(granted) ─► consolidate ─► positive updates become candidates ─► push
//! ```
//! The active coupons are few, so every worker holds them all and a login is matched where it
//! lands (a broadcast join); what differential does is the part that must be exact: the
//! matched pairs are a collection, antijoined with the granted ledger and consolidated, so two
//! logins of one user in an epoch, or a pair granted before, never reach the claim twice.
//! A pair enters at the login's epoch and leaves at the next, which keeps every trace one
//! epoch deep; only its entry (a positive update) becomes a grant. Across epochs the store's
//! atomic claim decides: a later login of a granted user finds the claim taken.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;

use super::{Candidate, Candidates, Context, Time};
use crate::audience::AudienceFilter;
use crate::model::{CouponDelivery, Kind};
use crate::sources::logins::Login;

/// A (coupon target, user) pair as a differential update.
pub type PairUpdate = ((u32, u32), Time, isize);

/// Matches logins against the active lazy coupons admitted on `admits`.
pub fn match_logins<'s>(
    logins: Stream<'s, Time, Vec<Login>>,
    admits: Stream<'s, Time, Vec<u32>>,
    ctx: Arc<Context>,
) -> VecCollection<'s, Time, (u32, u32), isize> {
    // To the worker holding the user's bucket: in a cluster only that process loaded the user.
    let placement = ctx.placement;
    let by_bucket = Exchange::new(move |l: &Login| placement.exchange_key(l.user));
    logins
        .binary_frontier::<_, CapacityContainerBuilder<Vec<PairUpdate>>, _, _, _, _>(
            admits,
            by_bucket,
            Pipeline,
            "MatchLogins",
            move |_cap, _info| {
                let mut active: Vec<(u32, AudienceFilter, i64, i64)> = Vec::new();
                let mut admitted: BTreeMap<Time, Vec<u32>> = BTreeMap::new();
                let mut waiting: BTreeMap<Time, (Capability<Time>, Vec<Login>)> = BTreeMap::new();
                move |(login_in, _), (admit_in, admit_frontier), output| {
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
                    admit_in.for_each_stamp(|cap, data| {
                        if let Some(t) = cap.least() {
                            let stash = admitted.entry(*t).or_default();
                            for batch in data {
                                stash.append(batch);
                            }
                        }
                    });
                    while let Some(entry) = waiting.first_entry() {
                        let time = *entry.key();
                        if admit_frontier.less_equal(&time) {
                            break; // coupons admitted at `time` may still arrive
                        }
                        while let Some(ready) = admitted.first_entry() {
                            if *ready.key() > time {
                                break;
                            }
                            for t in ready.remove() {
                                if let Some(coupon) = lazy_coupon(&ctx, t) {
                                    active.push(coupon);
                                }
                            }
                        }
                        let (cap, logins) = entry.remove();
                        let mut session = output.session(&cap);
                        for login in logins {
                            let mut known = false;
                            ctx.source.for_each_in(
                                u64::from(login.user),
                                u64::from(login.user) + 1,
                                |user| {
                                    known = true;
                                    for (t, filter, start, end) in &active {
                                        if (*start..*end).contains(&login.ts_ms)
                                            && filter.matches(&user)
                                        {
                                            // In at this epoch, out at the next: traces stay one epoch deep.
                                            session.give(((*t, login.user), time, 1));
                                            session.give(((*t, login.user), time + 1, -1));
                                        }
                                    }
                                },
                            );
                            let counter = if known {
                                &ctx.metrics.count.logins
                            } else {
                                &ctx.metrics.count.logins_unknown
                            };
                            counter.fetch_add(1, Relaxed);
                        }
                    }
                }
            },
        )
        .as_collection()
}

/// Target `t` as an active lazy coupon: its audience and window, if it is one.
fn lazy_coupon(ctx: &Context, t: u32) -> Option<(u32, AudienceFilter, i64, i64)> {
    let c = &ctx.targets.get(t as usize)?.target.campaign;
    let lazy = c.kind == Kind::Coupon && c.coupon.as_ref()?.delivery == CouponDelivery::OnLogin;
    lazy.then(|| {
        (
            t,
            AudienceFilter::compile(&c.audience, ctx.source.tags()),
            c.start.timestamp_millis(),
            c.end.timestamp_millis(),
        )
    })
}

/// The grants lazy coupons make: newly matched pairs not in `granted`, consolidated.
pub fn grants_at_login<'s>(
    matched: VecCollection<'s, Time, (u32, u32), isize>,
    granted: VecCollection<'s, Time, (u32, u32), isize>,
) -> VecCollection<'s, Time, (u32, u32), isize> {
    matched
        .map(|pair| (pair, ()))
        .antijoin(granted)
        .map(|(pair, ())| pair)
        .consolidate()
}

/// Turns the positive updates of `grants` into candidate batches for the push operator.
pub fn candidates<'s>(
    grants: VecCollection<'s, Time, (u32, u32), isize>,
    ctx: Arc<Context>,
) -> Stream<'s, Time, Vec<Candidates>> {
    // The antijoin left each pair on the worker its hash chose; the user's record (and the
    // push of its bucket) is on the worker of its bucket.
    let placement = ctx.placement;
    let by_bucket =
        Exchange::new(move |((_, user), _, _): &PairUpdate| placement.exchange_key(*user));
    grants
        .inner
        .unary::<CapacityContainerBuilder<Vec<Candidates>>, _, _, _>(
            by_bucket,
            "LoginGrants",
            move |_cap, _info| {
                move |input, output| {
                    input.for_each_stamp(|cap, data| {
                        let mut by_target: HashMap<u32, Vec<Candidate>> = HashMap::new();
                        for batch in data {
                            for ((t, user), _time, diff) in batch.drain(..) {
                                if diff <= 0 {
                                    continue; // a pair leaving: nothing to do
                                }
                                ctx.source
                                    .for_each_in(u64::from(user), u64::from(user) + 1, |u| {
                                        by_target.entry(t).or_default().push(Candidate {
                                            id: u.id,
                                            level: u.level,
                                            points: u.points,
                                        });
                                    });
                            }
                        }
                        let mut session = output.session(&cap);
                        for (target, mut users) in by_target {
                            users.sort_unstable_by_key(|c| c.id);
                            users.dedup_by_key(|c| c.id);
                            session.give(Candidates { target, users });
                        }
                    });
                }
            },
        )
}
