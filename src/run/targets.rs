//! Which campaign occurrences a run admits at `now`, and why the others are left out.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use roaring::RoaringBitmap;

use crate::model::{Campaign, Kind, Target};

/// A campaign's fate in this run.
#[derive(Debug)]
pub enum Admission {
    /// Fan it out as this target.
    Run(Target),
    /// A lazy coupon: grant it at each matching login inside its window.
    AtLogin(Target),
    /// Nothing to send now, for this reason.
    Skip(String),
    /// Users held for their quiet hours in an earlier occurrence of a scheduled campaign
    /// still inside its window: send to them alone (those still in quiet hours stay held).
    Release(Target, RoaringBitmap),
    /// Users still held for their quiet hours when the campaign's window ended:
    /// dead-lettered with [`WINDOW_ENDED`].
    Expire(Target, RoaringBitmap),
}

/// The dead-letter error of a user whose campaign window ended during their quiet hours.
pub const WINDOW_ENDED: &str = "window ended during quiet hours";

/// The ledgers of `campaign` that may hold users for their quiet hours and that the
/// admission at `now` does not run: each as (occurrence, whether the window is still open).
/// A campaign whose window ended: its one ledger, or every tick's. A scheduled campaign in
/// its window: every tick before the current one. Lazy coupons are never held.
pub fn held_ledgers(campaign: &Campaign, now: DateTime<Utc>) -> Vec<(Option<String>, bool)> {
    if campaign.is_lazy() || now < campaign.start {
        return Vec::new();
    }
    let open = campaign.is_live_at(now);
    let Some(every) = campaign
        .every
        .and_then(|e| chrono::Duration::from_std(e).ok())
        .filter(|e| *e > chrono::Duration::zero())
    else {
        return match open {
            true => Vec::new(),
            false => vec![(None, false)],
        };
    };
    let current = occurrence(campaign, now);
    let mut out = Vec::new();
    let mut tick = campaign.start;
    while tick < campaign.end && tick <= now {
        let o = crate::model::occurrence_id(tick);
        if !open || Some(&o) != current.as_ref() {
            out.push((Some(o), open));
        }
        tick += every;
    }
    out
}

/// Decides what `campaign` sends at `now`.
pub fn admit(campaign: &Arc<Campaign>, now: DateTime<Utc>) -> Admission {
    if campaign.is_lazy() {
        // Logins count by their own time, so a lazy coupon is active whatever `now` is.
        return Admission::AtLogin(Target::new(campaign.clone(), None));
    }
    if !campaign.is_live_at(now) {
        return Admission::Skip(format!(
            "outside its window {} .. {} at {}",
            campaign.start.to_rfc3339_opts(SecondsFormat::Secs, true),
            campaign.end.to_rfc3339_opts(SecondsFormat::Secs, true),
            now.to_rfc3339_opts(SecondsFormat::Secs, true)
        ));
    }
    match campaign.kind {
        Kind::Promotion | Kind::Coupon => Admission::Run(Target::new(campaign.clone(), None)),
        Kind::HotProduct => match occurrence(campaign, now) {
            Some(o) => Admission::Run(Target::new(campaign.clone(), Some(o))),
            None => Admission::Skip("no schedule".into()),
        },
    }
}

/// The id of the schedule tick containing `now`: the tick's start, RFC 3339.
pub fn occurrence(campaign: &Campaign, now: DateTime<Utc>) -> Option<String> {
    let (tick, _) = ticks_around(campaign, now)?;
    Some(crate::model::occurrence_id(tick))
}

/// When the schedule ticks next after `now` (`None` without a schedule).
pub fn next_tick(campaign: &Campaign, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    ticks_around(campaign, now).map(|(_, next)| next)
}

/// The start of the tick containing `now` (the first tick before the campaign starts), and
/// the start of the one after it.
fn ticks_around(campaign: &Campaign, now: DateTime<Utc>) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let every = chrono::Duration::from_std(campaign.every?).ok()?;
    let every_ms = every.num_milliseconds().max(1);
    let since = (now - campaign.start).num_milliseconds().max(0);
    let tick = campaign.start + chrono::Duration::milliseconds(since / every_ms * every_ms);
    Some((tick, tick + chrono::Duration::milliseconds(every_ms)))
}
