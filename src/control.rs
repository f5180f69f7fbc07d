//! `fanout campaigns list|show|pause|resume|cancel`: every campaign a store admitted, with its
//! state and outcome counts, and the operator's switch on each.
//!
//! **What is read.** A campaign is one the store has a [record](crate::store::campaigns) of.
//! Its outcome counts are summed over every ledger of it the store holds: the campaign's own,
//! and for a hot product one per occurrence (each occurrence is its own set of (occurrence,
//! user) pairs, so the sum counts pairs, as the run summary does). A store that a cluster split
//! (`file:DIR` with `DIR/PROCESSES`) is read part by part; each part's users are its own, so
//! the parts' sets are joined.
//!
//! **State.** The stored state (running unless an operator set another) is shown as `done`
//! when it is running, the window's end has passed on the system clock, and no user is in
//! flight or held for quiet hours ([`State::derive`]).
//!
//! **Activity, rate and ETA.** The store keeps each campaign's first and last push and the
//! runs and `serve` processes that pushed it ([`crate::store::campaigns::Activity`], written
//! when a run or generation ends). The rate is the settled users over that span. The store
//! keeps no eligible total (how many users a fan-out will reach is known only once its scan
//! is over), so the ETA is `null` here; `serve`'s status page estimates one from its scan.
//!
//! **Changes** (`pause`, `resume`, `cancel`) are written to every part of the store and are
//! durable when the command returns ([`Store::set_state`]); they need no lock and no lease,
//! so they reach a run or `serve` that holds the store.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::grants::reading_runtime;
use crate::model::{Kind, Priority};
use crate::report::OutcomeCounts;
use crate::store::campaigns::{rfc3339_text, Activity, CampaignRecord, State, Transition};
use crate::store::{Outcomes, Store};

/// One campaign as `list` and `show` print it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// The campaign id.
    pub id: String,
    /// What it does.
    pub kind: Kind,
    /// Its lane.
    pub priority: Priority,
    /// The state to act on: the stored one, or `done` ([`State::derive`]).
    pub state: State,
    /// The state an operator set (`running` if none).
    pub stored_state: State,
    /// Start of the window, RFC 3339.
    pub start: String,
    /// End of the window (exclusive), RFC 3339.
    pub end: String,
    /// When the store first admitted it.
    pub admitted_at: String,
    /// Its holdout share.
    pub holdout: f64,
    /// The ledgers counted: the campaign id, or `id:occurrence` for each occurrence.
    pub ledgers: Vec<String>,
    /// Users by outcome, summed over `ledgers`.
    pub outcomes: OutcomeCounts,
    /// Users settled (every outcome but in flight and quiet-held).
    pub settled: u64,
    /// The first push any run or `serve` recorded, RFC 3339 (`null` before one ended).
    pub first_send: Option<String>,
    /// The last push recorded, likewise.
    pub last_send: Option<String>,
    /// Settled users per second from the first push to the last (`null` with no span).
    pub rate_per_s: Option<f64>,
    /// Seconds left; needs an eligible total the store does not keep (`null`).
    pub eta_s: Option<f64>,
    /// The runs and `serve` processes that pushed it, oldest first (the last 16).
    pub workers: Vec<String>,
}

/// What `fanout campaigns list --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Listing {
    /// The store, without its password.
    pub store: String,
    /// Every campaign it has a record of, by id.
    pub campaigns: Vec<Status>,
}

/// Checks an id given on the command line (exit 2 when it is not one).
fn check_id(id: &str) -> Result<()> {
    if crate::job::is_valid_id(id) {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "campaign {id:?}: not a campaign id: expected [A-Za-z0-9_-], 1 to 64 characters"
    )))
}

/// The parts of the store at `url` (one unless a cluster split it); a store directory that
/// does not exist is a usage error (exit 2).
fn parts(url: &str) -> Result<Vec<String>> {
    if let Some(dir) = crate::store::file_dir(url) {
        if !std::path::Path::new(dir).is_dir() {
            return Err(Error::Usage(format!(
                "store {url}: no such directory (no run has used this store)"
            )));
        }
    }
    crate::run::cluster::store_parts(url)
}

/// What one campaign's reading gathers over the parts.
#[derive(Default)]
struct Gathered {
    record: Option<CampaignRecord>,
    state: State,
    activity: Activity,
    /// Ledger key → its users by outcome, joined over the parts.
    ledgers: BTreeMap<String, Outcomes>,
}

