//! The work of one push task: claim in the store and render (on the timely worker that owns
//! the users: [`super::push`]), then push and record (async, on the tokio runtime).
//!
//! Order matters for "nothing lost, nothing twice": the claim is written before any push, and
//! a message is marked done only after the provider accepted it (or it was dead-lettered) —
//! as soon as it was, not when its batch-mates were. A crash in between leaves the user claimed
//! but not done, and the next run re-sends exactly those, with the same idempotency key; a
//! message keeps its concurrency slot until it is recorded, so those are at most
//! `concurrency` messages.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures::stream::{self, StreamExt};
use tokio::sync::Notify;

use super::halts::{Halt, OnPause};
use super::{Candidate, Context, RunTarget};
use crate::error::{Error, Result};
use crate::providers::dispatch::{Fate, Hold, Settled};
use crate::providers::{MessageBuf, Messages};
use crate::store::Claim;
use crate::template::UserVars;

/// Counts a claim's outcome: the claimed users are eligible, the others already granted.
pub fn count_claim(ctx: &Context, target: u32, claim: &Claim) {
    let rt = &ctx.targets[target as usize];
    let (claimed, already) = (claim.claimed.len() as u64, claim.already.len() as u64);
    rt.stats.already_granted.fetch_add(already, Relaxed);
    rt.stats.eligible.fetch_add(claimed, Relaxed);
    ctx.metrics.count.claimed.fetch_add(claimed, Relaxed);
    ctx.metrics
        .count
        .already_granted
        .fetch_add(already, Relaxed);
    ctx.metrics.count.pairs_settled.fetch_add(already, Relaxed);
}

/// Counts `n` users a frequency cap bound in target `target`: eligible, and capped.
pub fn count_capped(ctx: &Context, target: u32, n: u64) {
    if n == 0 {
        return;
    }
    let rt = &ctx.targets[target as usize];
    rt.stats.eligible.fetch_add(n, Relaxed);
    rt.stats.capped.fetch_add(n, Relaxed);
    ctx.metrics.count.capped.fetch_add(n, Relaxed);
    ctx.metrics.count.pairs_settled.fetch_add(n, Relaxed);
}

/// What policy decided for users it set apart before the claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// In the campaign's holdout or the control group.
    HeldOut,
    /// Inside their quiet hours.
    QuietHeld,
    /// Not claimed when the campaign was cancelled.
    Cancelled,
}

/// Counts users set apart: those the store recorded are eligible with `outcome`, the others
/// already granted.
pub fn count_set_apart(ctx: &Context, target: u32, claim: &Claim, outcome: Outcome) {
    let rt = &ctx.targets[target as usize];
    let n = claim.claimed.len() as u64;
    count_claim(ctx, target, claim);
    match outcome {
        Outcome::HeldOut => {
            rt.stats.held_out.fetch_add(n, Relaxed);
            ctx.metrics.count.held_out.fetch_add(n, Relaxed);
        }
        Outcome::QuietHeld => {
            rt.stats.quiet_held.fetch_add(n, Relaxed);
            ctx.metrics.count.quiet_held.fetch_add(n, Relaxed);
        }
        Outcome::Cancelled => {
            rt.stats.cancelled.fetch_add(n, Relaxed);
            ctx.metrics.count.cancelled.fetch_add(n, Relaxed);
        }
    }
    ctx.metrics.count.pairs_settled.fetch_add(n, Relaxed);
}

/// The messages of one push task, rendered: every record in one buffer the task owns (no
/// allocation per message), in id order. The buffer goes back to [`Buffers`] when the task
/// is done with it.
pub struct Rendered {
    /// Index into [`Context::targets`].
    pub target: u32,
    buf: MessageBuf,
    buffers: Arc<Buffers>,
}

impl Drop for Rendered {
    fn drop(&mut self) {
        self.buffers
            .give(std::mem::take(&mut self.buf).into_records());
    }
}

/// Record buffers of finished push tasks, kept for the next tasks to render into. A task's
/// records take hundreds of kilobytes: allocated afresh for each task, they were given back to
/// the system and faulted in again, page by page, once per task (the allocator trims its heap
/// when so much at its top is freed).
#[derive(Default)]
pub struct Buffers(Mutex<Vec<Vec<u8>>>);

