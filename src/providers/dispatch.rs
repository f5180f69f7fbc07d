//! The delivery policy every provider shares: at most `concurrency` messages in flight, the
//! `rate_per_s` token bucket, up to `max_attempts` attempts with exponential backoff and full
//! jitter (a retry waits holding no slot, at least as long as the provider's `Retry-After`),
//! and dead letters for what fails for good. Providers only do the I/O.
//!
//! Slots and rate tokens are budgeted per priority lane ([`super::lanes`], [`super::rate`]):
//! a message of a transactional campaign is never queued behind normal or bulk ones, bulk
//! never takes transactional's reserve, and a run of one lane gets the whole budget (bulk:
//! all but transactional's share).
//!
//! Each message's fate is handed to the caller the moment it is known ([`Settled`]), with the
//! concurrency slot it holds: the caller records it in the store, then drops it. So a message
//! is "in flight" from taking its slot until its outcome is durable, and a crash can make a
//! re-run send at most `concurrency` messages a second time. Before every attempt the
//! dispatcher's [`Guard`] checks that this process may still send (its store lease).
//!
//! A provider refusing *our* credentials ([`Outcome::Unauthorized`], HTTP 401/403) is not a
//! fact about the user: such a message is never dead-lettered. It is retried, and once
//! [`UNAUTHORIZED_IN_A_ROW`] answers in a row (no delivery in between) say so — or a message
//! runs out of attempts on one — the dispatcher halts: every `deliver` in progress or to come
//! returns the same error, the push tasks fail, and the run stops with exit 1. Whatever was
//! not delivered stays not done in the store, so a re-run sends it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::stream::{SelectAll, StreamExt};
use rand::Rng;
use tokio::sync::watch;

use super::breaker::Breaker;
use super::dead_letters::DeadLetters;
use super::lanes::{LaneSlots, Lanes};
use super::rate::RateLimiter;
use super::{Attempt, Gate, Message, Messages, Outcome, Provider};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::Priority;

mod settled;
pub use settled::{Fate, Hold, Settled};

/// First retry waits up to this long; each further one doubles it.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// No retry waits longer than this (unless the provider's `Retry-After` says so).
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Credential refusals in a row that stop the run.
pub const UNAUTHORIZED_IN_A_ROW: u32 = 3;

/// Checked right before every attempt: fails once this process may no longer send (its
/// store lease may have been taken over). See [`crate::store::Fence`].
pub type Guard = Arc<dyn Fn() -> Result<()> + Send + Sync>;

/// A provider with the delivery policy around it. One per process, shared by every worker.
pub struct Dispatcher {
    provider: Provider,
    slots: Arc<Lanes>,
    capacity: usize,
    rate: Option<RateLimiter>,
    max_attempts: u32,
    dead: DeadLetters,
    metrics: Arc<Metrics>,
    /// Credential refusals since the last delivery.
    unauthorized: AtomicU32,
    /// Tells a provider that is down from users that cannot be reached.
    breaker: Breaker,
    /// Why the dispatcher halted, once it has.
    halted: OnceLock<String>,
    /// Flips to `true` when it halts, waking every `deliver` in progress.
    halt: watch::Sender<bool>,
    /// Flips to `true` on a graceful stop ([`Dispatcher::stop_sending`]).
    stop: watch::Sender<bool>,
    /// Whether this process may still send; checked before every attempt.
    guard: Option<Guard>,
    /// Set while a transactional campaign waits for its generation (`serve`): the other
    /// lanes start no attempt, leaving their messages unsettled, as a stop does.
    cut: Arc<AtomicBool>,
}

/// How a batch takes its slots.
#[derive(Clone, Copy)]
enum Take {
    /// All it asks for at once.
    All,
    /// As many as are free once one is ([`Lanes::acquire_some`]); `rest`: for the rest of a
    /// batch, which waits where the batch did.
    Free { rest: bool },
}

/// What a round of attempts leaves for the next one.
#[derive(Default)]
struct Next {
    retry: Vec<usize>,
    wait: Duration,
    /// Attempts not yet shown to the breaker: delivered, failed, the last failure's error.
    delivered: u64,
    failed: u64,
    cause: String,
}

/// Attempts the dispatcher shows the breaker at once, once the provider has delivered.
const BREAKER_EVERY: u64 = 64;

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("provider", &self.provider)
            .field("capacity", &self.capacity)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

