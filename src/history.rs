//! Send history for frequency caps (SPEC "Policy → Frequency caps"): each user's last
//! [`KEEP`] capped sends in 8 bytes, checked and updated with the claim that makes the send.
//!
//! A send's time is its run's `now` (a `serve` generation's start), so a store sees few
//! distinct send times however many users it serves. The store keeps them once, in a table
//! of [`SLOTS`] slots ([`SendTimes`]), and a user's [`History`] holds slot numbers:
//!
//! ```text
//! bit  0..4   era tag: the table's era (mod 16) when the history was last written
//! bit  4..64  five 12-bit slots (0 = empty), in no particular order
//! ```
//! The table fills one half at a time (era `e` uses half `e % 2`). When the current half is
//! full, the other half is cleared and reused — allowed only once every time in it is older
//! than the longest cap window ever used with the store ([`SendTimes::alloc`]'s horizon), so
//! no check can need it again. A history's slots in a half reused after it was written are
//! then *stale*: its era tag says so (a slot in the current half counts only if the tag is
//! the current era; one in the previous half if the tag is the current or the previous era),
//! and a stale slot reads as no send.
//!
//! The same rules run in Lua inside the Redis store's claim (`store/redis/scripts.rs`,
//! `CLAIM_CAPPED`); the tests below pin the layout both read.
//!
//! Semantics ([`History::admits`]): a send at `t` is allowed iff for every cap, fewer than
//! `max` kept sends lie in `(t − per, t]`. With sends recorded in time order (runs move
//! forward) this is exact, since `max ≤ KEEP`. A send at a `t` earlier than some kept send
//! could also fall in a window whose sends were no longer kept: when all [`KEEP`] slots are
//! full and the oldest kept send is inside `(t − per, t]`, that cap is taken to bind.

use std::time::Duration;

use crate::policy::Cap;

/// Sends a history keeps; a cap's `max` is at most this.
pub const KEEP: usize = 5;
/// Slots of the send-time table, slot 0 (empty) included.
pub const SLOTS: usize = 4096;
/// Slots per half; half 0 is `1..HALF` (slot 0 is never used), half 1 `HALF..SLOTS`.
const HALF: u16 = 2048;
/// Bits of a slot number.
const SLOT_BITS: u32 = 12;
/// Bits of the era tag.
const TAG_BITS: u32 = 4;

/// A cap as the history checks it: `max` sends within `per_s` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Sends allowed in the window.
    pub max: u32,
    /// The window's length in seconds.
    pub per_s: i64,
}

impl Window {
    /// The windows of `caps`.
    pub fn of(caps: &[Cap]) -> Vec<Window> {
        caps.iter()
            .map(|c| Window {
                max: c.max,
                per_s: i64::try_from(c.per.as_secs()).unwrap_or(i64::MAX),
            })
            .collect()
    }

    /// The longest window of `caps`, in seconds (0 without caps).
    pub fn horizon_s(caps: &[Cap]) -> i64 {
        caps.iter()
            .map(|c| c.per)
            .max()
            .unwrap_or(Duration::ZERO)
            .as_secs()
            .try_into()
            .unwrap_or(i64::MAX)
    }
}

/// The store-wide table of distinct send times (unix seconds by slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendTimes {
    /// Unix seconds by slot; 0: free (slot 0 is always free).
    times: Vec<i64>,
    /// How many times a half was reused.
    era: u32,
    /// The longest cap window ever used with the store, in seconds.
    horizon_s: i64,
}

impl Default for SendTimes {
    fn default() -> Self {
        SendTimes {
            times: vec![0; SLOTS],
            era: 0,
            horizon_s: 0,
        }
    }
}

/// The slots of era `era`'s half.
fn half(era: u32) -> std::ops::Range<u16> {
    match era % 2 {
        0 => 1..HALF,
        _ => HALF..SLOTS as u16,
    }
}

impl SendTimes {
    /// A table from its parts (as a store keeps them); `None` if they do not fit.
    pub fn from_parts(times: Vec<i64>, era: u32, horizon_s: i64) -> Option<SendTimes> {
        (times.len() == SLOTS && times[0] == 0 && times.iter().all(|&t| t >= 0)).then_some(
            SendTimes {
                times,
                era,
                horizon_s,
            },
        )
    }

    /// Unix seconds by slot (0: free).
    pub fn times(&self) -> &[i64] {
        &self.times
    }

    /// The current era.
    pub fn era(&self) -> u32 {
        self.era
    }

    /// The longest cap window the table has been kept for, in seconds.
    pub fn horizon_s(&self) -> i64 {
        self.horizon_s
    }

    /// The time of `slot`; `None` when free.
    pub fn time(&self, slot: u16) -> Option<i64> {
        match self.times.get(usize::from(slot)) {
            Some(&t) if t > 0 => Some(t),
            _ => None,
        }
    }