impl Buffers {
    /// Buffers kept, at most: about the tasks that render at once.
    const KEEP: usize = 8;
    /// A buffer larger than this is not kept (a large template's): memory stays bounded.
    const KEEP_BYTES: usize = 4 << 20;

    /// An empty buffer with room for `bytes`: a kept one if there is one.
    fn take(&self, bytes: usize) -> String {
        let mut buf = lock(&self.0).pop().unwrap_or_default();
        buf.clear();
        // Empty: no byte to check.
        let mut records = String::from_utf8(buf).unwrap_or_default();
        records.reserve(bytes);
        records
    }

    /// Keeps `buf` for a later task, unless enough are kept.
    fn give(&self, buf: Vec<u8>) {
        let mut kept = lock(&self.0);
        if kept.len() < Self::KEEP && (1..=Self::KEEP_BYTES).contains(&buf.capacity()) {
            kept.push(buf);
        }
    }
}

/// Renders the messages of the `claimed` users among `users` (both in id order).
pub fn render(
    ctx: &Context,
    target: u32,
    users: &[Candidate],
    claimed: Vec<u32>,
) -> Result<Rendered> {
    if claimed.len() == users.len() {
        // Every one: the claim's list is the users' ids.
        return render_each(ctx, target, users.iter(), claimed);
    }
    let chosen: Vec<&Candidate> = claimed
        .iter()
        .filter_map(|id| users.binary_search_by_key(id, |c| c.id).ok())
        .map(|i| &users[i])
        .collect();
    let ids = chosen.iter().map(|c| c.id).collect();
    render_each(ctx, target, chosen.into_iter(), ids)
}

/// [`render`] of the users `chosen`, whose ids are `ids`.
fn render_each<'a>(
    ctx: &Context,
    target: u32,
    chosen: impl ExactSizeIterator<Item = &'a Candidate>,
    ids: Vec<u32>,
) -> Result<Rendered> {
    let rt = &ctx.targets[target as usize];
    let needs_token = ctx.dispatcher.provider().needs_token();
    let n = chosen.len();
    let mut records = ctx.buffers.take(n * rt.renderer.typical_len());
    let mut ends = Vec::with_capacity(n);
    let mut tokens = Vec::new();
    for c in chosen {
        let vars = UserVars {
            id: c.id,
            level: c.level,
            points: c.points,
        };
        rt.renderer.render_into(vars, &mut records);
        ends.push(records.len());
        if needs_token {
            tokens.push(ctx.source.token(c.id));
        }
    }
    let buf = MessageBuf::new(ids, records.into_bytes(), ends, tokens).ok_or_else(|| {
        Error::runtime("a push task rendered a message for each of other users than it claimed")
    })?;
    Ok(Rendered {
        target,
        buf,
        buffers: ctx.buffers.clone(),
    })
}

/// Dead-letters rendered messages with `error` instead of pushing them, and records them
/// dead in the store.
pub async fn dead_letter(ctx: &Context, rendered: Rendered, error: &str) -> Result<()> {
    let rt = &ctx.targets[rendered.target as usize];
    let messages = rendered.buf.messages();
    ctx.dispatcher.dead_letter(messages, error)?;
    rt.ledger.mark_dead(messages.users()).await?;
    let n = messages.len() as u64;
    rt.stats.dead_lettered.fetch_add(n, Relaxed);
    ctx.metrics.count.dead_lettered.fetch_add(n, Relaxed);
    ctx.metrics.count.pairs_settled.fetch_add(n, Relaxed);
    Ok(())
}

