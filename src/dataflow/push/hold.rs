//! What the push operator's queues give up or hold back: everything on a graceful stop, the
//! lanes below transactional in a generation cut short, and a paused campaign's candidates.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use super::{capped_work, Epoch, Parked, Queue, Work, LANES};
use crate::dataflow::halts::{Halt, OnPause};
use crate::dataflow::{Candidates, Context, Time};
use crate::model::Priority;

/// Drops queued work that must not be claimed now: everything on a graceful stop (left for
/// the next run; each epoch completes once its tasks under way are acknowledged), and in a
/// generation cut short the fan-out work of the lanes below transactional (left unclaimed for
/// the next generation; login grants, whose stream entries are acknowledged with the epoch,
/// are kept).
pub(super) fn shed(
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
pub(super) fn park(
    ctx: &Context,
    entry: (Time, Candidates, Instant),
    parked: &mut Parked,
) -> usize {
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
/// target's to be settled as cancelled when it is claimed (`task::SetApart::decide`). Each
/// epoch's count of queued entries follows.
pub(super) fn repark(
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
        if let Some((lane, work)) = capped_work(ctx, members) {
            recount(time, work.len(), 0);
            for w in work {
                queues[lane].push_back((time, w, ready));
            }
        }
    }
}