    /// The slot holding time `t` (unix seconds, > 0), adding it if new; `horizon_s` is the
    /// longest cap window of the caller's caps. When the current half is full the other one is
    /// reused, which needs every time in it at least the longest window ever used before `t`;
    /// `Err` says why not.
    pub fn alloc(&mut self, t: i64, horizon_s: i64) -> Result<u16, String> {
        if t <= 0 {
            return Err(format!("send time {t} is not after 1970"));
        }
        self.horizon_s = self.horizon_s.max(horizon_s);
        if let Some(slot) = self.times.iter().position(|&x| x == t) {
            return Ok(slot as u16);
        }
        if let Some(slot) = half(self.era).find(|&s| self.times[usize::from(s)] == 0) {
            self.times[usize::from(slot)] = t;
            return Ok(slot);
        }
        let next = half(self.era + 1);
        let newest_old = next
            .clone()
            .map(|s| self.times[usize::from(s)])
            .max()
            .unwrap_or(0);
        if newest_old.saturating_add(self.horizon_s) > t {
            return Err(format!(
                "more than {} distinct send times within the longest frequency-cap window \
                 ({} s): the send-time table cannot take another",
                SLOTS - 2,
                self.horizon_s
            ));
        }
        for s in next.clone() {
            self.times[usize::from(s)] = 0;
        }
        self.era += 1;
        self.times[usize::from(next.start)] = t;
        Ok(next.start)
    }
}

/// One user's last [`KEEP`] capped sends (see the module docs for the layout).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History(pub u64);

impl History {
    /// The era tag.
    fn tag(self) -> u32 {
        (self.0 & ((1 << TAG_BITS) - 1)) as u32
    }

    /// The raw slot numbers (0 = empty).
    fn raw_slots(self) -> [u16; KEEP] {
        std::array::from_fn(|i| {
            ((self.0 >> (TAG_BITS + SLOT_BITS * i as u32)) & ((1 << SLOT_BITS) - 1)) as u16
        })
    }

    /// Whether `slot`, written under this history's tag, still means what it meant then.
    fn current(self, slot: u16, table: &SendTimes) -> bool {
        let tag = self.tag();
        let era = table.era;
        let tag_of = |e: u32| e % (1 << TAG_BITS);
        if half(era).contains(&slot) {
            tag == tag_of(era)
        } else {
            era > 0 && (tag == tag_of(era) || tag == tag_of(era - 1))
        }
    }