impl Dispatcher {
    /// Wraps `provider` with `concurrency` slots, `rate_per_s` (0 = unlimited), `max_attempts`
    /// and the dead-letter file at `dead_letter`.
    pub fn new(
        provider: Provider,
        concurrency: usize,
        rate_per_s: u64,
        max_attempts: u32,
        dead_letter: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        let capacity = concurrency.max(1);
        Dispatcher {
            provider,
            slots: Lanes::new(capacity),
            capacity,
            rate: RateLimiter::new(rate_per_s),
            max_attempts: max_attempts.max(1),
            dead: DeadLetters::new(dead_letter),
            metrics,
            unauthorized: AtomicU32::new(0),
            breaker: Breaker::default(),
            halted: OnceLock::new(),
            halt: watch::Sender::new(false),
            stop: watch::Sender::new(false),
            guard: None,
            cut: Arc::default(),
        }
    }

    /// Shares `flag` as the cut ([`Dispatcher::yields`]).
    pub fn with_cut(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cut = flag;
        self
    }

    /// Whether messages of `lane` start no attempt now: a stop, or a cut for any lane but
    /// transactional.
    pub fn yields(&self, lane: Priority) -> bool {
        self.stopping() || (lane != Priority::Transactional && self.cut.load(Relaxed))
    }

    /// Returns once the dispatcher has stopped (SIGINT, SIGTERM).
    pub async fn stopped(&self) {
        let mut stop = self.stop.subscribe();
        // The sender lives as long as `self`.
        let _ = stop.wait_for(|stopped| *stopped).await;
    }

    /// Messages being pushed right now (slots taken).
    pub fn in_flight(&self) -> usize {
        self.slots.in_flight()
    }

    /// Messages that may be in flight at once (`concurrency`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The provider.
    pub fn provider(&self) -> &Provider {
        &self.provider
    }

    /// Stops for good, gracefully (`serve` on SIGTERM): no attempt starts from now on;
    /// attempts under way finish and settle. A message not attempted yet, or waiting to be
    /// retried, is left unsettled: it stays claimed and not done, and the next run sends it.
    pub fn stop_sending(&self) {
        self.stop.send_replace(true);
    }

