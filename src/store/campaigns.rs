//! Campaign records: what the store knows of each campaign it admitted, beyond its ledgers —
//! its kind, window, priority and holdout, and when it was first admitted — so that commands
//! that get no job file (`fanout report`) can still ask about a campaign.
//!
//! A record is written when a run or `serve` admits the campaign (right after the
//! repeated-campaign guard lets it in) and rewritten on every later admission of the same id:
//! the fields follow the newest admission, except `admitted_at`, which stays the first one's.
//! Records are kept per campaign id, never per occurrence.
//!
//! The embedded store keeps one JSON file per campaign ([`file`](super::file) `campaigns/`);
//! Redis one hash per campaign (`fanout:campaign:{id}`, see [`redis`](super::redis)).
//!
//! # Control state
//! Beside the records, each store keeps the *control state* an operator set with `fanout
//! campaigns pause|resume|cancel` ([`State`]): small, in one place per store, with a version
//! that grows on every change, so a run or `serve` can poll one thing per epoch
//! ([`Store::control_version`]) and read every state ([`Store::states`]) only when it moved.
//! - embedded store: `DIR/control.json`, `{"version": N, "states": {"<id>": "paused", …}}`,
//!   replaced whole (temp file, fsync, rename, directory fsync) under its own lock file
//!   `DIR/CONTROL.LOCK` — never the store's `DIR/LOCK`, which a running `run` or `serve` holds
//!   for its whole life: a control command writes beside it and the run reads the file.
//! - Redis: the hash `fanout:control` (campaign id → state) and the counter
//!   `fanout:control:version`, changed together by one script (see
//!   [`redis`](super::redis) `campaigns`).
//!
//! A campaign without an entry is `running`. `cancelled` is final. `done` is never stored: it
//! is derived where it is shown (see [`State::Done`]).
//!
//! # Activity
//! Each run and `serve` generation that pushed something of a campaign records, when it ends,
//! the first and last push it saw and who it was ([`Activity`], [`Store::note_activity`]):
//! merged (earliest first, latest last, the last [`MAX_WORKERS`] workers), so `fanout
//! campaigns show` can tell when a campaign was sent, at what rate and by which processes.
//! - embedded store: `DIR/activity/<id>.json`, replaced whole by the writer holding the store;
//! - Redis: the hash `fanout:activity:{id}` (`first`, `last`: ms since the Unix epoch) and the
//!   list `fanout:activity:{id}:workers`, merged by one script.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::Store;
use crate::error::{Error, Result};
use crate::model::{Campaign, Kind, Priority};

/// What the store keeps of one admitted campaign.
///
/// Unknown fields are ignored when read, so a record written by a newer fanout (with the
/// campaign's state) still reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignRecord {
    /// The campaign id.
    pub id: String,
    /// What it does.
    pub kind: Kind,
    /// Start of the valid window, inclusive.
    #[serde(with = "rfc3339")]
    pub start: DateTime<Utc>,
    /// End of the valid window, exclusive.
    #[serde(with = "rfc3339")]
    pub end: DateTime<Utc>,
    /// Its lane in the dispatcher.
    pub priority: Priority,
    /// Share of the audience held out as its control group, `0.0 ..= 1.0`.
    pub holdout: f64,
    /// When the store first admitted it (the system clock, not the job's `now`).
    #[serde(with = "rfc3339")]
    pub admitted_at: DateTime<Utc>,
}

impl CampaignRecord {
    /// The record of `campaign`, admitted at `at`.
    pub fn admitted(campaign: &Campaign, at: DateTime<Utc>) -> Self {
        CampaignRecord {
            id: campaign.id.clone(),
            kind: campaign.kind,
            start: campaign.start,
            end: campaign.end,
            priority: campaign.priority,
            holdout: campaign.holdout,
            admitted_at: at,
        }
    }
}

/// Workers an [`Activity`] remembers, the newest.
pub const MAX_WORKERS: usize = 16;

/// When a campaign was pushed and by whom, over every run and `serve` that pushed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// The first push recorded (ms since the Unix epoch, system clock).
    pub first_send_ms: Option<i64>,
    /// The last push recorded, likewise.
    pub last_send_ms: Option<i64>,
    /// The runs and `serve` processes that pushed it, oldest first, at most [`MAX_WORKERS`].
    #[serde(default)]
    pub workers: Vec<String>,
}

