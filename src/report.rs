//! `fanout report`: what became of a campaign (occurrence) — its users by recorded outcome —
//! and, given a file of conversion events, whether sending it changed anything: the
//! conversion rate of the users it was delivered to against that of the users held out of it.
//!
//! **Conversions.** A user *converted* if the file holds at least one event of theirs at or
//! after the campaign's start and before its end + 7 days (SPEC "Holdouts"); the window comes
//! from the store's [campaign record](crate::store::campaigns), so no job file is needed. A
//! group's rate is its converted users over its users; the *lift* is delivered's rate minus
//! held-out's (absolute, in proportion points) and that over held-out's rate (relative).
//!
//! **Confidence interval.** The 95% interval of the difference of the two proportions by the
//! unpooled Wald method: `d ± z·√(p₁(1−p₁)/n₁ + p₂(1−p₂)/n₂)`, `z` = 1.959964 (the 97.5th
//! percentile of the standard normal). Like every Wald interval it is poor for tiny groups or
//! rates near 0 or 1 (it collapses to a point when both rates are 0 or 1).
//!
//! A group without users has no rate, and then there is no lift and no interval: the report
//! says so instead of dividing by zero. The same when the held-out rate is 0, for the
//! relative lift alone.

use chrono::{DateTime, Duration, Utc};
use roaring::RoaringBitmap;
use serde::Serialize;

use crate::error::{Error, InputError, Result};
use crate::grants::{check_question, reading_runtime};
use crate::model::{ledger_key, Kind};
use crate::sources::lines::for_each_line;
use crate::sources::logins::parse_login;
use crate::store::campaigns::{rfc3339_text, CampaignRecord};
use crate::store::{Outcomes, Store};

/// How long after a campaign's end a conversion still counts.
pub const ATTRIBUTION: Duration = Duration::days(7);

/// The normal quantile of a two-sided 95% interval.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// How the interval is computed, as the report states it.
pub const CI_METHOD: &str = "two-proportion difference, unpooled Wald: \
                             d ± 1.96·√(p₁(1−p₁)/n₁ + p₂(1−p₂)/n₂)";

/// What `fanout report` is asked.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    /// The store URL.
    pub store: &'a str,
    /// The campaign id.
    pub campaign: &'a str,
    /// The occurrence of a scheduled campaign (its tick's start, any RFC 3339 spelling).
    pub occurrence: Option<&'a str>,
    /// The conversions file (JSON Lines `{"user", "ts"}`), if any.
    pub conversions: Option<&'a str>,
}

/// The report: what `fanout report` prints, and writes with `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The campaign id.
    pub campaign: String,
    /// The occurrence reported on (hot products), as the ledger names it.
    pub occurrence: Option<String>,
    /// The store's record of the campaign; `null` for one admitted before records were kept.
    pub record: Option<CampaignRecord>,
    /// How many users ended in each outcome.
    pub outcomes: OutcomeCounts,
    /// The comparison with the held-out users (`--conversions` only).
    pub conversions: Option<Conversions>,
}

/// How many users of the ledger ended in each outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutcomeCounts {
    /// Pushed and accepted (or granted).
    pub delivered: u64,
    /// Refused permanently, or out of attempts.
    pub dead_lettered: u64,
    /// No push token.
    pub unreachable: u64,
    /// In the holdout or the control group.
    pub held_out: u64,
    /// Claimed, not yet settled.
    pub in_flight: u64,
    /// Held for their quiet hours, not sent yet.
    pub quiet_held: u64,
    /// A frequency cap bound: never sent for this occurrence.
    pub capped: u64,
    /// Not claimed when the campaign was cancelled: never sent.
    pub cancelled: u64,
}