/// Reads campaigns `only` (every one with a record when `None`) from every part of `url`.
fn gather(url: &str, only: Option<&str>) -> Result<BTreeMap<String, Gathered>> {
    let runtime = reading_runtime()?;
    let mut found: BTreeMap<String, Gathered> = BTreeMap::new();
    for part in parts(url)? {
        runtime.block_on(async {
            let store = Store::connect_read_only(&part).await?;
            gather_part(&store, only, &mut found).await
        })?;
    }
    Ok(found)
}

/// Adds campaigns `only` (every one with a record when `None`) of one part of a store to
/// `found`.
async fn gather_part(
    store: &Store,
    only: Option<&str>,
    found: &mut BTreeMap<String, Gathered>,
) -> Result<()> {
    let ids = match only {
        Some(id) => vec![id.to_owned()],
        None => store.campaign_ids().await?,
    };
    let states = store.states().await?;
    for id in ids {
        let Some(record) = store.campaign(&id).await? else {
            continue;
        };
        let g = found.entry(id.clone()).or_default();
        g.record.get_or_insert(record);
        // Parts disagree only when a change reached some of them: show the stronger state
        // (cancelled over paused over running).
        g.state = g.state.max(states.get(&id).copied().unwrap_or_default());
        let activity = store.activity(&id).await?;
        if let Some((first, last)) = activity.first_send_ms.zip(activity.last_send_ms) {
            for worker in &activity.workers {
                g.activity.merge(first, last, worker);
            }
        }
        for key in store.ledger_keys(&id).await? {
            let outcomes = store.outcomes(&key).await?;
            g.ledgers.entry(key).or_default().join(outcomes);
        }
    }
    Ok(())
}

/// Every campaign `store` (one part) has a record of, by id, as `list` shows them: what
/// `serve`'s status page reads from the store it holds.
pub async fn statuses(store: &Store) -> Result<Vec<Status>> {
    let mut found = BTreeMap::new();
    gather_part(store, None, &mut found).await?;
    let now = Utc::now();
    Ok(found
        .into_iter()
        .filter_map(|(id, g)| status(id, g, now))
        .collect())
}

/// The status of one gathered campaign, its state derived at `now`.
fn status(id: String, g: Gathered, now: DateTime<Utc>) -> Option<Status> {
    let record = g.record?;
    let mut o = OutcomeCounts::default();
    for l in g.ledgers.values() {
        o.add(OutcomeCounts::of(l));
    }
    let settled = o.settled();
    let span = g.activity.span();
    let rate_per_s = span.and_then(|(first, last)| {
        let secs = (last - first).num_milliseconds() as f64 / 1000.0;
        (secs > 0.0).then(|| settled as f64 / secs)
    });
    Some(Status {
        id,
        kind: record.kind,
        priority: record.priority,
        state: g.state.derive(record.end, now, o.in_flight + o.quiet_held),
        stored_state: g.state,
        start: rfc3339_text(&record.start),
        end: rfc3339_text(&record.end),
        admitted_at: rfc3339_text(&record.admitted_at),
        holdout: record.holdout,
        ledgers: g.ledgers.into_keys().collect(),
        outcomes: o,
        settled,
        first_send: span.map(|(first, _)| rfc3339_text(&first)),
        last_send: span.map(|(_, last)| rfc3339_text(&last)),
        rate_per_s,
        eta_s: None,
        workers: g.activity.workers,
    })
}

/// Every campaign of the store at `url`, by id (`fanout campaigns list`).
pub fn list(url: &str) -> Result<Listing> {
    let now = Utc::now();
    let campaigns = gather(url, None)?
        .into_iter()
        .filter_map(|(id, g)| status(id, g, now))
        .collect();
    Ok(Listing {
        store: crate::store::redis::shown(url),
        campaigns,
    })
}

/// Campaign `id` of the store at `url` (`fanout campaigns show`); a usage error naming it
/// when the store has no record of it.
pub fn show(url: &str, id: &str) -> Result<Status> {
    check_id(id)?;
    gather(url, Some(id))?
        .remove(id)
        .and_then(|g| status(id.to_owned(), g, Utc::now()))
        .ok_or_else(|| unknown(url, id))
}

/// The error for a campaign the store at `url` has no record of.
fn unknown(url: &str, id: &str) -> Error {
    Error::Usage(format!(
        "store {} has no campaign {id:?}: no run or serve admitted it there",
        crate::store::redis::shown(url)
    ))
}