impl Activity {
    /// Adds a worker's pushes from `first_ms` to `last_ms`.
    pub fn merge(&mut self, first_ms: i64, last_ms: i64, worker: &str) {
        self.first_send_ms = Some(self.first_send_ms.map_or(first_ms, |f| f.min(first_ms)));
        self.last_send_ms = Some(self.last_send_ms.map_or(last_ms, |l| l.max(last_ms)));
        self.workers.retain(|w| w != worker);
        self.workers.push(worker.to_owned());
        let over = self.workers.len().saturating_sub(MAX_WORKERS);
        self.workers.drain(..over);
    }

    /// `first_send_ms` and `last_send_ms` as instants.
    pub fn span(&self) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        let at = |ms: Option<i64>| ms.and_then(DateTime::<Utc>::from_timestamp_millis);
        at(self.first_send_ms).zip(at(self.last_send_ms))
    }
}

/// A campaign's control state (SPEC "Campaign control and status").
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Claimed and sent as usual: every admitted campaign until an operator says otherwise.
    #[default]
    Running,
    /// Nothing new is claimed for it; `resume` continues where it stopped.
    Paused,
    /// Final: nothing new is claimed, its unclaimed users count as `cancelled`, a lazy coupon
    /// stops granting. It cannot be resumed.
    Cancelled,
    /// Derived, never stored: a `running` campaign whose window has ended and whose ledgers
    /// hold nobody in flight or held for quiet hours — nothing more will be sent
    /// ([`State::derive`]).
    Done,
}

impl State {
    /// Every state, in the order above.
    pub const ALL: [State; 4] = [State::Running, State::Paused, State::Cancelled, State::Done];

    /// The name as the CLI and the stores write it.
    pub fn name(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Cancelled => "cancelled",
            State::Done => "done",
        }
    }

    /// Whether a run may claim users for a campaign in this state (`running` only; `done`
    /// has nothing left to claim).
    pub fn claims(self) -> bool {
        self == State::Running
    }

    /// The state to show for a campaign whose stored state is `self`: `done` instead of
    /// `running` once `now` is at or past the window's `end` and `unsettled` (users in
    /// flight or held for quiet hours, over all its ledgers) is 0. A paused or cancelled
    /// campaign keeps its state: it says more than `done` would.
    pub fn derive(self, end: DateTime<Utc>, now: DateTime<Utc>, unsettled: u64) -> State {
        match self {
            State::Running if now >= end && unsettled == 0 => State::Done,
            s => s,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for State {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|state| state.name() == s)
            .ok_or_else(|| {
                format!("{s:?} is not a campaign state (running, paused, cancelled, done)")
            })
    }
}

/// The stored control states of a store and their version (see the [module docs](self)).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// Grows by one on every change of any state; 0 before the first.
    pub version: u64,
    /// Campaign id → state, for every campaign an operator ever set; any other is running.
    pub states: BTreeMap<String, State>,
}

/// What [`Store::set_state`] found before it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The state changed from the one given (the version grew).
    Changed(State),
    /// It already was the state asked for: nothing written.
    Unchanged,
}

/// Refuses what no store may record: `done` (derived) and leaving `cancelled` (final).
pub(crate) fn check_transition(id: &str, from: State, to: State) -> Result<()> {
    match (from, to) {
        (_, State::Done) => Err(Error::Usage(format!(
            "campaign {id:?}: done is not set, it is derived (the window ended and nothing is \
             in flight)"
        ))),
        (State::Cancelled, State::Running | State::Paused) => Err(Error::Usage(format!(
            "campaign {id:?} is cancelled, and cancelling is final: it cannot be {}; submit it \
             again under a new id to send it",
            match to {
                State::Running => "resumed",
                _ => "paused",
            }
        ))),
        _ => Ok(()),
    }
}

/// An instant as RFC 3339 with whole seconds or finer, UTC (`2026-03-01T00:00:00Z`).
pub(crate) fn rfc3339_text(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Serde for `DateTime<Utc>` as RFC 3339 text (chrono is built without its serde feature).
mod rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339_text(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.to_utc())
            .map_err(|e| serde::de::Error::custom(format!("not an RFC 3339 time {text:?}: {e}")))
    }
}

