//! The scan operator: bucket scans in, per-campaign candidate batches out.
//!
//! Buckets arrive exchanged by bucket id, so each worker expands only its own buckets. Every
//! user of a bucket is loaded once and tested against each campaign the scan names; pairs the
//! `granted` input names (kept per campaign as a roaring bitmap, routed here by the same bucket
//! function) are dropped and counted. A scan at time `t` waits until the control input is
//! complete through `t`, so every admit and grant fed before it is known. At most
//! [`USERS_PER_ACTIVATION`] users are expanded per activation; the operator then re-activates
//! itself, so memory stays flat and other operators get their turn.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use roaring::RoaringBitmap;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;

use super::{Candidate, Candidates, Context, Control, Scan, Time};
use crate::audience::AudienceFilter;
use crate::model::UserRef;

/// Users expanded per activation, at most (roughly: a stretch is finished once started).
pub const USERS_PER_ACTIVATION: u64 = 1 << 15;
/// Ids of a bucket expanded in one stretch.
const IDS_PER_STRETCH: u64 = 1 << 13;
/// What an empty stretch costs against the budget, so sparse buckets also yield.
const EMPTY_STRETCH_COST: u64 = 256;

/// What the scan operator knows of a target.
#[derive(Default)]
struct Known {
    /// Its audience, once admitted.
    filter: Option<AudienceFilter>,
    /// Users granted it before fanout existed.
    granted: RoaringBitmap,
}

/// What the control input said, by target, and what it said for times not yet scanned.
struct Controls {
    known: Vec<Known>,
    /// Control records by time, applied once a scan of that time (or later) runs.
    stashed: BTreeMap<Time, Vec<Control>>,
}

impl Controls {
    fn new(targets: usize) -> Self {
        let mut known = Vec::new();
        known.resize_with(targets, Known::default);
        Controls {
            known,
            stashed: BTreeMap::new(),
        }
    }

    /// Applies every stashed record of a time at or before `time`.
    fn apply_through(&mut self, ctx: &Context, time: Time) {
        while let Some(ready) = self.stashed.first_entry() {
            if *ready.key() > time {
                break;
            }
            for c in ready.remove() {
                apply(ctx, &mut self.known, c);
            }
        }
    }
}

/// Expands `scans` against the targets admitted on `control`.
pub fn scan<'s>(
    scans: Stream<'s, Time, Vec<Scan>>,
    control: Stream<'s, Time, Vec<Control>>,
    ctx: Arc<Context>,
) -> Stream<'s, Time, Vec<Candidates>> {
    let scope = scans.scope();
    let placement = ctx.placement;
    let by_bucket = Exchange::new(move |s: &Scan| s.exchange_key(&placement));
    scans.binary_frontier::<_, CapacityContainerBuilder<Vec<Candidates>>, _, _, _, _>(
        control,
        by_bucket,
        Pipeline,
        "Scan",
        move |_cap, info| {
            let activator = scope.activator_for(info.address.clone());
            let mut controls = Controls::new(ctx.targets.len());
            let mut work: BTreeMap<Time, (Capability<Time>, VecDeque<Scan>)> = BTreeMap::new();
            // The next id to expand in the front scan of the oldest time.
            let mut cursor: u64 = 0;

            move |(scan_in, _), (control_in, control_frontier), output| {
                scan_in.for_each_stamp(|cap, data| {
                    if let Some(cap) = cap.retain_least(0) {
                        let queue = &mut work
                            .entry(*cap.time())
                            .or_insert_with(|| (cap, VecDeque::new()))
                            .1;
                        data.for_each(|batch| queue.extend(batch.drain(..)));
                    }
                });
                control_in.for_each_stamp(|cap, data| {
                    if let Some(t) = cap.least() {
                        let stash = controls.stashed.entry(*t).or_default();
                        data.for_each(|batch| stash.append(batch));
                    }
                });

                let mut budget = USERS_PER_ACTIVATION;
                while budget > 0 {
                    let Some(mut entry) = work.first_entry() else {
                        break;
                    };
                    let time = *entry.key();
                    if control_frontier.less_equal(&time) {
                        break; // admits or grants for `time` may still arrive
                    }
                    controls.apply_through(&ctx, time);
                    let (cap, queue) = entry.get_mut();
                    let Some(scan) = queue.front() else {
                        entry.remove();
                        continue;
                    };
                    let (from, to, last) = stretch(&ctx, scan, cursor);
                    let (visited, found) = expand(&ctx, &controls.known, scan, from, to);
                    if !found.is_empty() {
                        output.session(&*cap).give_iterator(found.into_iter());
                    }
                    budget = budget.saturating_sub(visited.max(EMPTY_STRETCH_COST));
                    cursor = if last { 0 } else { to };
                    if last {
                        queue.pop_front();
                        ctx.metrics.count.buckets.fetch_add(1, Relaxed);
                    }
                    if queue.is_empty() {
                        entry.remove();
                    }
                }
                // More to scan now: come back (others get their turn in between).
                if work
                    .keys()
                    .next()
                    .is_some_and(|t| !control_frontier.less_equal(t))
                {
                    activator.activate();
                }
            }
        },
    )
}