/// Sets campaign `id`'s state in every part of the store at `url`
/// (`fanout campaigns pause|resume|cancel`); durable when it returns. Returns what the first
/// part that knows the campaign held before.
pub fn set(url: &str, id: &str, state: State) -> Result<Transition> {
    check_id(id)?;
    let runtime = reading_runtime()?;
    let parts = parts(url)?;
    let stores = parts
        .iter()
        .map(|part| runtime.block_on(Store::connect_read_only(part)))
        .collect::<Result<Vec<_>>>()?;
    // Every part first, so an unknown id or a cancelled campaign changes no part.
    let mut known = Vec::new();
    let mut unknown_parts = Vec::new();
    for (part, store) in parts.iter().zip(&stores) {
        if runtime.block_on(store.campaign(id))?.is_none() {
            // A part of a split store whose process has not admitted it yet (or never
            // will: not every process's users are in every audience) gets the state too,
            // so that process honours it from its first epoch.
            if stores.len() > 1 {
                unknown_parts.extend(crate::store::file_dir(part));
            }
        } else {
            let from = runtime
                .block_on(store.states())?
                .get(id)
                .copied()
                .unwrap_or_default();
            crate::store::campaigns::check_transition(id, from, state)?;
            known.push(store);
        }
    }
    if known.is_empty() {
        return Err(unknown(url, id));
    }
    let mut first = None;
    for store in known {
        let t = runtime.block_on(store.set_state(id, state))?;
        first.get_or_insert(t);
    }
    for dir in unknown_parts {
        crate::store::file::set_state_in(std::path::Path::new(dir), id, state)?;
    }
    Ok(first.unwrap_or(Transition::Unchanged))
}

/// What a state change prints.
pub fn render_change(id: &str, state: State, t: Transition) -> String {
    match t {
        Transition::Unchanged => format!("campaign {id} was already {state}\n"),
        Transition::Changed(from) => format!("campaign {id}: {from} → {state}\n"),
    }
}

