//! Policy across campaigns (SPEC "Policy"): holdouts and the control group, frequency caps,
//! quiet hours. Plain data and pure decisions; the engine applies them where a user meets
//! its campaigns, on the worker that owns the user.

use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::model::{Campaign, Priority, UserId};

/// The `[policy]` table of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Each `{max, per}`: at most `max` capped sends within any window `(t − per, t]`.
    pub frequency_caps: Vec<Cap>,
    /// Local hours in which fan-out sends are held.
    pub quiet_hours: Option<QuietHours>,
    /// The zone of users without a `tz`.
    pub default_tz: Tz,
    /// Share of all users held out of every non-transactional campaign, `0.0 ..= 1.0`.
    pub control_group: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            frequency_caps: Vec::new(),
            quiet_hours: None,
            default_tz: Tz::UTC,
            control_group: 0.0,
        }
    }
}

impl Policy {
    /// The zone quiet hours are read in for a user whose own zone is `user_tz`: that zone,
    /// else `default_tz` (SPEC: "in the user's time zone (`tz`, else `default_tz`)").
    pub fn zone(&self, user_tz: Option<Tz>) -> Tz {
        user_tz.unwrap_or(self.default_tz)
    }

    /// When a send at `t` to a user in zone `tz` may go out: `None` if `t` is outside the
    /// user's quiet hours (or there are none), else the first instant after `t` at which the
    /// user's local clock reads a time outside them.
    ///
    /// Clock changes are read as the user's wall clock lives them:
    /// - **gap** (spring forward): if the local end of the quiet hours does not exist that day
    ///   (quiet until 02:30, clocks jump from 02:00 to 03:00), the quiet hours end at the jump,
    ///   the first instant whose local time is past the end;
    /// - **overlap** (fall back): if the local end occurs twice (quiet until 01:30, clocks go
    ///   back from 02:00 to 01:00), the quiet hours end at its first occurrence after `t`; a
    ///   user whose clock is turned back into the quiet hours is quiet again until the second
    ///   occurrence, so a send at that time is held until then;
    /// - a day a zone skips whole (Pacific/Apia, 2011-12-30) is skipped: the answer is never an
    ///   instant whose local time is inside the quiet hours.
    ///
    /// Quiet hours are `[start, end)` to the minute: 07:59:59 is quiet under `end = "08:00"`.
    pub fn quiet_until(&self, t: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let quiet = self.quiet_hours?;
        if !quiet.contains(t.with_timezone(&tz).time()) {
            return None;
        }
        // A clock change can land the first end inside the next quiet hours (a skipped day);
        // a few rounds are more than any zone has ever needed.
        let mut at = t;
        for _ in 0..8 {
            match quiet.next_end(at, tz) {
                Some(end) if !quiet.contains(end.with_timezone(&tz).time()) => return Some(end),
                Some(end) => at = end,
                // No end found: only past chrono's last date (year 262143), which no real
                // clock reaches. Still held; a later check asks again.
                None => return Some(at),
            }
        }
        Some(at)
    }
}

/// An IANA time zone name (`Asia/Shanghai`, `UTC`), as job files and user records give it;
/// the error says what was expected. Names are matched exactly, case included, as the IANA
/// database spells them.
pub fn parse_zone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>().map_err(|_| {
        format!(
            "unknown time zone {:?}: expected an IANA zone name like \"Asia/Shanghai\" or \"UTC\"",
            short(name)
        )
    })
}

/// `text` cut short enough for an error message.
fn short(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// One frequency cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Sends allowed in the window (≥ 1).
    pub max: u32,
    /// The window's length.
    pub per: Duration,
}

/// Quiet hours `[start, end)` in local time, as minutes after midnight; `start > end` wraps
/// past midnight (`21:00`–`08:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    /// First quiet minute of the day.
    pub start: u16,
    /// First minute after the quiet hours.
    pub end: u16,
}

impl QuietHours {
    /// Whether the local time `local` falls in `[start, end)`, wrapping past midnight when
    /// `start > end`. Empty quiet hours (`start == end`, which a job file cannot set) hold
    /// nothing.
    pub fn contains(&self, local: NaiveTime) -> bool {
        let minute = (local.hour() * 60 + local.minute()) as u16;
        match self.start <= self.end {
            true => self.start <= minute && minute < self.end,
            false => minute >= self.start || minute < self.end,
        }
    }

