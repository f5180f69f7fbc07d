//! Ids as runs of consecutive ids: how the ledger finds them in a batch, tests them against
//! a set and joins them across the gaps a set holds. The engine's batches are id-ordered,
//! so a dense population's are one run and a policy job's runs of about ten.

use std::ops::RangeInclusive;

use roaring::RoaringBitmap;

/// `ids` as one run of consecutive ascending ids, if they are one: an id-ordered batch of a
/// densely numbered population is. One pass with no early exit, which the compiler turns
/// into vector compares: a few hundred nanoseconds for a push task's ids.
pub fn run_of(ids: &[u32]) -> Option<RangeInclusive<u32>> {
    let (&first, &last) = (ids.first()?, ids.last()?);
    // Every step +1 (wrapping) and the span as long as the ids: no step wrapped.
    let steps =
        (ids[1..].iter().zip(ids)).fold(true, |ok, (next, id)| ok & (next.wrapping_sub(*id) == 1));
    let span = u64::from(last).checked_sub(u64::from(first))? + 1;
    (steps && span == ids.len() as u64).then_some(first..=last)
}

/// `ids`, in their order, as runs of consecutive ascending ids: the ids again, one after
/// another, when the runs are expanded (an id with no neighbour one above or below it is a
/// run of one). Any ids: the way to hand a list to what takes runs.
pub fn runs_in(ids: &[u32]) -> Vec<RangeInclusive<u32>> {
    ids.chunk_by(|a, b| a.checked_add(1) == Some(*b))
        .map(|run| run[0]..=run[run.len() - 1])
        .collect()
}

/// How many ids `runs` hold.
pub fn ids_in(runs: &[RangeInclusive<u32>]) -> u64 {
    (runs.iter().filter(|r| !r.is_empty()))
        .map(|r| u64::from(*r.end()) + 1 - u64::from(*r.start()))
        .sum()
}

/// Ids of a run [`runs_of`] steps through before it gallops.
const SHORT_RUN: usize = 16;

/// `ids` as runs of consecutive ids, if they are strictly ascending and make at most `max`
/// runs: a push task's ids (the users of a few buckets of one worker) are a few runs, and a
/// task's sends once policy set a tenth of them apart are runs of about ten. One pass with no
/// early exit checks the order (vector compares, as in [`run_of`]); strictly ascending ids
/// spanning as many values as there are ids are one run, and otherwise each run's end is
/// found by stepping through its first ids, then galloping and bisection (no more runs are
/// looked for than `max`), since in strictly ascending ids `ids[j] - ids[i] == j - i` holds
/// exactly while `ids[i..=j]` is a run.
pub fn runs_of(ids: &[u32], max: usize) -> Option<Vec<RangeInclusive<u32>>> {
    let (first, last) = (*ids.first()?, *ids.last()?);
    let ascending = (ids[1..].iter().zip(ids)).fold(true, |ok, (next, id)| ok & (next > id));
    if !ascending || max == 0 {
        return None;
    }
    if u64::from(last - first) + 1 == ids.len() as u64 {
        return Some(vec![first..=last]);
    }
    let mut runs = Vec::with_capacity(max.min(64));
    let mut rest = ids;
    while let Some(&start) = rest.first() {
        if runs.len() == max {
            return None;
        }
        // Whether rest[..=i] is a run.
        let run_to = |i: usize| u64::from(rest[i] - start) == i as u64;
        // rest[..lo] is a run. A short one (a task's sends once policy set a tenth of its
        // users apart) ends within a few steps; a run still going after them is galloped
        // over, then bisected (the run ends before `hi`).
        let steps = rest.len().min(SHORT_RUN);
        let mut lo = 1;
        while lo < steps && run_to(lo) {
            lo += 1;
        }
        if lo == steps {
            let mut probe = lo;
            while probe < rest.len() && run_to(probe) {
                lo = probe + 1;
                probe *= 2;
            }
            let mut hi = probe.min(rest.len());
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if run_to(mid) {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
        }
        runs.push(start..=rest[lo - 1]);
        rest = &rest[lo..];
    }
    Some(runs)
}

/// Whether `set` holds no id of ascending, disjoint `runs`, and the runs joined across every
/// gap `set` holds whole: `None` if `set` holds an id of a run, else the joined ranges. Where a set holds every id of the
/// set walked (the ledger's claimed set holds its done set, which holds each settled tag),
/// inserting the joined ranges into it adds exactly the runs' ids — one range where policy set
/// a few users of a task apart (the gaps: ids the ledger settled as held out a moment before)
/// instead of one a run, which was the most of a policy run's marks and claims. One walk of
/// the set's ids over the runs' span: a step per id of a gap, a seek where a gap is not held;
/// past the set's last id, nothing to walk.
pub fn joined_runs(
    runs: &[RangeInclusive<u32>],
    set: &RoaringBitmap,
) -> Option<Vec<RangeInclusive<u32>>> {
    let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
        return Some(Vec::new());
    };
    if set.max().is_none_or(|max| max < *first.start()) {
        return Some(runs.to_vec());
    }
    let mut ids = set.range(*first.start()..=*last.end());
    // The set's least id past every id walked so far.
    let mut next = ids.next();
    let mut joined: Vec<RangeInclusive<u32>> = Vec::with_capacity(runs.len());
    for run in runs {
        let (start, end) = (*run.start(), *run.end());
        // Whether the set holds the whole gap from the run before (runs ascend: no overflow).
        let mut held = false;
        if let Some(before) = joined.last() {
            let mut gap = before.end() + 1;
            while gap < start && next == Some(gap) {
                next = ids.next();
                gap += 1;
            }
            held = gap == start;
        }
        if next.is_some_and(|id| id < start) {
            ids.advance_to(start);
            next = ids.next();
        }
        if next.is_some_and(|id| id <= end) {
            return None;
        }
        match joined.last_mut() {
            Some(before) if held => *before = *before.start()..=end,
            _ => joined.push(run.clone()),
        }
    }
    Some(joined)
}