/// Pushes rendered messages and records each one's outcome in the store. `ready` is when
/// their candidates reached the push operator: each lane's latency is counted from there.
///
/// The dispatcher starts no attempt for a campaign that is paused or cancelled, nor for the
/// lanes below transactional in a generation cut short ([`Context::cut`]); what it left
/// unattempted is then settled here: a cancelled campaign's as cancelled; a paused one's
/// waits for the campaign to be resumed or cancelled in a `run` ([`OnPause::Wait`]) and goes
/// back to the store ([`crate::store::Ledger::unclaim`]) in `serve`, as a cut's does, for a
/// later generation to send.
///
/// A task waiting for its paused campaign gives its messages' share of the lane's budget back
/// through `lend`, so that the other campaigns of its lane go on meanwhile.
pub async fn send(
    ctx: &Context,
    rendered: Rendered,
    ready: Instant,
    lend: &(dyn Fn(usize) + Sync),
) -> Result<()> {
    let target = rendered.target;
    let rt = &ctx.targets[target as usize];
    let all = rendered.buf.messages();
    // The messages left to push after a hold (all of them at first), copied out.
    let mut left: Option<MessageBuf> = None;
    loop {
        let seen = ctx.halts.changes();
        let messages = left.as_ref().map_or(all, MessageBuf::messages);
        push_and_record(rt, ctx, target, messages, ready).await?;
        let halt = ctx.halts.of(target);
        // A change since the push began may have held some of it back, even if it is undone.
        let calm = halt == Halt::Running && !ctx.is_cut() && ctx.halts.changes() == seen;
        let stopping = ctx.dispatcher.stopping();
        if calm && !stopping {
            return Ok(());
        }
        let users = messages.users();
        let done = rt.ledger.are_done(users).await?;
        let open: Vec<u32> = (users.iter().zip(done))
            .filter(|(_, done)| !done)
            .map(|(id, _)| *id)
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        if stopping {
            // Unsettled (never attempted, or waiting for another attempt): not this run's to
            // account for, the next run's to send.
            return hand_back(ctx, rt, &open).await;
        }
        let n = open.len() as u64;
        match (halt, ctx.on_pause) {
            (Halt::Cancelled, _) => {
                rt.ledger.mark_cancelled(&open).await?;
                rt.stats.cancelled.fetch_add(n, Relaxed);
                ctx.metrics.count.cancelled.fetch_add(n, Relaxed);
                ctx.metrics.count.pairs_settled.fetch_add(n, Relaxed);
                return Ok(());
            }
            (Halt::Paused, OnPause::Wait) => {
                lend(open.len());
                // Until resumed or cancelled — or the run is stopped: then they stay claimed
                // and unsettled, for a re-run to send.
                tokio::select! {
                    () = ctx.halts.changed(seen) => {}
                    () = ctx.dispatcher.stopped() => {}
                }
            }
            // Resumed meanwhile: push the rest.
            (Halt::Running, _) if !ctx.is_cut() => {}
            (Halt::Paused, OnPause::Drop) | (Halt::Running, _) => {
                if halt == Halt::Paused {
                    ctx.halts.note_dropped(target);
                }
                return hand_back(ctx, rt, &open).await;
            }
        }
        let rest = messages
            .iter()
            .filter(|m| open.binary_search(&m.user).is_ok())
            .collect();
        left = Some(rest);
    }
}

/// Hands `open` — users this run claimed and left unsettled, a stop's or a cut's — back to the
/// store, to be handed out again at their next claim (the next run, or generation), and takes
/// them out of this run's count: its summary accounts only for the users it settled.
async fn hand_back(ctx: &Context, rt: &RunTarget, open: &[u32]) -> Result<()> {
    rt.ledger.unclaim(open).await?;
    let n = open.len() as u64;
    rt.stats.eligible.fetch_sub(n, Relaxed);
    ctx.metrics.count.claimed.fetch_sub(n, Relaxed);
    Ok(())
}

