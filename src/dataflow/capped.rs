//! Frequency-capped candidates cut into push tasks ([`super::push`]). A user's capped offers
//! are claimed together, in the run's decision order ([`crate::store::claim_capped`]), so the
//! candidates of the capped targets that reach the push operator together are cut at user ids,
//! never between two offers to one user.

use super::{Candidate, Candidates};

/// One capped target's candidates: its index and its batches (each in id order).
pub type Member = (u32, Vec<Vec<Candidate>>);

/// `members` (in the run's decision order) cut into entries before every `per`-th distinct
/// user, `per` being `task_users` shared among the members: each entry holds one member per
/// target with users in it, in the same order, each with its users in id order.
///
/// Each user is copied once, into its entry: concatenating a stretch's worth of candidates
/// first (half a megabyte) and cutting it up copied them twice, and the big list was
/// allocated, faulted in and handed back to the system every time.
pub fn cut(members: Vec<Member>, task_users: usize) -> Vec<Vec<Candidates>> {
    if members.is_empty() {
        return Vec::new();
    }
    let per = (task_users / members.len()).max(1);
    let (members, cuts) = match <[Member; 1]>::try_from(members) {
        Ok([(target, batches)]) if strictly_ascending(&batches) => {
            let cuts = every_nth(&batches, per);
            (vec![(target, batches)], cuts)
        }
        Ok([one]) => with_cuts(vec![one], per),
        Err(members) => with_cuts(members, per),
    };
    let mut entries: Vec<Vec<Candidates>> = vec![Vec::new(); cuts.len() + 1];
    for (target, batches) in members {
        let mut entry = 0;
        let mut part: Vec<Candidate> = Vec::new();
        for batch in &batches {
            let mut rest = batch.as_slice();
            while !rest.is_empty() {
                let n = match cuts.get(entry) {
                    Some(&cut) => rest.partition_point(|u| u.id < cut),
                    None => rest.len(),
                };
                if part.is_empty() {
                    part.reserve(per);
                }
                part.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if !rest.is_empty() {
                    // The rest lies at or past the entry's end.
                    if !part.is_empty() {
                        let users = std::mem::take(&mut part);
                        entries[entry].push(Candidates { target, users });
                    }
                    entry += 1;
                }
            }
        }
        if !part.is_empty() {
            entries[entry].push(Candidates {
                target,
                users: part,
            });
        }
    }
    entries.retain(|e| !e.is_empty());
    entries
}

/// Whether the batches together hold strictly ascending ids (one target's usually do: each
/// is one scan stretch, and they come in order).
pub fn strictly_ascending(batches: &[Vec<Candidate>]) -> bool {
    batches
        .iter()
        .all(|b| b.windows(2).all(|w| w[0].id < w[1].id))
        && batches
            .iter()
            .filter_map(|b| Some((b.first()?.id, b.last()?.id)))
            .collect::<Vec<_>>()
            .windows(2)
            .all(|w| w[0].1 < w[1].0)
}

/// The ids at positions `per`, `2 per`, … of the batches together.
fn every_nth(batches: &[Vec<Candidate>], per: usize) -> Vec<u32> {
    let mut cuts = Vec::new();
    let (mut next, mut from) = (per, 0);
    for batch in batches {
        while next < from + batch.len() {
            cuts.push(batch[next - from].id);
            next += per;
        }
        from += batch.len();
    }
    cuts
}