impl Store {
    /// Records `campaigns` as admitted now (see the [module docs](self)): one record per id,
    /// each written whole (a crash leaves the old record or the new one, never a mix). Called
    /// right after [`Store::admit`] let them in; refused on a store opened read-only.
    pub async fn save_campaigns(&self, campaigns: &[&Campaign]) -> Result<()> {
        // Whole seconds: finer would only suggest a precision the record does not need.
        let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 0);
        let mut records: Vec<CampaignRecord> = Vec::with_capacity(campaigns.len());
        for c in campaigns {
            // A hot product admitted at several occurrences is still one campaign.
            if !records.iter().any(|r| r.id == c.id) {
                records.push(CampaignRecord::admitted(c, now));
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        match self {
            Store::File(store) => {
                let store = std::sync::Arc::clone(store);
                super::off_runtime(move || store.save_campaigns(&records)).await
            }
            Store::Redis(store) => store.save_campaigns(&records).await,
        }
    }

    /// The record of campaign `id`; `None` if this store never admitted it (or admitted it
    /// before fanout kept records).
    pub async fn campaign(&self, id: &str) -> Result<Option<CampaignRecord>> {
        match self {
            Store::File(store) => store.campaign(id),
            Store::Redis(store) => store.campaign(id).await,
        }
    }

    /// Sets campaign `id`'s control state to `state` and returns once the change is durable:
    /// on the embedded store `DIR/control.json` is fsynced and renamed into place; on Redis
    /// the server acknowledged it (as durable as its `appendfsync` makes any write).
    ///
    /// It needs neither the store's lock nor a Redis lease, so it works on a store opened
    /// read-only ([`Store::connect_read_only`]) while a run or `serve` holds the store: that
    /// is how `fanout campaigns pause` reaches them. Refused with a usage error (exit 2):
    /// a campaign this store has no record of (naming it), `done` (derived, see
    /// [`State::Done`]), and resuming or pausing a cancelled campaign (final).
    pub async fn set_state(&self, id: &str, state: State) -> Result<Transition> {
        check_transition(id, State::Running, state)?;
        match self {
            Store::File(store) => {
                let store = std::sync::Arc::clone(store);
                let id = id.to_owned();
                super::off_runtime(move || store.set_state(&id, state)).await
            }
            Store::Redis(store) => store.set_state(id, state).await,
        }
    }

    /// Every stored control state with its version, read at once (one file read; on Redis
    /// one `HGETALL` and one `GET` in a transaction).
    pub async fn control(&self) -> Result<Control> {
        match self {
            Store::File(store) => store.control(),
            Store::Redis(store) => store.control().await,
        }
    }

    /// Every stored control state: campaign id → `running`, `paused` or `cancelled`. A
    /// campaign missing from the map is running.
    pub async fn states(&self) -> Result<BTreeMap<String, State>> {
        Ok(self.control().await?.states)
    }

    /// The control version: grows on every state change, 0 before the first. Cheap enough to
    /// poll once an epoch (one small file read; one Redis `GET`): when it moved, read
    /// [`Store::control`] or [`Store::states`].
    pub async fn control_version(&self) -> Result<u64> {
        match self {
            Store::File(store) => Ok(store.control()?.version),
            Store::Redis(store) => store.control_version().await,
        }
    }

    /// Records that `worker` pushed campaign `id` from `first_ms` to `last_ms` (ms since the
    /// Unix epoch), merged into its [`Activity`]; refused on a store opened read-only.
    pub async fn note_activity(
        &self,
        id: &str,
        first_ms: i64,
        last_ms: i64,
        worker: &str,
    ) -> Result<()> {
        match self {
            Store::File(store) => {
                let (store, id, worker) = (
                    std::sync::Arc::clone(store),
                    id.to_owned(),
                    worker.to_owned(),
                );
                super::off_runtime(move || store.note_activity(&id, first_ms, last_ms, &worker))
                    .await
            }
            Store::Redis(store) => store.note_activity(id, first_ms, last_ms, worker).await,
        }
    }

    /// Campaign `id`'s [`Activity`] (empty when nothing of it was pushed yet).
    pub async fn activity(&self, id: &str) -> Result<Activity> {
        match self {
            Store::File(store) => store.activity(id),
            Store::Redis(store) => store.activity(id).await,
        }
    }

    /// The ids of every campaign this store has a record of, sorted.
    pub async fn campaign_ids(&self) -> Result<Vec<String>> {
        match self {
            Store::File(store) => store.campaign_ids(),
            Store::Redis(store) => store.campaign_ids().await,
        }
    }

    /// The ledger keys of campaign `id` found in the store, sorted: `id` itself when it has a
    /// ledger, and one `id:occurrence` per occurrence of a scheduled campaign (hot product).
    pub async fn ledger_keys(&self, id: &str) -> Result<Vec<String>> {
        match self {
            Store::File(store) => store.ledger_keys(id),
            Store::Redis(store) => store.ledger_keys(id).await,
        }
    }
}
