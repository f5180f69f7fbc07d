//! The operator's switch as the engine sees it (SPEC "Campaign control"): each target's
//! control state, polled from the store while a run or a `serve` generation lasts.
//!
//! `fanout campaigns pause|resume|cancel` writes the state to the store and bumps its control
//! version ([`crate::store::campaigns`]). [`watch`] polls that version every [`POLL`]; when it
//! moved it reads the states and applies them here, and wakes every push operator. The push
//! operator looks at a target's state before it claims ([`super::push`]): a paused target's
//! candidates wait unclaimed (a `run` parks them until the campaign is resumed or cancelled;
//! a `serve` generation drops them, and a later generation runs the campaign again once it
//! is resumed), and a cancelled target's candidates are claimed and settled as `cancelled`,
//! never sent. So nothing is claimed for a paused or cancelled campaign later than one poll
//! after the command returned, beyond the claims already under way at that moment.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::{Context, RunTarget};
use crate::store::campaigns::{Control, State};
use crate::store::Store;

/// How often the store's control version is read.
pub const POLL: Duration = Duration::from_millis(50);

/// What a target's control state asks of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    /// Claim and send.
    Running,
    /// Claim nothing; wait.
    Paused,
    /// Settle every user not yet claimed as cancelled.
    Cancelled,
}

impl Halt {
    fn of(state: Option<&State>) -> Halt {
        match state {
            Some(State::Paused) => Halt::Paused,
            Some(State::Cancelled) => Halt::Cancelled,
            Some(State::Running | State::Done) | None => Halt::Running,
        }
    }
}

/// What a paused target's candidates become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPause {
    /// Parked in the push operator until the campaign is resumed or cancelled (`run`: the
    /// run waits, and its summary accounts for every user).
    Wait,
    /// Dropped unclaimed, and the target marked [`Halts::dropped`] (`serve`: the generation
    /// goes on with the other campaigns; a later one runs this one again once resumed).
    Drop,
}

/// Every target's control state, as last read from the store.
pub struct Halts {
    /// Per target, a [`Halt`] as its index.
    states: Vec<AtomicU8>,
    /// Per target: candidates were dropped because it was paused ([`OnPause::Drop`]).
    dropped: Vec<AtomicBool>,
    /// Grows on every change applied: an operator that saw another value looks again.
    changes: AtomicU64,
    /// The same count, for tasks to wait on ([`Halts::changed`]).
    watch: tokio::sync::watch::Sender<u64>,
    /// Called on every change (each push operator wakes itself).
    wakers: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

const HALTS: [Halt; 3] = [Halt::Running, Halt::Paused, Halt::Cancelled];

impl Halts {
    /// `targets` targets, all running.
    pub fn new(targets: usize) -> Halts {
        Halts {
            states: (0..targets).map(|_| AtomicU8::new(0)).collect(),
            dropped: (0..targets).map(|_| AtomicBool::new(false)).collect(),
            changes: AtomicU64::new(0),
            watch: tokio::sync::watch::Sender::new(0),
            wakers: Mutex::new(Vec::new()),
        }
    }

    /// Target `t`'s state.
    pub fn of(&self, t: u32) -> Halt {
        let i = self
            .states
            .get(t as usize)
            .map_or(0, |s| s.load(Ordering::Acquire));
        HALTS[usize::from(i).min(2)]
    }

    /// How many changes were applied so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Whether candidates of target `t` were dropped because it was paused.
    pub fn dropped(&self, t: u32) -> bool {
        self.dropped
            .get(t as usize)
            .is_some_and(|d| d.load(Ordering::Acquire))
    }

    /// Notes that candidates of target `t` were dropped unclaimed ([`OnPause::Drop`]).
    pub fn note_dropped(&self, t: u32) {
        if let Some(d) = self.dropped.get(t as usize) {
            d.store(true, Ordering::Release);
        }
    }

