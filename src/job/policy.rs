//! The `[policy]` table (SPEC "Policy"): frequency caps, quiet hours, the default time zone
//! and the control group, checked into a [`Policy`].
//!
//! ```toml
//! [policy]
//! frequency_caps = [{ max = 2, per = "24h" }, { max = 5, per = "7d" }]
//! quiet_hours = { start = "21:00", end = "08:00" }
//! default_tz = "UTC"
//! control_group = 0.0
//! ```

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::campaign::period;
use super::locate::Doc;
use crate::error::Result;
use crate::history::KEEP;
use crate::policy::{parse_zone, Cap, Policy, QuietHours};

/// Most frequency caps a job may set: each is checked for every capped send.
pub(super) const MAX_CAPS: usize = 10;
/// The longest cap window: send history older than the longest window is of no use, and the
/// store keeps no more than this (a year, leap day included).
pub(super) const MAX_CAP_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);

/// `[policy]` as written, each value with its span.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    frequency_caps: Option<Spanned<Vec<Spanned<RawCap>>>>,
    quiet_hours: Option<Spanned<RawQuietHours>>,
    default_tz: Option<Spanned<String>>,
    control_group: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCap {
    max: Spanned<i64>,
    per: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuietHours {
    start: Spanned<String>,
    end: Spanned<String>,
}

impl RawPolicy {
    /// Checks every value; an error names `policy.<field>` and its line in `doc`.
    pub(super) fn validate(self, doc: &Doc) -> Result<Policy> {
        let mut policy = Policy::default();
        if let Some(caps) = self.frequency_caps {
            let caps_at = caps.span().start;
            let caps = caps.into_inner();
            if caps.len() > MAX_CAPS {
                let msg = format!("at most {MAX_CAPS} caps, got {}", caps.len());
                let at = caps.get(MAX_CAPS).map_or(caps_at, |c| c.span().start);
                return Err(doc.error(at, "policy.frequency_caps", msg));
            }
            for (i, cap) in caps.into_iter().enumerate() {
                let cap = cap.into_inner();
                let field = |name: &str| format!("policy.frequency_caps[{i}].{name}");
                let max = u32::try_from(*cap.max.get_ref())
                    .ok()
                    .filter(|&m| m >= 1 && m as usize <= KEEP)
                    .ok_or_else(|| {
                        let msg = format!(
                            "expected a count of sends 1..={KEEP} (the store keeps each user's \
                             last {KEEP} sends), got {}",
                            cap.max.get_ref()
                        );
                        doc.error(cap.max.span().start, field("max"), msg)
                    })?;
                let per = cap_window(cap.per.get_ref())
                    .map_err(|msg| doc.error(cap.per.span().start, field("per"), msg))?;
                policy.frequency_caps.push(Cap { max, per });
            }
        }
        if let Some(q) = self.quiet_hours {
            let q = q.into_inner();
            let time = |v: &Spanned<String>, name: &str| {
                clock_minute(v.get_ref()).map_err(|msg| {
                    doc.error(v.span().start, format!("policy.quiet_hours.{name}"), msg)
                })
            };
            let (start, end) = (time(&q.start, "start")?, time(&q.end, "end")?);
            if start == end {
                let msg = format!(
                    "must differ from start ({:?}): quiet hours [start, end) would be empty",
                    q.start.get_ref()
                );
                return Err(doc.error(q.end.span().start, "policy.quiet_hours.end", msg));
            }
            policy.quiet_hours = Some(QuietHours { start, end });
        }
        if let Some(tz) = self.default_tz {
            policy.default_tz = parse_zone(tz.get_ref())
                .map_err(|msg| doc.error(tz.span().start, "policy.default_tz", msg))?;
        }
        if let Some(share) = self.control_group {
            let v = *share.get_ref();
            if !(0.0..=1.0).contains(&v) {
                let msg = format!("must be a share in 0..=1, got {v}");
                return Err(doc.error(share.span().start, "policy.control_group", msg));
            }
            policy.control_group = v;
        }
        Ok(policy)
    }
}

/// A cap's window: a duration like the schedule's `every` (`24h`, `7d`), at most a year.
fn cap_window(text: &str) -> std::result::Result<Duration, String> {
    let d = period(text)?;
    if d > MAX_CAP_WINDOW {
        return Err(format!("must be at most 366d, got {text:?}"));
    }
    Ok(d)
}

/// `HH:MM`, 00:00–23:59, as minutes after midnight.
pub(super) fn clock_minute(text: &str) -> std::result::Result<u16, String> {
    let expected = || format!("expected a local time HH:MM from 00:00 to 23:59, got {text:?}");
    let b = text.as_bytes();
    let two = |hi: u8, lo: u8| {
        (hi.is_ascii_digit() && lo.is_ascii_digit())
            .then(|| u16::from(hi - b'0') * 10 + u16::from(lo - b'0'))
    };
    match b {
        [h1, h0, b':', m1, m0] => match (two(*h1, *h0), two(*m1, *m0)) {
            (Some(h), Some(m)) if h < 24 && m < 60 => Ok(h * 60 + m),
            _ => Err(expected()),
        },
        _ => Err(expected()),
    }
}