    /// Whether [`Dispatcher::stop_sending`] was called.
    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Checks, right before every attempt from now on, that this process may still send.
    pub fn with_guard(mut self, guard: Guard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Pushes every message of `batch` (of a campaign of priority `lane`) until it is
    /// delivered or dead, handing each message's fate to `settle` the moment it is known — a
    /// delivered message never waits for a batch-mate's retry. Dead letters are written before
    /// their fate is handed over. Fails once the dispatcher has halted (see the module docs)
    /// or the guard refuses. While `held` says so (the campaign was paused or cancelled), no
    /// attempt starts: the messages not yet attempted are left unsettled for the caller.
    pub async fn deliver(
        &self,
        lane: Priority,
        batch: Messages<'_>,
        settle: &(dyn Fn(Settled) + Sync),
        hold: &Hold<'_>,
    ) -> Result<()> {
        let mut halt = self.halt.subscribe();
        let mut stop = self.stop.subscribe();
        let mut which: Vec<usize> = (0..batch.len()).collect();
        let mut attempt = 1;
        while !which.is_empty() && !self.yields(lane) && !hold.is_held() {
            self.check_halted()?;
            let round = self.attempt(lane, batch, &which, attempt, settle, hold);
            let (mut retry, wait) = tokio::select! {
                round = round => round?,
                _ = halt.wait_for(|halted| *halted) => return Err(self.halt_error()),
            };
            if !retry.is_empty() {
                self.metrics
                    .count
                    .retries
                    .fetch_add(retry.len() as u64, Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(retry_wait(attempt, wait)) => {}
                    _ = halt.wait_for(|halted| *halted) => return Err(self.halt_error()),
                    _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
                }
                retry.sort_unstable();
            }
            which = retry;
            attempt += 1;
        }
        Ok(())
    }

    /// `n` slots of `lane` taken as `take` says, or `None` as soon as `hold` holds the batch
    /// back.
    async fn acquire_unless_held(
        &self,
        lane: Priority,
        n: usize,
        take: Take,
        hold: &Hold<'_>,
    ) -> Option<LaneSlots> {
        let acquire = || async move {
            match take {
                Take::Free { rest } => self.slots.acquire_some(lane, n, rest).await,
                Take::All => self.slots.acquire(lane, n).await,
            }
        };
        let Some(changes) = hold.changes else {
            return Some(acquire().await);
        };
        let mut changed = changes.subscribe();
        if hold.is_held() {
            return None;
        }
        let held = async {
            loop {
                if changed.changed().await.is_err() {
                    // Nobody can change it any more: wait for the slot alone.
                    std::future::pending::<()>().await;
                }
                if hold.is_held() {
                    return;
                }
            }
        };
        tokio::select! {
            slots = acquire() => Some(slots),
            () = held => None,
        }
    }

    /// One attempt at each of `which`: settles what it can, returns what to retry and the
    /// longest `Retry-After` asked for.
    async fn attempt(
        &self,
        lane: Priority,
        batch: Messages<'_>,
        which: &[usize],
        attempt: u32,
        settle: &(dyn Fn(Settled) + Sync),
        hold: &Hold<'_>,
    ) -> Result<(Vec<usize>, Duration)> {
        let mut next = Next::default();
        if self.provider.sends_each() {
            self.attempt_each(lane, batch, which, attempt, settle, hold, &mut next)
                .await?;
        } else {
            for chunk in which.chunks(self.slots.most(lane)) {
                let Some(slots) = self
                    .acquire_unless_held(lane, chunk.len(), Take::All, hold)
                    .await
                else {
                    break;
                };
                let slots = Some(slots);
                self.check_halted()?;
                if self.yields(lane) || hold.is_held() {
                    break;
                }
                self.check_guard()?;
                let (failed, latency) = self
                    .provider
                    .send_all(
                        batch,
                        chunk,
                        attempt,
                        Gate::new(self.rate.as_ref(), lane)
                            .unless(hold.held)
                            .fenced_by(self.guard.as_ref()),
                    )
                    .await;
                let held = failed.iter().filter(|(_, o)| *o == Outcome::Held).count();
                if held > 0 {
                    // Held at the gate: by a pause, or by a lease lost while waiting for tokens.
                    self.check_guard()?;
                }
                let sent = chunk.len() - held;
                self.metrics.record_latency(latency, sent);
                if failed.len() < chunk.len() {
                    // Some were delivered: the chunk's refusals are about their users.
                    self.breaker.saw_delivery();
                }
                let settled = if failed.is_empty() {
                    // The usual answer, every one delivered: judged together.
                    self.delivered(chunk.len() as u64, &mut next);
                    Settled::all_delivered(chunk, slots)
                } else {
                    let mut failed = failed.into_iter().peekable();
                    let mut fates = Vec::with_capacity(chunk.len());
                    for (k, &i) in chunk.iter().enumerate() {
                        let outcome = match failed.peek() {
                            Some((at, _)) if *at == k => failed.next().map(|(_, o)| o),
                            _ => None,
                        };
                        self.judge(batch, i, outcome, attempt, &mut fates, &mut next)?;
                    }
                    Settled::each(fates, slots)
                };
                self.observe(&mut next, true)?;
                if !settled.is_empty() {
                    settle(settled);
                }
            }
        }
        self.observe(&mut next, true)?;
        Ok((next.retry, next.wait))
    }

    /// [`Dispatcher::attempt`] for a provider whose every message is its own request: the
    /// messages take slots as they come free — as many together as are free, one each — and
    /// those that took theirs together start together; each answer is judged as it comes, and
    /// what it settles handed over with as many of the slots.
    #[allow(clippy::too_many_arguments)]
    async fn attempt_each(
        &self,
        lane: Priority,
        batch: Messages<'_>,
        which: &[usize],
        attempt: u32,
        settle: &(dyn Fn(Settled) + Sync),
        hold: &Hold<'_>,
        next: &mut Next,
    ) -> Result<()> {
        // Each group of messages sent together: where it starts in `which`, how many, and
        // the slots of those not answered yet.
        let mut groups: Vec<(usize, usize, LaneSlots)> = Vec::new();
        let mut sends = SelectAll::new();
        let (mut started, mut starting) = (0, !which.is_empty());
        // After the first group, the rest of the batch waits where the batch did.
        let take = |n: usize, rest| self.acquire_unless_held(lane, n, Take::Free { rest }, hold);
        let mut taking = std::pin::pin!(take(which.len(), false));
        loop {
            tokio::select! {
                biased;
                Some((g, answers)) = sends.next(), if !sends.is_empty() => {
                    let (start, len, slots): &mut (usize, usize, LaneSlots) = &mut groups[g];
                    let group = &which[*start..*start + *len];
                    self.answered(batch, group, slots, answers, attempt, settle, next)?;
                }
                slots = &mut taking, if starting => {
                    // Held meanwhile (paused, cancelled): the rest leave the queue unsettled.
                    let Some(slots) = slots.filter(|s| !s.is_empty()) else {
                        starting = false;
                        continue;
                    };
                    // A halt while waiting for the slots sends nothing more; a stop leaves
                    // the messages unsettled.
                    self.check_halted()?;
                    if self.yields(lane) || hold.is_held() {
                        starting = false;
                        continue;
                    }
                    self.check_guard()?;
                    let len = slots.len().min(which.len() - started);
                    let group = &which[started..started + len];
                    let gate = Gate::new(self.rate.as_ref(), lane)
                        .unless(hold.held)
                        .fenced_by(self.guard.as_ref());
                    let g = groups.len();
                    groups.push((started, len, slots));
                    let answers = self.provider.send_each(batch, group, attempt, gate);
                    sends.push(answers.map(move |a| (g, a)));
                    started += len;
                    starting = started < which.len();
                    if starting {
                        taking.set(take(which.len() - started, true));
                    }
                }
                else => return Ok(()),
            }
        }
    }

    /// Judges the `answers` of messages of `group` (positions in it); settles those whose
    /// fate is known with as many of the group's `slots`, and gives back the slots of those
    /// to retry.
    #[allow(clippy::too_many_arguments)]
    fn answered(
        &self,
        batch: Messages<'_>,
        group: &[usize],
        slots: &mut LaneSlots,
        answers: Vec<(usize, Attempt)>,
        attempt: u32,
        settle: &(dyn Fn(Settled) + Sync),
        next: &mut Next,
    ) -> Result<()> {
        if answers.iter().any(|(_, (o, _))| *o == Some(Outcome::Held)) {
            // Held at the gate: by a pause, or by a lease lost while waiting for tokens.
            self.check_guard()?;
        }
        self.metrics.record_latencies(
            (answers.iter())
                .filter(|(_, (outcome, _))| *outcome != Some(Outcome::Held))
                .map(|(_, (_, latency))| *latency),
        );
        let answered = answers.len();
        let mut fates = Vec::with_capacity(answered);
        for (k, (outcome, _)) in answers {
            self.judge(batch, group[k], outcome, attempt, &mut fates, next)?;
            self.observe(next, false)?;
        }
        let n = fates.len();
        let settled = Settled::each(fates, Some(slots.split(n)));
        // Those to retry wait holding no slot.
        drop(slots.split(answered - n));
        if !settled.is_empty() {
            settle(settled);
        }
        Ok(())
    }

    /// Shows the breaker the attempts counted in `next` (all of them when `now`, else once
    /// there are enough or the provider has not delivered yet); halts if it trips.
    fn observe(&self, next: &mut Next, now: bool) -> Result<()> {
        let seen = next.delivered + next.failed;
        if seen == 0 || !(now || seen >= BREAKER_EVERY || !self.breaker.proven()) {
            return Ok(());
        }
        let verdict = self
            .breaker
            .observe(next.delivered, next.failed, &next.cause);
        (next.delivered, next.failed) = (0, 0);
        match verdict {
            Some(why) => Err(self.halt_for(format!(
                "{why}: the provider is failing, not the users. Stopped without \
                 dead-lettering anyone; fix the provider and run again: every user not \
                 delivered yet is sent then"
            ))),
            None => Ok(()),
        }
    }

    /// Writes `messages` to the dead-letter file with `error`, never attempted (a policy
    /// outcome, not a provider's).
    pub fn dead_letter(&self, messages: Messages<'_>, error: &str) -> Result<()> {
        let messages: Vec<Message<'_>> = messages.iter().collect();
        let letters: Vec<(&Message<'_>, &str, u32)> =
            messages.iter().map(|m| (m, error, 0)).collect();
        self.dead.write(&letters)?;
        self.dead.flush()
    }

    /// What attempt `attempt`'s `outcome` means for `batch[i]`: a fate (pushed to `fates`,
    /// its dead letter written), or another attempt (in `next`); an error stops the run.
    fn judge(
        &self,
        batch: Messages<'_>,
        i: usize,
        outcome: Option<Outcome>,
        attempt: u32,
        fates: &mut Vec<(usize, Fate)>,
        next: &mut Next,
    ) -> Result<()> {
        let dead = |error: &str| -> Result<Fate> {
            self.dead.write(&[(&batch.get(i), error, attempt)])?;
            Ok(Fate::Dead)
        };
        let failed = |next: &mut Next, error: &str| {
            next.failed += 1;
            next.cause.clear();
            next.cause.push_str(error);
        };
        let fate = match outcome {
            None => {
                self.delivered(1, next);
                Fate::Delivered
            }
            Some(Outcome::Unreachable) => Fate::Unreachable,
            // Not sent (held while it waited for its rate token): left unsettled.
            Some(Outcome::Held) => return Ok(()),
            Some(Outcome::Fatal(error)) => return Err(self.halt_for(error)),
            // Until the provider has delivered once, a refusal may be the provider's (a wrong
            // URL), not the user's: tried again rather than dead-lettered.
            Some(Outcome::Permanent(error))
                if !self.breaker.proven() && attempt < self.max_attempts =>
            {
                failed(next, &error);
                next.retry.push(i);
                return Ok(());
            }
            Some(Outcome::Permanent(error)) => {
                failed(next, &error);
                dead(&error)?
            }
            Some(Outcome::Unsendable(error)) => dead(&error)?,
            Some(Outcome::InvalidToken(error)) => {
                self.metrics.count.invalid_tokens.fetch_add(1, Relaxed);
                dead(&error)?
            }
            Some(Outcome::Retry { error, after }) if attempt >= self.max_attempts => {
                if after.is_none() {
                    failed(next, &error);
                }
                dead(&error)?
            }
            Some(Outcome::Retry { error, after }) => {
                // A `Retry-After` is the provider asking us to slow down: it is up.
                if after.is_none() {
                    failed(next, &error);
                }
                next.retry.push(i);
                next.wait = next.wait.max(after.unwrap_or_default());
                return Ok(());
            }
            Some(Outcome::Unauthorized(error)) => {
                let in_a_row = self.unauthorized.fetch_add(1, Relaxed) + 1;
                if in_a_row >= UNAUTHORIZED_IN_A_ROW || attempt >= self.max_attempts {
                    return Err(self.stop(&error, in_a_row));
                }
                next.retry.push(i);
                return Ok(());
            }
        };
        fates.push((i, fate));
        Ok(())
    }

    /// Notes `n` messages delivered in this attempt: refusals in a row are over.
    fn delivered(&self, n: u64, next: &mut Next) {
        // Read first: a store on every delivery bounced the line between cores.
        if self.unauthorized.load(Relaxed) != 0 {
            self.unauthorized.store(0, Relaxed);
        }
        next.delivered += n;
    }

    fn check_guard(&self) -> Result<()> {
        match &self.guard {
            Some(guard) => guard(),
            None => Ok(()),
        }
    }

    /// Halts the dispatcher (once) for a credential refusal; returns the error to report.
    /// `error` names the provider already.
    fn stop(&self, error: &str, in_a_row: u32) -> Error {
        self.halt_for(format!(
            "{error} ({in_a_row} in a row): the provider refuses our credentials, not the \
             users. Stopped without dead-lettering anyone; fix the credentials and run again: \
             every user not delivered yet is sent then"
        ))
    }

    /// Halts because the store could not record fates the provider gave (a full disk, a
    /// store gone): every attempt in progress or to come fails with `e`. Called before those
    /// messages let go of their slots, so that they are the last ones sent: a run that fails
    /// on a write leaves at most `concurrency` messages sent and not recorded, as a crash
    /// does. Else each failed record would free slots for more sends whose records fail too.
    pub fn halt_unrecorded(&self, e: &Error) {
        let _ = self.halt_for(e.to_string());
    }

    /// Halts the dispatcher (the first reason given wins); returns the error to report.
    fn halt_for(&self, why: String) -> Error {
        if self.halted.set(why.clone()).is_ok() {
            tracing::info!(provider = %self.provider.name(), %why, "no more pushes; stopping");
        }
        self.halt.send_replace(true);
        self.halt_error()
    }

    fn check_halted(&self) -> Result<()> {
        match self.halted.get() {
            Some(_) => Err(self.halt_error()),
            None => Ok(()),
        }
    }

    fn halt_error(&self) -> Error {
        Error::runtime(
            self.halted
                .get()
                .map_or("the provider stopped the run", String::as_str),
        )
    }

    /// Makes the provider's output and the dead letters durable.
    pub async fn flush(&self) -> Result<()> {
        self.provider.flush()?;
        self.dead.flush()
    }
}

/// How long to wait before attempt `attempt + 1`: the backoff, but never less than the
/// provider asked for (`after`, already capped by [`super::remote::MAX_RETRY_AFTER`]).
fn retry_wait(attempt: u32, after: Duration) -> Duration {
    after.max(backoff(attempt))
}

/// Full jitter: a uniform wait in `[0, min(cap, base · 2^(attempt-1))]`.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    ceiling.mul_f64(rand::thread_rng().gen::<f64>())
}

#[cfg(test)]
mod tests;