    /// Returns once a change is applied after `seen` ([`Halts::changes`]).
    pub async fn changed(&self, seen: u64) {
        let mut rx = self.watch.subscribe();
        // The sender lives as long as `self`: an error cannot happen while we hold it.
        let _ = rx.wait_for(|now| *now != seen).await;
    }

    /// The count of changes, to subscribe to ([`crate::providers::dispatch::Hold`]).
    pub fn watch(&self) -> &tokio::sync::watch::Sender<u64> {
        &self.watch
    }

    /// Registers `wake`, called after every change.
    pub fn on_change(&self, wake: Box<dyn Fn() + Send + Sync>) {
        self.wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(wake);
    }

    /// Applies `states` (campaign id → state; a campaign missing is running) to `targets`;
    /// the ids of the campaigns whose state changed, with their new state.
    pub fn apply(
        &self,
        targets: &[RunTarget],
        states: &BTreeMap<String, State>,
    ) -> Vec<(String, Halt)> {
        let mut changed: Vec<(String, Halt)> = Vec::new();
        for (slot, rt) in self.states.iter().zip(targets) {
            let id = &rt.target.campaign.id;
            let halt = Halt::of(states.get(id));
            let was = slot.swap(halt as u8, Ordering::AcqRel);
            if was != halt as u8 && !changed.iter().any(|(c, _)| c == id) {
                changed.push((id.clone(), halt));
            }
        }
        if !changed.is_empty() {
            let now = self.changes.fetch_add(1, Ordering::AcqRel) + 1;
            self.watch.send_replace(now);
            for wake in self
                .wakers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
            {
                wake();
            }
        }
        changed
    }
}

/// Polls `store`'s control version every [`POLL`] from `version` on, and applies each change
/// to `ctx`'s targets, logging it; calls `changed` whenever the version moved. Runs until aborted ([`Watching`]);
/// a failed read is logged once per streak and retried at the next poll.
pub async fn watch(
    store: Store,
    ctx: Arc<Context>,
    mut version: u64,
    changed: Box<dyn Fn() + Send + Sync>,
) {
    let mut failing = false;
    loop {
        tokio::time::sleep(POLL).await;
        let control = match store.control_version().await {
            Ok(v) if v == version => continue,
            Ok(_) => store.control().await,
            Err(e) => Err(e),
        };
        match control {
            Ok(control) => {
                failing = false;
                version = control.version;
                let applied = ctx.halts.apply(&ctx.targets, &control.states);
                for (id, halt) in &applied {
                    tracing::warn!(campaign = %id, state = ?halt, "campaign control changed");
                }
                // Also when none of `ctx`'s targets changed: `serve` re-plans when a campaign
                // it left out (paused) is resumed.
                changed();
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot read the campaigns' control states; retrying");
            }
            Err(_) => {}
        }
    }
}

/// The [`watch`] task of a run or generation; aborted when dropped.
pub struct Watching(tokio::task::JoinHandle<()>);

impl Watching {
    /// Applies `store`'s control states to `ctx` now, then watches them on `ctx`'s runtime.
    pub async fn start(
        store: &Store,
        ctx: &Arc<Context>,
        changed: Box<dyn Fn() + Send + Sync>,
    ) -> crate::error::Result<Watching> {
        let control = store.control().await?;
        Ok(Watching::from(store, ctx, control, changed))
    }

    /// [`Watching::start`] from `control`, read by the caller: a change after that reading
    /// is one the watcher reports.
    pub fn from(
        store: &Store,
        ctx: &Arc<Context>,
        control: Control,
        changed: Box<dyn Fn() + Send + Sync>,
    ) -> Watching {
        for (id, halt) in ctx.halts.apply(&ctx.targets, &control.states) {
            tracing::warn!(campaign = %id, state = ?halt, "campaign is not running");
        }
        let task = ctx
            .runtime
            .spawn(watch(store.clone(), ctx.clone(), control.version, changed));
        Watching(task)
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.abort();
    }
}
