//! The naive model of capped claims that both stores' tests hold their ledgers to: the
//! reference send-time table and histories ([`crate::history`]), plain sets per ledger.

use super::*;
use std::collections::BTreeSet;

use crate::history::{History, SendTimes, Window};
use crate::store::redis::history::HISTORY_USERS;

/// The model of one ledger under capped claims.
#[derive(Default)]
pub(in crate::store) struct CapLedger {
    pub(in crate::store) granted: std::collections::BTreeSet<u32>,
    /// Claimed for sending (in flight until done).
    pub(in crate::store) sent: std::collections::BTreeSet<u32>,
    pub(in crate::store) done: std::collections::BTreeSet<u32>,
    /// In flight at a dead run's end: handed out once more.
    pub(in crate::store) pending: std::collections::BTreeSet<u32>,
    pub(in crate::store) dead: RoaringBitmap,
    pub(in crate::store) capped: RoaringBitmap,
}

/// The naive model of capped claims: the reference table and histories, plain sets per ledger
/// (each store is held to it: this module's Redis tests, `file::tests` the embedded store's).
#[derive(Default)]
pub(in crate::store) struct CapModel {
    pub(in crate::store) table: SendTimes,
    pub(in crate::store) histories: std::collections::BTreeMap<u32, History>,
    pub(in crate::store) ledgers: Vec<CapLedger>,
}

impl CapModel {
    /// A capped claim of `(ledger index, ids)` members, in order.
    pub(in crate::store) fn claim(
        &mut self,
        members: &[(usize, Vec<u32>)],
        at: SendAt,
        caps: &[Window],
    ) -> Vec<CappedClaim> {
        let CapModel {
            table,
            histories,
            ledgers,
        } = self;
        members
            .iter()
            .map(|(l, ids)| {
                let led = &mut ledgers[*l];
                let mut out = CappedClaim::default();
                for &id in ids {
                    if !led.granted.insert(id) {
                        match led.pending.remove(&id) {
                            true => out.claim.claimed.push(id),
                            false => out.claim.already.push(id),
                        }
                        continue;
                    }
                    let h = histories.entry(id).or_default();
                    if h.admits(table, at.t, caps) {
                        *h = h.with_send(table, at.slot);
                        led.sent.insert(id);
                        out.claim.claimed.push(id);
                    } else {
                        led.capped.insert(id);
                        out.capped.push(id);
                    }
                }
                out
            })
            .collect()
    }

    /// A new run: what was in flight is handed out once more.
    pub(in crate::store) fn crash(&mut self) {
        for led in &mut self.ledgers {
            led.pending = led.sent.difference(&led.done).copied().collect();
        }
    }

    pub(in crate::store) fn outcomes(&self, l: usize) -> Outcomes {
        let led = &self.ledgers[l];
        let done: RoaringBitmap = led.done.iter().copied().collect();
        let sent: RoaringBitmap = led.sent.iter().copied().collect();
        Outcomes {
            delivered: &done - &led.dead,
            dead_lettered: led.dead.clone(),
            in_flight: &sent - &done,
            capped: led.capped.clone(),
            ..Outcomes::default()
        }
    }

    /// The history strings the store must hold (`id / HISTORY_USERS`).
    pub(in crate::store) fn history_keys(&self) -> BTreeSet<u32> {
        self.histories.keys().map(|id| id / HISTORY_USERS).collect()
    }

    /// History string `key` as the store must hold it, up to `len` bytes.
    pub(in crate::store) fn history_bytes(&self, key: u32, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let first = u64::from(key) * u64::from(HISTORY_USERS);
        let last = (first + u64::from(HISTORY_USERS) - 1).min(u64::from(u32::MAX)) as u32;
        for (&id, h) in self.histories.range(first as u32..=last) {
            let at = (u64::from(id) - first) as usize * 8;
            if let Some(bytes) = out.get_mut(at..at + 8) {
                bytes.copy_from_slice(&h.0.to_le_bytes());
            }
        }
        out
    }
}