/// Which candidate batch of the scan holds `id`: its bucket and the stretch of it (what
/// `plan` counts provider batches by, as `run` cuts them).
pub fn stretch_of(buckets: &crate::model::Buckets, id: u32) -> (u32, u64) {
    let bucket = buckets.bucket_of(id);
    let (lo, _) = buckets.bucket_range(bucket);
    (bucket, (u64::from(id) - lo) / IDS_PER_STRETCH)
}

/// The next stretch of `scan`'s bucket from `cursor`: ids `[from, to)`, and whether it is the
/// bucket's last.
fn stretch(ctx: &Context, scan: &Scan, cursor: u64) -> (u64, u64, bool) {
    let (lo, hi) = ctx.placement.buckets.bucket_range(scan.bucket);
    let from = lo.max(cursor);
    let to = hi.min(from + IDS_PER_STRETCH);
    (from, to, to >= hi)
}

/// Applies one control record. A grant may arrive before its target's admit: both are kept.
fn apply(ctx: &Context, known: &mut [Known], c: Control) {
    match c {
        Control::Admit(t) => {
            if let (Some(k), Some(rt)) = (known.get_mut(t as usize), ctx.targets.get(t as usize)) {
                k.filter = Some(AudienceFilter::compile(
                    &rt.target.campaign.audience,
                    ctx.source.tags(),
                ));
            }
        }
        Control::Granted(t, user, diff) => {
            if let Some(k) = known.get_mut(t as usize) {
                if diff > 0 {
                    k.granted.insert(user);
                } else {
                    k.granted.remove(user);
                }
            }
        }
    }
}

/// One target a stretch is tested against: its audience, the users granted it before
/// fanout existed (`None` if nobody), and what the stretch found for it.
struct Offer<'a> {
    target: u32,
    filter: &'a AudienceFilter,
    granted: Option<&'a RoaringBitmap>,
    found: Vec<Candidate>,
    already: u64,
}

impl Offer<'_> {
    /// Tests `user`: in the audience and not granted before, a candidate.
    #[inline(always)]
    fn test(&mut self, user: &UserRef<'_>) {
        if !self.filter.matches(user) {
            return;
        }
        if self.granted.is_some_and(|g| g.contains(user.id)) {
            self.already += 1;
        } else {
            self.found.push(Candidate::of(user));
        }
    }
}

/// Expands ids `[from, to)` of `scan`'s bucket: one pass over the users, every named target
/// tested against each. Returns the users visited and the candidates per target.
fn expand(
    ctx: &Context,
    known: &[Known],
    scan: &Scan,
    from: u64,
    to: u64,
) -> (u64, Vec<Candidates>) {
    let mut offers: Vec<Offer<'_>> = scan
        .targets
        .iter()
        .filter_map(|&t| {
            let k = known.get(t as usize)?;
            let filter = k.filter.as_ref().filter(|f| !f.is_impossible())?;
            Some(Offer {
                target: t,
                filter,
                granted: (!k.granted.is_empty()).then_some(&k.granted),
                // Room for every id of the stretch: grown once, not doubled along the way.
                found: Vec::with_capacity((to - from) as usize),
                already: 0,
            })
        })
        .collect();
    if offers.is_empty() {
        return (0, Vec::new());
    }
    let mut visited = 0u64;
    // One target (the usual case) gets a loop of its own, with the test inlined in it; one
    // that every user is a candidate of (no audience, no earlier grants) a loop with no test.
    match offers.as_mut_slice() {
        [one] if one.filter.is_everyone() && one.granted.is_none() => {
            ctx.source.for_each_in(from, to, |user| {
                visited += 1;
                one.found.push(Candidate::of(&user));
            })
        }
        [one] => ctx.source.for_each_in(from, to, |user| {
            visited += 1;
            one.test(&user);
        }),
        many => ctx.source.for_each_in(from, to, |user| {
            visited += 1;
            many.iter_mut().for_each(|o| o.test(&user));
        }),
    }
    ctx.metrics.count.users_scanned.fetch_add(visited, Relaxed);
    let candidates: u64 = offers.iter().map(|o| o.found.len() as u64).sum();
    ctx.metrics
        .count
        .pairs_settled
        .fetch_add(visited * offers.len() as u64 - candidates, Relaxed);
    for o in offers.iter().filter(|o| o.already > 0) {
        ctx.targets[o.target as usize]
            .stats
            .already_granted
            .fetch_add(o.already, Relaxed);
    }
    let out = offers
        .into_iter()
        .filter(|o| !o.found.is_empty())
        .map(|mut o| {
            // A narrow audience's batch waits in the push queue: it keeps only what it holds.
            if o.found.len() < o.found.capacity() / 4 {
                o.found.shrink_to_fit();
            }
            Candidates {
                target: o.target,
                users: o.found,
            }
        })
        .collect();
    (visited, out)
}