impl OutcomeCounts {
    /// How many users each outcome set holds.
    pub fn of(o: &Outcomes) -> OutcomeCounts {
        OutcomeCounts {
            delivered: o.delivered.len(),
            dead_lettered: o.dead_lettered.len(),
            unreachable: o.unreachable.len(),
            held_out: o.held_out.len(),
            in_flight: o.in_flight.len(),
            quiet_held: o.quiet_held.len(),
            capped: o.capped.len(),
            cancelled: o.cancelled.len(),
        }
    }

    /// Adds `other`'s counts to these (the ledgers of one campaign's occurrences).
    pub fn add(&mut self, other: OutcomeCounts) {
        self.delivered += other.delivered;
        self.dead_lettered += other.dead_lettered;
        self.unreachable += other.unreachable;
        self.held_out += other.held_out;
        self.in_flight += other.in_flight;
        self.quiet_held += other.quiet_held;
        self.capped += other.capped;
        self.cancelled += other.cancelled;
    }

    /// Users settled: every outcome but in flight and quiet-held.
    pub fn settled(&self) -> u64 {
        self.delivered
            + self.dead_lettered
            + self.unreachable
            + self.held_out
            + self.capped
            + self.cancelled
    }
}

/// Conversion rates of delivered and held-out users, and the lift.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conversions {
    /// The conversions file as given.
    pub file: String,
    /// Events count in `[window_start, window_end)`: the campaign's start, its end + 7 days.
    #[serde(serialize_with = "as_rfc3339")]
    pub window_start: DateTime<Utc>,
    /// See `window_start`.
    #[serde(serialize_with = "as_rfc3339")]
    pub window_end: DateTime<Utc>,
    /// Events in the file.
    pub events: u64,
    /// Of them, inside the window.
    pub events_in_window: u64,
    /// The delivered users.
    pub delivered: Group,
    /// The held-out users.
    pub held_out: Group,
    /// Delivered against held out.
    pub lift: Lift,
}

/// One group's conversions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Group {
    /// Users in the group.
    pub users: u64,
    /// Of them, those with at least one conversion in the window.
    pub converted: u64,
    /// `converted / users`; `None` for an empty group.
    pub rate: Option<f64>,
}

impl Group {
    /// A group of `users`, `converted` of whom converted.
    pub fn new(users: u64, converted: u64) -> Self {
        let rate = (users > 0).then(|| converted as f64 / users as f64);
        Group {
            users,
            converted,
            rate,
        }
    }
}

/// The lift of delivered over held out, with its 95% interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lift {
    /// Delivered's rate minus held-out's; `None` if either group is empty.
    pub absolute: Option<f64>,
    /// `absolute` over held-out's rate; `None` also when that rate is 0.
    pub relative: Option<f64>,
    /// The 95% interval of `absolute`, `[low, high]`.
    pub ci95: Option<[f64; 2]>,
    /// How `ci95` is computed ([`CI_METHOD`]).
    pub method: &'static str,
    /// Why something is undefined, when it is.
    pub note: Option<String>,
}

/// Compares the conversion of `delivered` with that of `held_out` (see the module docs).
pub fn lift(delivered: Group, held_out: Group) -> Lift {
    let mut lift = Lift {
        absolute: None,
        relative: None,
        ci95: None,
        method: CI_METHOD,
        note: None,
    };
    let (p1, p2) = match (delivered.rate, held_out.rate) {
        (Some(p1), Some(p2)) => (p1, p2),
        (_, None) => {
            lift.note = Some(
                "no held-out users (the campaign has no holdout, or none is recorded): \
                 lift undefined"
                    .into(),
            );
            return lift;
        }
        (None, Some(_)) => {
            lift.note = Some("no delivered users: lift undefined".into());
            return lift;
        }
    };
    let d = p1 - p2;
    let (n1, n2) = (delivered.users as f64, held_out.users as f64);
    let se = (p1 * (1.0 - p1) / n1 + p2 * (1.0 - p2) / n2).sqrt();
    lift.absolute = Some(d);
    lift.ci95 = Some([d - Z_95 * se, d + Z_95 * se]);
    if p2 > 0.0 {
        lift.relative = Some(d / p2);
    } else {
        lift.note = Some("no held-out user converted: relative lift undefined".into());
    }
    lift
}