    /// The first instant after `at` (which is inside the quiet hours in `tz`) at which the
    /// local clock reads `end` or, where a gap skips that reading, first passes it. The
    /// instant may be inside the next quiet hours when a clock change skipped whole days.
    /// `None` when none is found, which happens only past chrono's last date.
    fn next_end(&self, at: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let local = at.with_timezone(&tz).naive_local();
        let minute = (local.hour() * 60 + local.minute()) as u16;
        // Inside wrapped quiet hours before midnight, they end tomorrow; otherwise today.
        let wraps_to_tomorrow = self.start > self.end && minute >= self.start;
        let day: NaiveDate = match wraps_to_tomorrow {
            true => local.date().succ_opt()?,
            false => local.date(),
        };
        let end_time =
            NaiveTime::from_hms_opt(u32::from(self.end / 60), u32::from(self.end % 60), 0)?;
        let mut wall = NaiveDateTime::new(day, end_time);
        // A gap is at most a day (Apia skipped one); step to the first wall time that exists.
        for _ in 0..=2 * 24 * 60 {
            match tz.from_local_datetime(&wall) {
                LocalResult::Single(end) => {
                    return Some(end.with_timezone(&Utc)).filter(|e| *e > at)
                }
                LocalResult::Ambiguous(first, second) => {
                    let (first, second) = (first.with_timezone(&Utc), second.with_timezone(&Utc));
                    return Some(if first > at { first } else { second }).filter(|e| *e > at);
                }
                LocalResult::None => {
                    wall = wall.checked_add_signed(chrono::TimeDelta::minutes(1))?
                }
            }
        }
        None
    }
}

/// FNV-1a, 64 bits, over `bytes` (SPEC "Holdouts": anyone can recompute a holdout with it).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    continue_fnv(0xcbf2_9ce4_8422_2325, bytes)
}

/// A share in parts per million, as SPEC rounds it: `round(share × 1000000)`.
fn ppm(share: f64) -> u64 {
    (share * 1_000_000.0).round().clamp(0.0, 1_000_000.0) as u64
}

/// Whether `hash` falls in a share of users.
fn in_share(hash: u64, share: f64) -> bool {
    hash % 1_000_000 < ppm(share)
}

/// Decides holdouts for one campaign: its own holdout and, unless it is transactional, the
/// global control group. Each is the `fnv1a64` state after its prefix (`"{campaign}:"`,
/// `"control:"`) and its share in ppm, computed once: a user costs the hash of its digits.
#[derive(Debug, Clone)]
pub struct Holdout {
    /// At most two: the campaign's own and the control group's.
    rules: Vec<(u64, u64)>,
}

impl Holdout {
    /// The holdout rule of `campaign` under `policy`.
    pub fn new(campaign: &Campaign, policy: &Policy) -> Self {
        let control = match campaign.priority {
            Priority::Transactional => 0.0,
            _ => policy.control_group,
        };
        let rules = [
            (format!("{}:", campaign.id), campaign.holdout),
            ("control:".to_owned(), control),
        ]
        .into_iter()
        .filter(|(_, share)| ppm(*share) > 0)
        .map(|(prefix, share)| (fnv1a64(prefix.as_bytes()), ppm(share)))
        .collect();
        Holdout { rules }
    }

    /// Whether no user can be held out.
    pub fn is_none(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `user` is held out of the campaign (its holdout or the control group).
    pub fn holds(&self, user: UserId) -> bool {
        self.scan().holds(user)
    }

    /// Decides the holdouts of many users, one after another ([`HoldoutScan::holds`]).
    pub fn scan(&self) -> HoldoutScan<'_> {
        HoldoutScan {
            holdout: self,
            tens: None,
            states: [0; 2],
        }
    }
}

