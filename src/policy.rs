//! Policy across campaigns (SPEC "Policy"): holdouts and the control group, frequency caps,
//! quiet hours. Plain data and pure decisions; the engine applies them where a user meets
//! its campaigns, on the worker that owns the user.

use std::time::Duration;

use chrono_tz::Tz;

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

/// FNV-1a, 64 bits, over `bytes` (SPEC "Holdouts": anyone can recompute a holdout with it).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
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
/// global control group. Precomputes what does not depend on the user.
#[derive(Debug, Clone)]
pub struct Holdout {
    /// `fnv1a64` state after `"{campaign}:"`, or `None` without a holdout.
    own: Option<(u64, u64)>,
    /// The control group's share in ppm, `0` where it does not apply.
    control: u64,
}

impl Holdout {
    /// The holdout rule of `campaign` under `policy`.
    pub fn new(campaign: &Campaign, policy: &Policy) -> Self {
        let own = (ppm(campaign.holdout) > 0).then(|| {
            let prefix = format!("{}:", campaign.id);
            (fnv1a64(prefix.as_bytes()), ppm(campaign.holdout))
        });
        let control = match campaign.priority {
            Priority::Transactional => 0,
            _ => ppm(policy.control_group),
        };
        Holdout { own, control }
    }

    /// Whether no user can be held out.
    pub fn is_none(&self) -> bool {
        self.own.is_none() && self.control == 0
    }

    /// Whether `user` is held out of the campaign (its holdout or the control group).
    pub fn holds(&self, user: UserId) -> bool {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(user).as_bytes();
        if let Some((state, share)) = self.own {
            if continue_fnv(state, digits) % 1_000_000 < share {
                return true;
            }
        }
        self.control > 0 && in_control_group(digits, self.control)
    }
}

/// FNV-1a continued from `state` over `bytes`.
fn continue_fnv(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn in_control_group(digits: &[u8], share_ppm: u64) -> bool {
    let state = continue_fnv(0xcbf2_9ce4_8422_2325, b"control:");
    continue_fnv(state, digits) % 1_000_000 < share_ppm
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
}