/// The outcome columns of the table, in order.
fn outcome_columns(o: &OutcomeCounts) -> [(&'static str, u64); 8] {
    [
        ("delivered", o.delivered),
        ("dead_lettered", o.dead_lettered),
        ("unreachable", o.unreachable),
        ("held_out", o.held_out),
        ("capped", o.capped),
        ("cancelled", o.cancelled),
        ("quiet_held", o.quiet_held),
        ("in_flight", o.in_flight),
    ]
}

/// The listing as a table, one campaign a line; a line saying so when there is none.
pub fn render_table(l: &Listing) -> String {
    if l.campaigns.is_empty() {
        return format!("store {} has no campaigns\n", l.store);
    }
    let header: Vec<&str> = ["ID", "KIND", "PRIORITY", "STATE", "WINDOW"]
        .into_iter()
        .chain(
            outcome_columns(&OutcomeCounts::default())
                .iter()
                .map(|(n, _)| *n),
        )
        .collect();
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_uppercase()).collect()];
    for c in &l.campaigns {
        let mut row = vec![
            c.id.clone(),
            c.kind.name().to_owned(),
            c.priority.name().to_owned(),
            c.state.name().to_owned(),
            format!("{} .. {}", c.start, c.end),
        ];
        row.extend(
            outcome_columns(&c.outcomes)
                .iter()
                .map(|(_, n)| n.to_string()),
        );
        rows.push(row);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            // Text columns left, counts right.
            if i < 5 {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
            line.push_str("  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One campaign, for people.
pub fn render_status(c: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "campaign {}", c.id);
    let stored = match c.state == c.stored_state {
        true => String::new(),
        false => format!(
            " (stored {}; window ended, nothing in flight)",
            c.stored_state
        ),
    };
    let _ = writeln!(out, "  state        {}{stored}", c.state);
    let _ = writeln!(
        out,
        "  {}, priority {}, holdout {}",
        c.kind.name(),
        c.priority.name(),
        c.holdout
    );
    let _ = writeln!(out, "  window       {} .. {}", c.start, c.end);
    let _ = writeln!(out, "  admitted     {}", c.admitted_at);
    let _ = writeln!(
        out,
        "  ledgers      {}",
        match c.ledgers.len() {
            0 => "none yet".to_owned(),
            n if c.kind == Kind::HotProduct => format!("{n} occurrence(s), summed"),
            _ => "1".to_owned(),
        }
    );
    out.push_str("outcomes:\n");
    for (name, n) in outcome_columns(&c.outcomes) {
        let _ = writeln!(out, "  {name:<14}{n:>12}");
    }
    let _ = writeln!(out, "  {:<14}{:>12}", "settled", c.settled);
    match (&c.first_send, &c.last_send) {
        (Some(first), Some(last)) => {
            let _ = writeln!(out, "sends        {first} .. {last}");
        }
        _ => out.push_str("sends        none recorded yet (a run records them as it ends)\n"),
    }
    if let Some(rate) = c.rate_per_s {
        let _ = writeln!(
            out,
            "rate         {rate:.1} users/s (settled over that span)"
        );
    }
    out.push_str("ETA          not kept by the store (serve's status page estimates one)\n");
    if !c.workers.is_empty() {
        let _ = writeln!(out, "worked on by {}", c.workers.join("; "));
    }
    out
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn gathered(state: State, in_flight: &[u32]) -> Gathered {
        let t = |d| Utc.with_ymd_and_hms(2026, 3, d, 0, 0, 0).unwrap();
        let mut ledger = Outcomes::default();
        ledger.delivered.insert_range(1..11);
        ledger.in_flight.extend(in_flight.iter().copied());
        let mut other = Outcomes::default();
        other.delivered.insert_range(1..4);
        other.capped.insert(7);
        Gathered {
            record: Some(CampaignRecord {
                id: "hot".into(),
                kind: Kind::HotProduct,
                start: t(1),
                end: t(8),
                priority: Priority::Bulk,
                holdout: 0.0,
                admitted_at: t(1),
            }),
            state,
            activity: Activity::default(),
            ledgers: [
                ("hot:2026-03-02T00:00:00Z".to_owned(), ledger),
                ("hot:2026-03-02T01:00:00Z".to_owned(), other),
            ]
            .into(),
        }
    }

    /// The rate is the settled users over the span of the recorded pushes; workers merge
    /// newest last, each once, the last 16 kept.
    #[test]
    fn rate_and_workers_come_from_the_recorded_activity() {
        let now = Utc.with_ymd_and_hms(2026, 3, 7, 0, 0, 0).unwrap();
        let s = status("hot".into(), gathered(State::Running, &[]), now).unwrap();
        assert_eq!((s.first_send, s.rate_per_s), (None, None));
        let mut g = gathered(State::Running, &[]);
        let t0 = Utc
            .with_ymd_and_hms(2026, 3, 2, 0, 0, 0)
            .unwrap()
            .timestamp_millis();
        g.activity.merge(t0 + 1000, t0 + 2000, "run pid 2");
        g.activity.merge(t0, t0 + 1500, "run pid 1");
        g.activity.merge(t0, t0 + 1000, "run pid 2");
        let s = status("hot".into(), g, now).unwrap();
        assert_eq!(s.first_send.as_deref(), Some("2026-03-02T00:00:00Z"));
        assert_eq!(s.last_send.as_deref(), Some("2026-03-02T00:00:02Z"));
        assert_eq!(s.rate_per_s, Some(7.0), "14 settled over 2 s");
        assert_eq!(s.workers, ["run pid 1", "run pid 2"]);
        let mut a = Activity::default();
        for i in 0..20 {
            a.merge(t0, t0, &format!("w{i}"));
        }
        assert_eq!(a.workers.len(), 16);
        assert_eq!(
            (a.workers[0].as_str(), a.workers[15].as_str()),
            ("w4", "w19")
        );
    }

    #[test]
    fn occurrences_are_summed_and_done_is_derived_from_the_window_and_in_flight() {
        let before_end = Utc.with_ymd_and_hms(2026, 3, 7, 0, 0, 0).unwrap();
        let after_end = Utc.with_ymd_and_hms(2026, 3, 8, 0, 0, 0).unwrap();
        let s = status("hot".into(), gathered(State::Running, &[]), after_end).unwrap();
        assert_eq!((s.outcomes.delivered, s.outcomes.capped), (13, 1));
        assert_eq!(s.settled, 14);
        assert_eq!((s.state, s.stored_state), (State::Done, State::Running));
        let s = status("hot".into(), gathered(State::Running, &[20]), after_end).unwrap();
        assert_eq!(s.state, State::Running);
        let s = status("hot".into(), gathered(State::Running, &[]), before_end).unwrap();
        assert_eq!(s.state, State::Running);
        for kept in [State::Paused, State::Cancelled] {
            let s = status("hot".into(), gathered(kept, &[]), after_end).unwrap();
            assert_eq!(s.state, kept);
        }
        let cancelled = status("hot".into(), gathered(State::Cancelled, &[]), after_end).unwrap();
        let table = render_table(&Listing {
            store: "file:s".into(),
            campaigns: vec![cancelled],
        });
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "{table}");
        assert!(lines[0].starts_with("ID ") && lines[0].contains("DELIVERED"));
        assert!(lines[1].split_whitespace().any(|w| w == "cancelled"));
        assert!(lines[1].split_whitespace().any(|w| w == "13"));
    }

    #[test]
    fn ids_that_are_not_ids_are_refused_with_exit_2() {
        assert_eq!(check_id("not an id").unwrap_err().exit_code(), 2);
        assert!(check_id("spring-sale_2026").is_ok());
    }
}