/// Pushes `messages` in provider batches and records each one's outcome in the store.
async fn push_and_record(
    rt: &RunTarget,
    ctx: &Context,
    target: u32,
    messages: Messages<'_>,
    ready: Instant,
) -> Result<()> {
    let held = || ctx.halts.of(target) != Halt::Running;
    let hold = Hold {
        held: &held,
        changes: Some(ctx.halts.watch()),
    };
    let batches = batch_bounds(messages, ctx.batch_max_messages, ctx.batch_max_bytes);
    if !ctx.dispatcher.provider().sends_each() {
        // A list goes out in slices of the slots (below); its batches are only counted.
        let n = batches.count() as u64;
        ctx.metrics.count.batches.fetch_add(n, Relaxed);
        return write_and_record(rt, ctx, messages, ready, &hold).await;
    }
    let batches: Vec<Range<usize>> = batches.collect();
    ctx.metrics
        .count
        .batches
        .fetch_add(batches.len() as u64, Relaxed);
    // Batches go out together. Each message's fate is recorded in the store as soon as it is
    // known — whatever has settled since the last write goes in the next one — and only then
    // does it give back its concurrency slot.
    let settled = Settlements::default();
    let sends = async {
        let outcome = stream::iter(batches.iter().cloned())
            .map(|range| {
                let settled = &settled;
                let settle = move |s: Settled| settled.add(range.start, s);
                async move {
                    let lane = rt.target.campaign.priority;
                    ctx.dispatcher
                        .deliver(lane, messages.slice(range.clone()), &settle, &hold)
                        .await
                }
            })
            .buffer_unordered(batches.len().max(1))
            .fold(Ok(()), |first, r| async move { first.and(r) })
            .await;
        settled.finish();
        outcome
    };
    let records = async {
        loop {
            let (finished, fates) = settled.take().await;
            record(rt, ctx, messages, &fates, ready).await?;
            if finished {
                return Ok(());
            }
        }
    };
    // A failed record (the store lost its lease, a disk error) stops the sends at once; a
    // failed send (a halted provider) still lets what settled before it be recorded.
    let (sent, recorded): (Result<()>, Result<()>) = futures::future::join(
        async {
            tokio::select! {
                sent = sends => sent,
                _ = settled.failed.notified() => Ok(()),
            }
        },
        async {
            let r = records.await;
            if r.is_err() {
                settled.failed.notify_one();
            }
            r
        },
    )
    .await;
    recorded.and(sent)
}

/// [`push_and_record`] for a provider that takes a list in one write (`log:`, an instant
/// `mock:`): writes slices of half the concurrency slots, recording each slice's outcomes
/// before the next. A write is over when it returns, so nothing is gained by overlapping a
/// task's writes; and a task that held its slots while waiting for more would hand them from
/// task to task, one small record each.
async fn write_and_record(
    rt: &RunTarget,
    ctx: &Context,
    messages: Messages<'_>,
    ready: Instant,
    hold: &Hold<'_>,
) -> Result<()> {
    let slice = (ctx.dispatcher.capacity() / 2).max(1);
    let lane = rt.target.campaign.priority;
    for start in (0..messages.len()).step_by(slice) {
        let part = messages.slice(start..messages.len().min(start + slice));
        let settled = Mutex::new(Vec::new());
        let sent = ctx
            .dispatcher
            .deliver(
                lane,
                part,
                &|s: Settled| lock(&settled).push((start, s)),
                hold,
            )
            .await;
        let settled = settled.into_inner().unwrap_or_else(PoisonError::into_inner);
        record(rt, ctx, messages, &settled, ready).await?;
        sent?;
    }
    Ok(())
}

/// The fates settled and not yet recorded, shared by a task's sends and its recorder.
#[derive(Default)]
struct Settlements {
    state: Mutex<(bool, Vec<(usize, Settled)>)>,
    ready: Notify,
    failed: Notify,
}

impl Settlements {
    /// Adds the fates of a batch starting at message `offset`.
    fn add(&self, offset: usize, s: Settled) {
        lock(&self.state).1.push((offset, s));
        self.ready.notify_one();
    }

    /// Says that no fate is to come.
    fn finish(&self) {
        lock(&self.state).0 = true;
        self.ready.notify_one();
    }