fn as_rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339_text(t))
}

/// Answers `q` from the store (every part of one a cluster split) and the conversions file.
///
/// Usage errors (exit 2): a malformed id or occurrence, a store directory that does not
/// exist, a campaign the store has neither a record nor a ledger of (an occurrence it has no
/// ledger of), a hot product without `--occurrence` or another kind with one, conversions
/// for a campaign without a record. A bad conversions line is bad input (exit 2) naming
/// file, line and field.
pub fn report(q: &Question<'_>) -> Result<Report> {
    let occurrence = check_question(q.store, q.campaign, q.occurrence)?;
    let key = ledger_key(q.campaign, occurrence.as_deref());
    let runtime = reading_runtime()?;
    let mut record: Option<CampaignRecord> = None;
    let mut outcomes = Outcomes::default();
    let mut has_ledger = false;
    for part in crate::run::cluster::store_parts(q.store)? {
        runtime.block_on(async {
            let store = Store::connect_read_only(&part).await?;
            if record.is_none() {
                record = store.campaign(q.campaign).await?;
            }
            if store.has_ledger(&key).await? {
                has_ledger = true;
                outcomes.join(store.outcomes(&key).await?);
            }
            Ok::<_, Error>(())
        })?;
    }
    check_known(q, record.as_ref(), occurrence.as_deref(), has_ledger)?;
    let conversions = match q.conversions {
        None => None,
        Some(path) => {
            let Some(record) = &record else {
                return Err(Error::Usage(format!(
                    "--conversions: store {} has no record of campaign {:?}'s window (it was \
                     admitted by a fanout that kept none); re-run its job to record it",
                    crate::store::redis::shown(q.store),
                    q.campaign
                )));
            };
            Some(compare(path, record, &outcomes)?)
        }
    };
    Ok(Report {
        campaign: q.campaign.to_owned(),
        occurrence,
        record,
        outcomes: OutcomeCounts::of(&outcomes),
        conversions,
    })
}

/// Refuses a question about a campaign (occurrence) the store does not know.
fn check_known(
    q: &Question<'_>,
    record: Option<&CampaignRecord>,
    occurrence: Option<&str>,
    has_ledger: bool,
) -> Result<()> {
    let shown = crate::store::redis::shown(q.store);
    let campaign = q.campaign;
    match (record.map(|r| r.kind), occurrence) {
        (Some(Kind::HotProduct), None) => {
            return Err(Error::Usage(format!(
                "campaign {campaign:?} is a hot product: its outcomes are per occurrence, \
                 pass --occurrence (the tick's start)"
            )))
        }
        (Some(kind), Some(_)) if kind != Kind::HotProduct => {
            return Err(Error::Usage(format!(
                "--occurrence: campaign {campaign:?} is not scheduled (only hot products \
                 have occurrences)"
            )))
        }
        _ => {}
    }
    match (record, occurrence, has_ledger) {
        (_, _, true) | (Some(_), None, false) => Ok(()),
        (_, Some(o), false) => Err(Error::Usage(format!(
            "store {shown} has no ledger for campaign {campaign:?} at occurrence {o}"
        ))),
        (None, None, false) => Err(Error::Usage(format!(
            "store {shown} knows no campaign {campaign:?}: no run or serve admitted it there"
        ))),
    }
}