/// `members` each in id order, and the ids at positions `per`, `2 per`, … of their distinct
/// ids.
fn with_cuts(members: Vec<Member>, per: usize) -> (Vec<Member>, Vec<u32>) {
    let members: Vec<Member> = members
        .into_iter()
        .map(|(target, batches)| (target, in_id_order(batches)))
        .collect();
    let mut ids: Vec<u32> = members
        .iter()
        .flat_map(|(_, batches)| batches.iter().flatten().map(|u| u.id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let cuts = ids.into_iter().skip(per).step_by(per).collect();
    (members, cuts)
}

/// The batches as they are if together in id order, else as one sorted batch.
fn in_id_order(batches: Vec<Vec<Candidate>>) -> Vec<Vec<Candidate>> {
    if batches.iter().flatten().is_sorted_by_key(|u| u.id) {
        return batches;
    }
    let mut users: Vec<Candidate> = batches.into_iter().flatten().collect();
    users.sort_unstable_by_key(|u| u.id);
    vec![users]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: u32) -> Candidate {
        Candidate {
            id,
            level: (id % 7) as u8,
            points: u64::from(id) * 3,
        }
    }

    /// The rule read directly: every member's users merged and sorted, cut before every
    /// `per`-th distinct id.
    fn naive(members: &[Member], task_users: usize) -> Vec<Vec<Candidates>> {
        let per = (task_users / members.len().max(1)).max(1);
        let sorted: Vec<(u32, Vec<Candidate>)> = members
            .iter()
            .map(|(t, batches)| {
                let mut users: Vec<Candidate> = batches.iter().flatten().copied().collect();
                users.sort_by_key(|u| u.id);
                (*t, users)
            })
            .collect();
        let mut ids: Vec<u32> = sorted
            .iter()
            .flat_map(|(_, u)| u.iter().map(|u| u.id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut bounds: Vec<Option<u32>> = vec![None];
        bounds.extend(ids.iter().skip(per).step_by(per).map(|&id| Some(id)));
        bounds.push(None);
        bounds
            .windows(2)
            .map(|w| {
                let inside =
                    |id: u32| w[0].is_none_or(|lo| id >= lo) && w[1].is_none_or(|hi| id < hi);
                sorted
                    .iter()
                    .map(|(t, users)| Candidates {
                        target: *t,
                        users: users.iter().copied().filter(|u| inside(u.id)).collect(),
                    })
                    .filter(|c| !c.users.is_empty())
                    .collect::<Vec<_>>()
            })
            .filter(|e| !e.is_empty())
            .collect()
    }

    #[test]
    fn cuts_as_the_rule_says_whatever_the_batches() {
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1du64);
        for round in 0..2_000 {
            let task_users = 1 + next(40) as usize;
            let members: Vec<Member> = (0..1 + next(3))
                .map(|t| {
                    let mut from = next(20) as u32;
                    let batches = (0..next(5))
                        .map(|_| {
                            // In order and strictly ascending, mostly; now and then repeats
                            // or a batch that starts before the last one ended.
                            if next(4) == 0 {
                                from = from.saturating_sub(next(30) as u32);
                            }
                            let mut ids: Vec<u32> = (0..next(30))
                                .map(|_| {
                                    from += u32::from(next(5) != 0) + next(3) as u32;
                                    from
                                })
                                .collect();
                            if next(8) == 0 {
                                ids.sort_unstable_by_key(|&id| std::cmp::Reverse(id));
                            }
                            ids.into_iter().map(user).collect()
                        })
                        .collect();
                    (t as u32 * 7, batches)
                })
                .collect();
            let want = naive(&members, task_users);
            assert_eq!(
                cut(members.clone(), task_users),
                want,
                "round {round}: {members:?}"
            );
            let sizes = want
                .iter()
                .map(|e| e.iter().map(|c| c.users.len()).sum::<usize>());
            assert!(sizes.clone().all(|n| n > 0), "round {round}");
        }
    }

    #[test]
    fn one_targets_stretches_in_order_are_cut_into_entries_of_task_users() {
        let batches: Vec<Vec<Candidate>> = (0..10u32)
            .map(|b| (b * 1000..b * 1000 + 900).map(user).collect())
            .collect();
        let entries = cut(vec![(3, batches)], 3200);
        let sizes: Vec<usize> = entries.iter().map(|e| e[0].users.len()).collect();
        assert_eq!(sizes, [3200, 3200, 2600]);
        assert!(entries.iter().all(|e| e.len() == 1 && e[0].target == 3));
        assert_eq!(entries[1][0].users[0].id, 3_500);
    }
}