    /// The slots that still count, with their times.
    fn kept(self, table: &SendTimes) -> impl Iterator<Item = (u16, i64)> + '_ {
        self.raw_slots()
            .into_iter()
            .filter(move |&s| s != 0 && self.current(s, table))
            .filter_map(|s| table.time(s).map(|t| (s, t)))
    }

    /// The kept send times, newest first.
    pub fn sends(self, table: &SendTimes) -> Vec<i64> {
        let mut times: Vec<i64> = self.kept(table).map(|(_, t)| t).collect();
        times.sort_unstable_by(|a, b| b.cmp(a));
        times
    }

    /// Whether a send at `t` stays within every cap (see the module docs). Inlined for the
    /// common case, a history with no send yet (each user's first capped send), which costs
    /// a test; the others are checked by [`History::admits_kept`].
    #[inline]
    pub fn admits(self, table: &SendTimes, t: i64, caps: &[Window]) -> bool {
        if self.0 == 0 {
            // No send yet (a cap's max is at least 1).
            return caps.iter().all(|cap| cap.max >= 1);
        }
        self.admits_kept(table, t, caps)
    }

    /// [`History::admits`] for a history with sends.
    fn admits_kept(self, table: &SendTimes, t: i64, caps: &[Window]) -> bool {
        let mut times = [0i64; KEEP];
        let mut n = 0;
        for (_, time) in self.kept(table) {
            times[n] = time;
            n += 1;
        }
        let sends = &times[..n];
        let oldest = sends.iter().copied().min();
        caps.iter().all(|cap| {
            let from = t.saturating_sub(cap.per_s);
            let within = sends.iter().filter(|&&s| s > from && s <= t).count();
            let lost = n == KEEP && oldest.is_some_and(|oldest| oldest > from);
            (within as u64) < u64::from(cap.max) && !lost
        })
    }

    /// This history with a send at `slot` (a slot of the table's current or previous half)
    /// added: stale slots dropped, the oldest send dropped when all are taken.
    pub fn with_send(self, table: &SendTimes, slot: u16) -> History {
        let mut kept = [(0u16, 0i64); KEEP];
        let mut n = 0;
        for k in self.kept(table) {
            kept[n] = k;
            n += 1;
        }
        if n == KEEP {
            if let Some(oldest) = (0..n).min_by_key(|&i| kept[i].1) {
                kept[oldest] = kept[n - 1];
                n -= 1;
            }
        }
        kept[n] = (slot, table.time(slot).unwrap_or(0));
        n += 1;
        let mut bits = u64::from(table.era % (1 << TAG_BITS));
        for (i, (s, _)) in kept[..n].iter().enumerate() {
            bits |= u64::from(*s) << (TAG_BITS + SLOT_BITS * i as u32);
        }
        History(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(list: &[(u32, i64)]) -> Vec<Window> {
        list.iter()
            .map(|&(max, per_s)| Window { max, per_s })
            .collect()
    }

    /// Replays sends at `times` (each admitted or not) and returns which were admitted.
    fn replay(table: &mut SendTimes, times: &[i64], caps: &[Window], horizon: i64) -> Vec<bool> {
        let mut h = History::default();
        times
            .iter()
            .map(|&t| {
                let ok = h.admits(table, t, caps);
                if ok {
                    let slot = table.alloc(t, horizon).unwrap();
                    h = h.with_send(table, slot);
                }
                ok
            })
            .collect()
    }

    /// The rule read directly: count every earlier admitted send in the window.
    fn naive(times: &[i64], caps: &[Window]) -> Vec<bool> {
        let mut sent: Vec<i64> = Vec::new();
        times
            .iter()
            .map(|&t| {
                let ok = caps.iter().all(|c| {
                    let n = sent.iter().filter(|&&s| s > t - c.per_s && s <= t).count();
                    (n as u64) < u64::from(c.max)
                });
                if ok {
                    sent.push(t);
                }
                ok
            })
            .collect()
    }

    #[test]
    fn layout_is_what_the_lua_reads() {
        let mut table = SendTimes::default();
        let a = table.alloc(1_000, 0).unwrap();
        let b = table.alloc(2_000, 0).unwrap();
        assert_eq!((a, b), (1, 2));
        let h = History::default().with_send(&table, a).with_send(&table, b);
        // Tag 0, slot 1 at bits 4.., slot 2 at bits 16...
        assert_eq!(h.0, (1 << 4) | (2 << 16));
        assert_eq!(h.0.to_le_bytes(), [0x10, 0, 2, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn forward_sends_match_the_rule_exactly() {
        let caps = caps(&[(2, 86_400), (5, 7 * 86_400)]);
        let mut t = 1_700_000_000;
        let mut times = Vec::new();
        let mut x: u64 = 7;
        for _ in 0..400 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            t += (x >> 33) as i64 % 40_000;
            times.push(t);
            if x.is_multiple_of(5) {
                times.push(t); // two campaigns in one run
            }
        }
        let mut table = SendTimes::default();
        assert_eq!(
            replay(&mut table, &times, &caps, 7 * 86_400),
            naive(&times, &caps)
        );
    }

    #[test]
    fn a_window_boundary_is_exclusive_below_and_inclusive_above() {
        let caps = caps(&[(1, 3_600)]);
        let mut table = SendTimes::default();
        let got = replay(&mut table, &[10_000, 13_599, 13_600, 13_601], &caps, 3_600);
        assert_eq!(got, [true, false, true, false]);
    }

    #[test]
    fn halves_are_reused_only_past_the_horizon_and_old_slots_go_stale() {
        let horizon = 3_000;
        let mut table = SendTimes::default();
        let first = table.alloc(1_000, horizon).unwrap();
        let era0 = History::default().with_send(&table, first);
        // Era 0 fills half 0 (2047 slots: times 1000..=3046), era 1 half 1 (2048).
        let mut t = 1_000;
        for _ in 1..2047 {
            t += 1;
            table.alloc(t, horizon).unwrap();
        }
        assert_eq!(table.era(), 0);
        t += 1;
        assert_eq!(table.alloc(t, horizon), Ok(HALF));
        assert_eq!(table.era(), 1);
        let era1 = era0.with_send(&table, HALF);
        assert_eq!(era1.sends(&table), [t, 1_000]);
        for _ in 1..2048 {
            t += 1;
            table.alloc(t, horizon).unwrap();
        }
        // Half 0's newest time (3046) is not yet the horizon before these: refused.
        assert!(table.alloc(6_045, horizon).is_err());
        assert_eq!(table.alloc(6_046, horizon), Ok(1));
        assert_eq!(table.era(), 2);
        // Slot 1 now names 6046: the era-1 history's slot 1 (time 1000) is stale, its half-1
        // slot still counts.
        assert_eq!(era1.sends(&table), [3_047]);
        assert!(era0.sends(&table).is_empty());
        let caps = caps(&[(1, 1_000_000)]);
        assert!(era0.admits(&table, 6_046, &caps));
        assert!(!era1.admits(&table, 6_046, &caps));
    }

    #[test]
    fn an_earlier_send_than_the_kept_ones_is_capped_when_sends_may_be_lost() {
        let caps = caps(&[(5, 1_000)]);
        let mut table = SendTimes::default();
        let mut h = History::default();
        for t in [100, 200, 300, 400, 500] {
            let slot = table.alloc(t, 1_000).unwrap();
            h = h.with_send(&table, slot);
        }
        // Six sends, the oldest forgotten: a send at 450 cannot know how many were before it.
        let slot = table.alloc(600, 1_000).unwrap();
        h = h.with_send(&table, slot);
        assert_eq!(h.sends(&table), [600, 500, 400, 300, 200]);
        assert!(!h.admits(&table, 450, &caps));
    }
}