/// Holdouts decided user after user, each hash continued from the hash of the user's digits
/// but the last, which the user before most often shares (ids of a push task are mostly
/// consecutive: ten users a prefix). The same hash as over all the digits, at the cost of
/// one step per user instead of the formatting and a step per digit.
pub struct HoldoutScan<'a> {
    holdout: &'a Holdout,
    /// `user / 10` of the last user, whose digits `states` hash.
    tens: Option<u32>,
    /// Each rule's hash after its prefix and the digits of `tens` (none where it is 0).
    states: [u64; 2],
}

impl HoldoutScan<'_> {
    /// Whether `user` is held out of the campaign (its holdout or the control group).
    #[inline]
    pub fn holds(&mut self, user: UserId) -> bool {
        let (tens, last) = (user / 10, b'0' + (user % 10) as u8);
        if self.tens != Some(tens) {
            self.start_tens(tens);
        }
        // Both rules tested, not the second only when the first fails: their chains of
        // multiplies then run side by side.
        (self.states.iter().zip(&self.holdout.rules)).fold(false, |held, (&state, &(_, share))| {
            held | (fnv_step(state, last) % 1_000_000 < share)
        })
    }

    /// Hashes the digits of `tens` (none where it is 0) after each rule's prefix.
    #[cold]
    fn start_tens(&mut self, tens: u32) {
        let mut digits = itoa::Buffer::new();
        let digits: &[u8] = match tens {
            0 => b"",
            _ => digits.format(tens).as_bytes(),
        };
        for (state, &(prefix, _)) in self.states.iter_mut().zip(&self.holdout.rules) {
            *state = continue_fnv(prefix, digits);
        }
        self.tens = Some(tens);
    }
}

/// Quiet hours as one campaign applies them to its sends at one time `at` (SPEC "Quiet
/// hours"): fan-outs of non-transactional campaigns only; lazy coupons are exempt (the user
/// is present). Each decision also lowers `release`, the earliest instant a held user of
/// this target becomes sendable (unix seconds; `i64::MAX`: none held).
#[derive(Debug)]
pub struct QuietAt {
    policy: Policy,
    at: DateTime<Utc>,
    release: AtomicI64,
}

impl QuietAt {
    /// The rule of `campaign` sending at `at` under `policy`; `None` where no user can be held.
    pub fn new(campaign: &Campaign, policy: &Policy, at: DateTime<Utc>) -> Option<QuietAt> {
        let exempt = campaign.is_lazy() || campaign.priority == Priority::Transactional;
        (policy.quiet_hours.is_some() && !exempt).then(|| QuietAt {
            policy: policy.clone(),
            at,
            release: AtomicI64::new(i64::MAX),
        })
    }

    /// Takes the users inside their quiet hours now out of `users` (with each one's zone
    /// from `tz`, or every one in the default zone where `tz` is `None`: one decision for
    /// all), in place, and returns their ids. Zones are looked up once per call.
    pub fn split<T>(
        &self,
        users: &mut Vec<T>,
        id: impl Fn(&T) -> UserId,
        tz: Option<impl Fn(UserId) -> Option<Tz>>,
    ) -> Vec<UserId> {
        let Some(tz) = tz else {
            let Some(until) = self.policy.quiet_until(self.at, self.policy.zone(None)) else {
                return Vec::new();
            };
            if !users.is_empty() {
                self.release.fetch_min(until.timestamp(), Ordering::Relaxed);
            }
            return users.drain(..).map(|u| id(&u)).collect();
        };
        let mut by_zone: HashMap<Tz, Option<DateTime<Utc>>> = HashMap::new();
        // The last user's zone and answer, checked before the map: neighbours often share
        // one.
        let mut last: Option<(Tz, Option<DateTime<Utc>>)> = None;
        let mut held = Vec::new();
        users.retain(|u| {
            let zone = self.policy.zone(tz(id(u)));
            let until = match last {
                Some((z, until)) if z == zone => until,
                _ => {
                    let until = *by_zone
                        .entry(zone)
                        .or_insert_with(|| self.policy.quiet_until(self.at, zone));
                    last = Some((zone, until));
                    until
                }
            };
            if until.is_some() {
                held.push(id(u));
            }
            until.is_none()
        });
        if let Some(first) = by_zone.values().flatten().min() {
            self.release.fetch_min(first.timestamp(), Ordering::Relaxed);
        }
        held
    }