/// Reads the conversions at `path` and compares the groups of `outcomes`.
fn compare(path: &str, record: &CampaignRecord, outcomes: &Outcomes) -> Result<Conversions> {
    let window_start = record.start;
    let window_end = record.end + ATTRIBUTION;
    let (from_ms, to_ms) = (
        window_start.timestamp_millis(),
        window_end.timestamp_millis(),
    );
    let mut converted = RoaringBitmap::new();
    let (mut events, mut events_in_window) = (0u64, 0u64);
    for_each_line(path, false, |no, line| {
        let event = parse_login(line)
            .map_err(|(field, msg)| InputError::new(path, Some(no), field, msg))?;
        events += 1;
        if (from_ms..to_ms).contains(&event.ts_ms) {
            events_in_window += 1;
            converted.insert(event.user);
        }
        Ok(())
    })?;
    let group = |users: &RoaringBitmap| Group::new(users.len(), users.intersection_len(&converted));
    let delivered = group(&outcomes.delivered);
    let held_out = group(&outcomes.held_out);
    Ok(Conversions {
        file: path.to_owned(),
        window_start,
        window_end,
        events,
        events_in_window,
        delivered,
        held_out,
        lift: lift(delivered, held_out),
    })
}

/// The report as text, for people.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = write!(out, "campaign {}", r.campaign);
    if let Some(o) = &r.occurrence {
        let _ = write!(out, " at occurrence {o}");
    }
    out.push('\n');
    match &r.record {
        Some(c) => {
            let _ = writeln!(
                out,
                "  {}, {} .. {}, priority {}, holdout {}, first admitted {}",
                c.kind.name(),
                rfc3339_text(&c.start),
                rfc3339_text(&c.end),
                c.priority.name(),
                c.holdout,
                rfc3339_text(&c.admitted_at)
            );
        }
        None => out.push_str("  (no campaign record in the store: admitted by an older fanout)\n"),
    }
    let o = &r.outcomes;
    out.push_str("outcomes:\n");
    for (name, n) in [
        ("delivered", o.delivered),
        ("dead_lettered", o.dead_lettered),
        ("unreachable", o.unreachable),
        ("held_out", o.held_out),
        ("in_flight", o.in_flight),
        ("quiet_held", o.quiet_held),
        ("capped", o.capped),
        ("cancelled", o.cancelled),
    ] {
        let _ = writeln!(out, "  {name:<14}{n:>12}");
    }
    if let Some(c) = &r.conversions {
        let _ = writeln!(
            out,
            "conversions in {} .. {} (start .. end + 7 days): {} of {} events in {}",
            rfc3339_text(&c.window_start),
            rfc3339_text(&c.window_end),
            c.events_in_window,
            c.events,
            c.file
        );
        for (name, g) in [("delivered", &c.delivered), ("held out", &c.held_out)] {
            let rate = match g.rate {
                Some(p) => format!("{:.2}%", p * 100.0),
                None => "undefined (no users)".into(),
            };
            let _ = writeln!(
                out,
                "  {name:<10}{:>12} converted of {:>12} users: {rate}",
                g.converted, g.users
            );
        }
        let l = &c.lift;
        if let (Some(d), Some([low, high])) = (l.absolute, l.ci95) {
            let relative = match l.relative {
                Some(r) => format!("{:+.1}%", r * 100.0),
                None => "undefined".into(),
            };
            let _ = writeln!(
                out,
                "  lift {:+.2} points (relative {relative}), 95% CI [{:+.2}, {:+.2}] points",
                d * 100.0,
                low * 100.0,
                high * 100.0
            );
            let _ = writeln!(out, "  CI method: {}", l.method);
        }
        if let Some(note) = &l.note {
            let _ = writeln!(out, "  {note}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn lift_and_interval_match_the_textbook_formula() {
        // 1000 of 10000 delivered users converted, 80 of 1000 held-out ones.
        let l = lift(Group::new(10_000, 1_000), Group::new(1_000, 80));
        // By hand: d = 0.10 − 0.08; SE² = 0.1·0.9/10000 + 0.08·0.92/1000 = 0.000009 + 0.0000736.
        let se = 0.000_082_6_f64.sqrt();
        assert!(close(se, 0.009_088_454_214_103_7), "{se}");
        let (low, high) = (0.02 - 1.96 * se, 0.02 + 1.96 * se);
        let d = l.absolute.unwrap();
        assert!(close(d, 0.02), "{d}");
        assert!(close(l.relative.unwrap(), 0.25));
        let [lo, hi] = l.ci95.unwrap();
        // z = 1.959964, not 1.96: within 4e-7 of the rounded-z interval.
        assert!(
            (lo - low).abs() < 4e-7 && (hi - high).abs() < 4e-7,
            "{lo} {hi}"
        );
        assert!((lo - 0.002_187).abs() < 1e-6 && (hi - 0.037_813).abs() < 1e-6);
        assert_eq!(l.note, None);
    }

    #[test]
    fn empty_groups_and_a_zero_baseline_leave_the_lift_undefined() {
        let none = lift(Group::new(500, 50), Group::new(0, 0));
        assert_eq!(
            (none.absolute, none.relative, none.ci95),
            (None, None, None)
        );
        assert!(none.note.unwrap().contains("no held-out users"));
        let nobody = lift(Group::new(0, 0), Group::new(10, 1));
        assert_eq!(nobody.absolute, None);
        assert!(nobody.note.unwrap().contains("no delivered"));
        assert_eq!(Group::new(0, 0).rate, None);
        // A held-out rate of 0: the difference and its interval stand, the ratio does not.
        let zero = lift(Group::new(100, 10), Group::new(50, 0));
        assert!(close(zero.absolute.unwrap(), 0.1));
        assert_eq!(zero.relative, None);
        let se = (0.1f64 * 0.9 / 100.0).sqrt();
        let [lo, hi] = zero.ci95.unwrap();
        assert!(close(lo, 0.1 - Z_95 * se) && close(hi, 0.1 + Z_95 * se));
        assert!(zero.note.unwrap().contains("relative lift undefined"));
    }

    #[test]
    fn conversions_count_once_per_user_inside_start_to_end_plus_seven_days() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conv.jsonl");
        std::fs::write(
            &path,
            concat!(
                "{\"user\": 1, \"ts\": \"2026-03-01T00:00:00Z\"}\n",
                "{\"user\": 1, \"ts\": \"2026-03-02T00:00:00Z\"}\n",
                "\n",
                "{\"user\": 2, \"ts\": \"2026-02-28T23:59:59Z\"}\n",
                "{\"user\": 3, \"ts\": \"2026-03-14T23:59:59+00:00\"}\n",
                "{\"user\": 4, \"ts\": \"2026-03-15T00:00:00Z\"}\n",
                "{\"user\": 5, \"ts\": \"2026-03-10T08:00:00+08:00\"}\n",
            ),
        )
        .unwrap();
        let record = CampaignRecord {
            id: "c".into(),
            kind: Kind::Promotion,
            start: "2026-03-01T00:00:00Z".parse().unwrap(),
            end: "2026-03-08T00:00:00Z".parse().unwrap(),
            priority: crate::model::Priority::Normal,
            holdout: 0.5,
            admitted_at: "2026-03-01T00:00:00Z".parse().unwrap(),
        };
        let outcomes = Outcomes {
            delivered: [1, 2, 3, 6].into_iter().collect(),
            held_out: [4, 5].into_iter().collect(),
            ..Default::default()
        };
        let path = path.to_str().unwrap();
        let c = compare(path, &record, &outcomes).unwrap();
        assert_eq!((c.events, c.events_in_window), (6, 4));
        assert_eq!(c.delivered, Group::new(4, 2));
        assert_eq!(c.held_out, Group::new(2, 1));
        assert_eq!(rfc3339_text(&c.window_end), "2026-03-15T00:00:00Z");

        std::fs::write(path, "{\"user\": 1, \"ts\": \"2026-03-01T00:00:00Z\"}\n{\"user\": 0, \"ts\": \"2026-03-01T00:00:00Z\"}\n").unwrap();
        match compare(path, &record, &outcomes) {
            Err(Error::BadInput(e)) => assert_eq!((e.line, e.field.as_str()), (Some(2), "user")),
            other => panic!("expected bad input, got {other:?}"),
        }
    }
}
