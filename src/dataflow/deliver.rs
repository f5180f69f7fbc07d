//! The async work of one batch: claim in the store, render, push, record.
//!
//! Order matters for "nothing lost, nothing twice": the claim is written before any push, and
//! a message is marked done only after the provider accepted it (or it was dead-lettered). A
//! crash in between leaves the user claimed but not done, and the next run re-sends exactly
//! those, with the same idempotency key.

use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;

use futures::future::try_join_all;

use super::{Candidate, Context};
use crate::error::Result;
use crate::providers::Message;
use crate::template::UserVars;

/// Claims, renders and pushes `users` (in id order) of target `target`: one claim and one
/// ledger update for the lot; its provider batches go out concurrently (the dispatcher's slots
/// bound how many messages are in flight).
pub async fn deliver(ctx: &Context, target: u32, users: Vec<Candidate>) -> Result<()> {
    let rt = &ctx.targets[target as usize];
    let ids: Vec<u32> = users.iter().map(|c| c.id).collect();
    let claim = rt.ledger.claim(&ids).await?;
    rt.stats
        .already_granted
        .fetch_add(claim.already.len() as u64, Relaxed);
    rt.stats
        .eligible
        .fetch_add(claim.claimed.len() as u64, Relaxed);
    if claim.claimed.is_empty() {
        return Ok(());
    }

    let needs_token = ctx.dispatcher.provider().needs_token();
    let message = |c: &Candidate| Message {
        user: c.id,
        json: rt.renderer.render(UserVars {
            id: c.id,
            level: c.level,
            points: c.points,
        }),
        token: if needs_token {
            ctx.source.token(c.id)
        } else {
            None
        },
    };
    let messages: Vec<Message> = if claim.claimed.len() == users.len() {
        users.iter().map(message).collect()
    } else {
        claim
            .claimed
            .iter()
            .filter_map(|id| users.binary_search_by_key(id, |c| c.id).ok())
            .map(|i| message(&users[i]))
            .collect()
    };

    let batches = batch_bounds(&messages, ctx.batch_max_messages, ctx.batch_max_bytes);
    ctx.metrics.batches.fetch_add(batches.len() as u64, Relaxed);
    let reports = try_join_all(
        batches
            .iter()
            .map(|range| ctx.dispatcher.deliver(&messages[range.clone()])),
    )
    .await?;
    // Everything not reported was delivered.
    let mut dead = Vec::new();
    let mut unreachable = 0u64;
    let mut failed = vec![false; messages.len()];
    for (range, report) in batches.iter().zip(&reports) {
        for d in &report.dead {
            failed[range.start + d.index] = true;
            dead.push(messages[range.start + d.index].user);
        }
        unreachable += report.unreachable.len() as u64;
    }
    let done: Vec<u32> = if dead.is_empty() {
        messages.iter().map(|m| m.user).collect()
    } else {
        messages
            .iter()
            .zip(&failed)
            .filter(|(_, f)| !**f)
            .map(|(m, _)| m.user)
            .collect()
    };
    let delivered = done.len() as u64 - unreachable;
    rt.ledger.mark_done(&done).await?;
    if !dead.is_empty() {
        rt.ledger.mark_dead(&dead).await?;
    }
    rt.stats.delivered.fetch_add(delivered, Relaxed);
    rt.stats.unreachable.fetch_add(unreachable, Relaxed);
    rt.stats.dead_lettered.fetch_add(dead.len() as u64, Relaxed);
    ctx.metrics.delivered.fetch_add(delivered, Relaxed);
    Ok(())
}

/// Cuts `messages` into batches of at most `max_messages` messages and `max_bytes` serialized
/// bytes, in order; a single message over `max_bytes` goes alone.
pub fn batch_bounds(
    messages: &[Message],
    max_messages: usize,
    max_bytes: usize,
) -> Vec<Range<usize>> {
    let mut bounds = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, m) in messages.iter().enumerate() {
        let size = m.json.len();
        if i > start && (i - start >= max_messages || bytes + size > max_bytes) {
            bounds.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < messages.len() {
        bounds.push(start..messages.len());
    }
    bounds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Delivery;

    fn msg(user: u32, body_len: usize) -> Message {
        Message::from_delivery(&Delivery {
            campaign: "c".into(),
            occurrence: None,
            user,
            title: String::new(),
            body: "x".repeat(body_len),
            key: format!("c:{user}"),
            token: None,
        })
    }

    #[test]
    fn batches_respect_both_caps_and_keep_order() {
        let msgs: Vec<Message> = (1..=25)
            .map(|u| msg(u, if u == 7 { 5000 } else { 10 }))
            .collect();
        let sizes: Vec<usize> = msgs.iter().map(|m| m.json.len()).collect();
        let max_bytes = 400;
        let batches: Vec<&[Message]> = batch_bounds(&msgs, 4, max_bytes)
            .into_iter()
            .map(|r| &msgs[r])
            .collect();
        let flat: Vec<u32> = batches.iter().copied().flatten().map(|m| m.user).collect();
        assert_eq!(flat, (1..=25).collect::<Vec<_>>());
        for b in &batches {
            assert!(!b.is_empty() && b.len() <= 4);
            let total: usize = b.iter().map(|m| m.json.len()).sum();
            assert!(total <= max_bytes || b.len() == 1, "batch of {total} bytes");
        }
        // The oversize message went alone.
        assert!(batches.iter().any(|b| b.len() == 1 && b[0].user == 7));
        assert!(sizes[6] > max_bytes);
    }
}