    /// The earliest instant a user held so far becomes sendable, if any was held.
    pub fn release(&self) -> Option<DateTime<Utc>> {
        match self.release.load(Ordering::Relaxed) {
            i64::MAX => None,
            s => DateTime::from_timestamp(s, 0),
        }
    }
}

/// FNV-1a continued from `state` over `bytes`.
fn continue_fnv(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |h, &b| fnv_step(h, b))
}

/// One byte of FNV-1a.
fn fnv_step(h: u64, b: u8) -> u64 {
    (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
}

/// Whether `user` is in the control group of share `control_group` (for reports).
pub fn in_control(user: UserId, control_group: f64) -> bool {
    in_share(fnv1a64(format!("control:{user}").as_bytes()), control_group)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::parse_campaign;

    fn campaign(extra: &str) -> Campaign {
        let toml = format!(
            "[[campaign]]\nid = \"spring\"\nkind = \"promotion\"\nstart = \"2026-01-01T00:00:00Z\"\n\
             end = \"2026-12-01T00:00:00Z\"\nbody = \"hi\"\n{extra}"
        );
        parse_campaign("test", &toml).unwrap()
    }

    #[test]
    fn fnv1a64_matches_the_published_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn holdouts_follow_the_spec_formula_and_skip_transactional_for_the_control_group() {
        let policy = Policy {
            control_group: 0.1,
            ..Policy::default()
        };
        let normal = Holdout::new(&campaign("holdout = 0.05\n"), &policy);
        let trans = Holdout::new(
            &campaign("holdout = 0.05\npriority = \"transactional\"\n"),
            &policy,
        );
        let (mut own, mut control) = (0, 0);
        for user in 1..=200_000u32 {
            let mine = fnv1a64(format!("spring:{user}").as_bytes()) % 1_000_000 < 50_000;
            let ctl = fnv1a64(format!("control:{user}").as_bytes()) % 1_000_000 < 100_000;
            assert_eq!(normal.holds(user), mine || ctl, "user {user}");
            assert_eq!(trans.holds(user), mine, "user {user}");
            assert_eq!(in_control(user, 0.1), ctl);
            own += u32::from(mine);
            control += u32::from(ctl);
        }
        // The hash spreads: about 5% and 10%.
        assert!((9_000..11_000).contains(&own), "{own}");
        assert!((18_000..22_000).contains(&control), "{control}");
        assert!(Holdout::new(&campaign(""), &Policy::default()).is_none());
    }

    /// A scan continues each hash from the user before's digits where they share all but the
    /// last: whatever the order and the gaps, it decides as the formula does.
    #[test]
    fn a_holdout_scan_decides_as_the_formula_whatever_the_order() {
        let policy = Policy {
            control_group: 0.3,
            ..Policy::default()
        };
        let holdout = Holdout::new(&campaign("holdout = 0.4\n"), &policy);
        let formula = |user: u32| {
            fnv1a64(format!("spring:{user}").as_bytes()) % 1_000_000 < 400_000
                || fnv1a64(format!("control:{user}").as_bytes()) % 1_000_000 < 300_000
        };
        let mut next = crate::xorshift(0x005e_ed0f_401d);
        let mut users: Vec<u32> = (0..=25)
            .chain(95..=105)
            .chain(u32::MAX - 12..=u32::MAX)
            .collect();
        let mut user = 0u32;
        for _ in 0..20_000 {
            user = match next(4) {
                0 => next(1 << 32) as u32,
                1 => user.wrapping_sub(next(15) as u32),
                _ => user.wrapping_add(1 + next(3) as u32),
            };
            users.push(user);
        }
        let mut scan = holdout.scan();
        let held = users.iter().filter(|&&u| formula(u)).count();
        for &u in &users {
            assert_eq!(scan.holds(u), formula(u), "user {u}");
        }
        assert!(
            held > users.len() / 4 && held < users.len() * 3 / 4,
            "{held}"
        );
    }

    fn hm(h: u16, m: u16) -> u16 {
        h * 60 + m
    }

    fn local(text: &str) -> NaiveTime {
        NaiveTime::parse_from_str(text, "%H:%M:%S").unwrap()
    }

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn quiet(start: u16, end: u16) -> Policy {
        Policy {
            quiet_hours: Some(QuietHours { start, end }),
            ..Policy::default()
        }
    }

    /// Users with no zone of their own are decided once, in the default zone: as the
    /// user-by-user reading decides each of them, inside the quiet hours and outside.
    #[test]
    fn quiet_split_without_zones_decides_as_user_by_user() {
        let campaign = campaign("");
        let policy = Policy {
            default_tz: chrono_tz::Europe::Berlin,
            ..quiet(hm(21, 0), hm(8, 0))
        };
        let none: Option<fn(UserId) -> Option<Tz>> = None;
        for (at, held) in [
            ("2026-03-02T22:30:00Z", true),
            ("2026-03-02T12:00:00Z", false),
        ] {
            let at = utc(at);
            let ids: Vec<UserId> = (1..=40).collect();
            let (once, each) = (
                QuietAt::new(&campaign, &policy, at).expect("quiet hours apply"),
                QuietAt::new(&campaign, &policy, at).expect("quiet hours apply"),
            );
            let (mut a, mut b) = (ids.clone(), ids.clone());
            let held_once = once.split(&mut a, |&id| id, none);
            let held_each = each.split(&mut b, |&id| id, Some(|_| None));
            assert_eq!((&held_once, &a), (&held_each, &b), "{at}");
            assert_eq!(once.release(), each.release(), "{at}");
            match held {
                true => {
                    assert_eq!((held_once, a), (ids, Vec::new()));
                    assert_eq!(once.release(), Some(utc("2026-03-03T07:00:00Z")));
                }
                false => {
                    assert_eq!((held_once, a), (Vec::new(), ids));
                    assert_eq!(once.release(), None);
                }
            }
        }
    }

    #[test]
    fn quiet_hours_contain_start_but_not_end() {
        let day = QuietHours {
            start: hm(9, 0),
            end: hm(17, 30),
        };
        for (t, inside) in [
            ("08:59:59", false),
            ("09:00:00", true),
            ("12:00:00", true),
            ("17:29:59", true),
            ("17:30:00", false),
            ("00:00:00", false),
        ] {
            assert_eq!(day.contains(local(t)), inside, "{t}");
        }
        let night = QuietHours {
            start: hm(21, 0),
            end: hm(8, 0),
        };
        for (t, inside) in [
            ("20:59:59", false),
            ("21:00:00", true),
            ("23:59:59", true),
            ("00:00:00", true),
            ("07:59:59", true),
            ("08:00:00", false),
            ("12:00:00", false),
        ] {
            assert_eq!(night.contains(local(t)), inside, "{t}");
        }
        let empty = QuietHours {
            start: hm(8, 0),
            end: hm(8, 0),
        };
        assert!(!empty.contains(local("08:00:00")));
    }

    #[test]
    fn no_quiet_hours_hold_nothing_and_users_without_a_zone_use_the_default() {
        let t = utc("2026-03-02T23:00:00Z");
        assert_eq!(Policy::default().quiet_until(t, Tz::UTC), None);
        let p = Policy {
            default_tz: Tz::Asia__Tokyo,
            ..Policy::default()
        };
        assert_eq!(p.zone(None), Tz::Asia__Tokyo);
        assert_eq!(p.zone(Some(Tz::Europe__Berlin)), Tz::Europe__Berlin);
    }

    #[test]
    fn quiet_hours_in_a_zone_without_dst() {
        // Asia/Shanghai is UTC+8 all year: 21:00–08:00 local is 13:00–00:00 UTC.
        let p = quiet(hm(21, 0), hm(8, 0));
        let sh = Tz::Asia__Shanghai;
        for (t, until) in [
            ("2026-03-02T12:59:59Z", None),
            ("2026-03-02T13:00:00Z", Some("2026-03-03T00:00:00Z")),
            ("2026-03-02T15:59:00Z", Some("2026-03-03T00:00:00Z")),
            // After local midnight: the same morning.
            ("2026-03-02T16:00:00Z", Some("2026-03-03T00:00:00Z")),
            ("2026-03-02T23:59:59Z", Some("2026-03-03T00:00:00Z")),
            ("2026-03-03T00:00:00Z", None),
        ] {
            assert_eq!(p.quiet_until(utc(t), sh), until.map(utc), "{t}");
        }
        // The same instants in UTC: quiet from 21:00 UTC instead.
        assert_eq!(p.quiet_until(utc("2026-03-02T13:00:00Z"), Tz::UTC), None);
        assert_eq!(
            p.quiet_until(utc("2026-03-02T21:00:00Z"), Tz::UTC),
            Some(utc("2026-03-03T08:00:00Z"))
        );
        // Quiet hours within one day.
        let lunch = quiet(hm(12, 0), hm(13, 15));
        assert_eq!(
            lunch.quiet_until(utc("2026-03-02T04:30:00Z"), sh),
            Some(utc("2026-03-02T05:15:00Z"))
        );
        assert_eq!(lunch.quiet_until(utc("2026-03-02T05:15:00Z"), sh), None);
    }

    #[test]
    fn quiet_hours_across_new_york_dst_changes() {
        let ny = Tz::America__New_York;
        // 2026-03-08 02:00 EST (07:00 UTC) the clocks jump to 03:00 EDT. A night that starts
        // in EST (UTC-5) ends at 08:00 EDT (UTC-4): 12:00 UTC, not 13:00.
        let night = quiet(hm(21, 0), hm(8, 0));
        assert_eq!(
            night.quiet_until(utc("2026-03-08T04:00:00Z"), ny),
            Some(utc("2026-03-08T12:00:00Z"))
        );
        assert_eq!(night.quiet_until(utc("2026-03-08T12:00:00Z"), ny), None);
        // The night before, all EST: 08:00 EST is 13:00 UTC.
        assert_eq!(
            night.quiet_until(utc("2026-03-07T04:00:00Z"), ny),
            Some(utc("2026-03-07T13:00:00Z"))
        );

        // Gap: quiet until 02:30, which 2026-03-08 never reads: it ends at the jump, when
        // the clock reads 03:00 EDT (07:00 UTC).
        let gap = quiet(hm(22, 0), hm(2, 30));
        assert_eq!(
            gap.quiet_until(utc("2026-03-08T06:00:00Z"), ny),
            Some(utc("2026-03-08T07:00:00Z"))
        );
        assert_eq!(gap.quiet_until(utc("2026-03-08T07:00:00Z"), ny), None);

        // Overlap: 2026-11-01 02:00 EDT (06:00 UTC) the clocks go back to 01:00 EST, so
        // 01:30 happens twice. Quiet until 01:30: first at 01:30 EDT (05:30 UTC); turned back
        // into the quiet hours at 06:00 UTC, quiet again until 01:30 EST (06:30 UTC).
        let overlap = quiet(hm(21, 0), hm(1, 30));
        assert_eq!(
            overlap.quiet_until(utc("2026-11-01T04:00:00Z"), ny),
            Some(utc("2026-11-01T05:30:00Z"))
        );
        assert_eq!(overlap.quiet_until(utc("2026-11-01T05:45:00Z"), ny), None);
        assert_eq!(
            overlap.quiet_until(utc("2026-11-01T06:10:00Z"), ny),
            Some(utc("2026-11-01T06:30:00Z"))
        );
        assert_eq!(overlap.quiet_until(utc("2026-11-01T06:30:00Z"), ny), None);
    }

    #[test]
    fn a_skipped_day_never_ends_quiet_hours_inside_the_next_ones() {
        // Pacific/Apia skipped 2011-12-30: 2011-12-29 23:59:59 (UTC-10) was followed by
        // 2011-12-31 00:00:00 (UTC+14). A night from 22:00 on the 29th ends 08:00 on the 31st.
        let night = quiet(hm(22, 0), hm(8, 0));
        assert_eq!(
            night.quiet_until(utc("2011-12-30T09:00:00Z"), Tz::Pacific__Apia),
            Some(utc("2011-12-30T18:00:00Z"))
        );
    }
}