    /// Waits for fates (or the end) and takes every one so far: (ended, fates).
    async fn take(&self) -> (bool, Vec<(usize, Settled)>) {
        loop {
            {
                let mut state = lock(&self.state);
                if state.0 || !state.1.is_empty() {
                    return (state.0, std::mem::take(&mut state.1));
                }
            }
            self.ready.notified().await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records settled fates in the ledger and counts them; their slots go back after. The
/// delivered ones count in their lane's latency, from `ready` to now (they were answered
/// since the last record).
async fn record(
    rt: &RunTarget,
    ctx: &Context,
    messages: Messages<'_>,
    settled: &[(usize, Settled)],
    ready: Instant,
) -> Result<()> {
    if settled.is_empty() {
        return Ok(());
    }
    let answered = ready.elapsed();
    rt.sends.note();
    let users = messages.users();
    // One stretch delivered whole, the usual answer: its users as they are, in id order.
    let whole = match settled {
        [(offset, s)] => s.delivered().map(|r| offset + r.start..offset + r.end),
        _ => None,
    };
    let (done, dead, unreachable) = match whole {
        Some(range) => (Cow::Borrowed(&users[range]), Vec::new(), Vec::new()),
        None => {
            let (done, dead, unreachable) = sorted_fates(users, settled);
            (Cow::Owned(done), dead, unreachable)
        }
    };
    let delivered = done.len() as u64;
    ctx.metrics
        .record_lane_latency(rt.target.campaign.priority, answered, delivered as usize);
    let marked = async {
        rt.ledger.mark_done(&done).await?;
        if !dead.is_empty() {
            rt.ledger.mark_dead(&dead).await?;
        }
        if !unreachable.is_empty() {
            rt.ledger.mark_unreachable(&unreachable).await?;
        }
        Ok(())
    };
    if let Err(e) = marked.await {
        // Before these messages let go of their slots (`settled` drops after this returns).
        ctx.dispatcher.halt_unrecorded(&e);
        return Err(e);
    }
    let (unreachable, dead) = (unreachable.len() as u64, dead.len() as u64);
    // Shared with the other workers: only counts that move are written.
    let m = &ctx.metrics.count;
    for (n, counters) in [
        (delivered, [&rt.stats.delivered, &m.delivered]),
        (unreachable, [&rt.stats.unreachable, &m.unreachable]),
        (dead, [&rt.stats.dead_lettered, &m.dead_lettered]),
    ] {
        if n > 0 {
            for c in counters {
                c.fetch_add(n, Relaxed);
            }
        }
    }
    m.pairs_settled
        .fetch_add(delivered + unreachable + dead, Relaxed);
    Ok(())
}

/// The users of `settled` fates (positions in `users`, from each one's offset) by fate:
/// (delivered, dead, unreachable), each in id order — the stores apply sorted ids as
/// whole-set operations, and fates answered one by one come in any order.
fn sorted_fates(users: &[u32], settled: &[(usize, Settled)]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let (mut done, mut dead, mut unreachable) = (Vec::new(), Vec::new(), Vec::new());
    for (offset, s) in settled {
        if let Some(range) = s.delivered() {
            done.extend_from_slice(&users[offset + range.start..offset + range.end]);
            continue;
        }
        for (i, fate) in s.fates() {
            let user = users[offset + i];
            match fate {
                Fate::Delivered => done.push(user),
                Fate::Unreachable => unreachable.push(user),
                Fate::Dead => dead.push(user),
            }
        }
    }
    done.sort_unstable();
    dead.sort_unstable();
    unreachable.sort_unstable();
    (done, dead, unreachable)
}

/// Cuts `messages` into batches of at most `max_messages` messages and `max_bytes` serialized
/// bytes, in order; a single message over `max_bytes` goes alone.
pub fn batch_bounds(
    messages: Messages<'_>,
    max_messages: usize,
    max_bytes: usize,
) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= messages.len() {
            return None;
        }
        let full = start..messages.len().min(start + max_messages.max(1));
        // A full batch within the bytes (the usual case) is known from two ends.
        let n = match messages.slice(full.clone()).bytes() <= max_bytes {
            true => full.len(),
            false => {
                let mut bytes = 0;
                full.take_while(|&i| {
                    bytes += messages.record_len(i);
                    bytes <= max_bytes
                })
                .count()
                .max(1)
            }
        };
        start += n;
        Some(start - n..start)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Delivery;
    use crate::providers::Message;

    fn record(user: u32, body_len: usize) -> String {
        serde_json::to_string(&Delivery {
            campaign: "c".into(),
            occurrence: None,
            user,
            title: String::new(),
            body: "x".repeat(body_len),
            key: format!("c:{user}"),
            token: None,
        })
        .unwrap()
    }

    #[test]
    fn batches_respect_both_caps_and_keep_order() {
        let records: Vec<String> = (1..=25)
            .map(|u| record(u, if u == 7 { 5000 } else { 10 }))
            .collect();
        let buf: MessageBuf = records
            .iter()
            .zip(1..)
            .map(|(json, user)| Message {
                user,
                json: json.as_bytes(),
                token: None,
            })
            .collect();
        let all = buf.messages();
        let msgs: Vec<Message<'_>> = all.iter().collect();
        let sizes: Vec<usize> = msgs.iter().map(|m| m.json.len()).collect();
        let max_bytes = 400;
        let batches: Vec<&[Message<'_>]> =
            batch_bounds(all, 4, max_bytes).map(|r| &msgs[r]).collect();
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
