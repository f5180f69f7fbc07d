//! The dispatcher's concurrency slots, budgeted per priority lane (SPEC Policy → Priority).
//!
//! One pool of `capacity` slots, three lanes (`transactional`, `normal`, `bulk`):
//! - **The reserve.** [`reserve_of`] slots (a tenth, at least one once there are two) are
//!   transactional's: bulk never holds a slot that would leave fewer of them free than the
//!   reserve minus what transactional already holds. So while bulk saturates, a transactional
//!   message finds a free slot at once.
//! - **Borrowing.** Transactional and normal may take any free slot, the reserve included, so a
//!   run of one lane gets every slot (bulk: all but the reserve). A slot normal borrowed from
//!   the reserve comes back when its push ends.
//! - **Priority.** Waiters queue per lane; a slot that comes back goes to transactional's first
//!   waiter, else normal's, else bulk's, and a newcomer never passes a waiter of its own or a
//!   higher lane. So a transactional message waits at most for the first push of any lane to
//!   end — never behind a lower lane's backlog.
//!
//! The total held never exceeds `capacity`. Slots come back when their [`LaneSlots`] drop.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use crate::model::Priority;

/// Lanes, one per [`Priority`].
const LANES: usize = Priority::ALL.len();
const TRANSACTIONAL: usize = 0;
const BULK: usize = 2;

/// Transactional's reserve out of `capacity` slots: a tenth, rounded up, but never more than
/// half (bulk always keeps a slot) and none with a single slot (bulk must be able to send).
pub fn reserve_of(capacity: usize) -> usize {
    match capacity {
        0 | 1 => 0,
        c => c.div_ceil(10).min(c / 2),
    }
}

/// The slots of every lane. Shared as an `Arc`: what [`Lanes::acquire`] hands out refers back.
#[derive(Debug)]
pub struct Lanes {
    capacity: usize,
    reserve: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    held: [usize; LANES],
    waiting: [VecDeque<Waiter>; LANES],
}

/// A queued request: at least `min` slots, as many as fit up to `n`.
#[derive(Debug)]
struct Waiter {
    min: usize,
    n: usize,
    /// Told how many were granted.
    granted: oneshot::Sender<usize>,
}

impl State {
    fn total(&self) -> usize {
        self.held.iter().sum()
    }
}

impl Lanes {
    /// `capacity` slots (at least one).
    pub fn new(capacity: usize) -> Arc<Lanes> {
        let capacity = capacity.max(1);
        Arc::new(Lanes {
            capacity,
            reserve: reserve_of(capacity),
            state: Mutex::new(State::default()),
        })
    }

    /// Slots held now, all lanes.
    pub fn in_flight(&self) -> usize {
        self.lock().total()
    }

    /// Slots held now by `lane`.
    pub fn held_by(&self, lane: Priority) -> usize {
        self.lock().held[lane.lane()]
    }

    /// The most slots `lane` can ever hold at once: every slot, but the reserve for bulk.
    pub fn most(&self, lane: Priority) -> usize {
        match lane.lane() {
            BULK => self.capacity - self.reserve,
            _ => self.capacity,
        }
    }

    /// Waits for `n` slots of `lane` (at most [`Lanes::most`]; at least one).
    pub async fn acquire(self: &Arc<Self>, lane: Priority, n: usize) -> LaneSlots {
        let n = n.clamp(1, self.most(lane));
        self.acquire_between(lane, n, n, false).await
    }

    /// Waits for at least one slot of `lane`, and takes as many as are free then, up to `n`:
    /// for messages that each hold a slot of their own but may start together. Queued like
    /// any other waiter: it passes no waiter of its own or a higher lane. `rest`: these are
    /// the rest of a request that was granted only part of what it asked for — they wait at
    /// the head of their lane, where they were (as if each message had queued on its own).
    pub async fn acquire_some(self: &Arc<Self>, lane: Priority, n: usize, rest: bool) -> LaneSlots {
        let n = n.clamp(1, self.most(lane));
        self.acquire_between(lane, 1, n, rest).await
    }

    /// Waits for at least `min` slots of `lane` and takes as many as fit up to `n` (`min` ≤
    /// `n` ≤ [`Lanes::most`]), queued at the head of its lane when `front`.
    async fn acquire_between(
        self: &Arc<Self>,
        lane: Priority,
        min: usize,
        n: usize,
        front: bool,
    ) -> LaneSlots {
        let l = lane.lane();
        let granted = {
            let mut s = self.lock();
            let ahead = if front {
                &s.waiting[..l]
            } else {
                &s.waiting[..=l]
            };
            if ahead.iter().all(VecDeque::is_empty) && self.fits(&s, l, min) {
                let n = self.room(&s, l).min(n);
                s.held[l] += n;
                return self.slots(l, n);
            }
            let (tx, rx) = oneshot::channel();
            let waiter = Waiter {
                min,
                n,
                granted: tx,
            };
            match front {
                true => s.waiting[l].push_front(waiter),
                false => s.waiting[l].push_back(waiter),
            }
            rx
        };
        let mut pending = Pending {
            lanes: self,
            lane: l,
            granted: Some(granted),
        };
        // The sender lives in the queue until it grants (or the waiter is found gone).
        let got = match pending.granted.as_mut() {
            Some(rx) => rx.await.unwrap_or(0),
            None => 0,
        };
        pending.granted = None;
        self.slots(l, got)
    }

    fn slots(self: &Arc<Self>, lane: usize, n: usize) -> LaneSlots {
        LaneSlots {
            lanes: self.clone(),
            lane,
            n,
        }
    }

    /// Whether `lane` may take `n` more slots now.
    fn fits(&self, s: &State, lane: usize, n: usize) -> bool {
        n <= self.room(s, lane)
    }

    /// How many more slots `lane` may take now.
    fn room(&self, s: &State, lane: usize) -> usize {
        let free = self.capacity - s.total();
        let kept = match lane {
            BULK => self.reserve.saturating_sub(s.held[TRANSACTIONAL]),
            _ => 0,
        };
        free.saturating_sub(kept)
    }

    /// Hands free slots to waiters, lane by lane, first come first served within a lane; stops
    /// at the first waiter that does not fit, so no lower lane passes it.
    fn grant(&self, s: &mut State) {
        for lane in 0..LANES {
            while let Some(w) = s.waiting[lane].front() {
                if w.granted.is_closed() {
                    s.waiting[lane].pop_front();
                    continue;
                }
                if !self.fits(s, lane, w.min) {
                    return;
                }
                let Some(w) = s.waiting[lane].pop_front() else {
                    break;
                };
                let n = self.room(s, lane).min(w.n);
                s.held[lane] += n;
                if w.granted.send(n).is_err() {
                    s.held[lane] -= n;
                }
            }
        }
    }

    fn release(&self, lane: usize, n: usize) {
        if n == 0 {
            return;
        }
        let mut s = self.lock();
        s.held[lane] -= n;
        self.grant(&mut s);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A waiter whose future may be dropped (a halt wakes the dispatcher): slots granted to it
/// in the meantime go back.
struct Pending<'a> {
    lanes: &'a Arc<Lanes>,
    lane: usize,
    granted: Option<oneshot::Receiver<usize>>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.granted.take() {
            rx.close();
            if let Ok(n) = rx.try_recv() {
                self.lanes.release(self.lane, n);
            } else {
                let mut s = self.lanes.lock();
                self.lanes.grant(&mut s);
            }
        }
    }
}

/// Slots of one lane, given back on drop.
#[derive(Debug)]
pub struct LaneSlots {
    lanes: Arc<Lanes>,
    lane: usize,
    n: usize,
}

impl LaneSlots {
    /// How many slots these are.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether these are no slots at all.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Takes `n` of these slots (at most all) apart, to be given back on their own.
    pub fn split(&mut self, n: usize) -> LaneSlots {
        let n = n.min(self.n);
        self.n -= n;
        LaneSlots {
            lanes: self.lanes.clone(),
            lane: self.lane,
            n,
        }
    }
}

impl Drop for LaneSlots {
    fn drop(&mut self) {
        self.lanes.release(self.lane, self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::time::Duration;
    use tokio::time::{sleep, Instant};

    const T: Priority = Priority::Transactional;
    const N: Priority = Priority::Normal;
    const B: Priority = Priority::Bulk;

    #[test]
    fn the_reserve_is_a_tenth_and_leaves_bulk_a_slot() {
        assert_eq!(reserve_of(1), 0);
        assert_eq!(reserve_of(2), 1);
        assert_eq!(reserve_of(10), 1);
        assert_eq!(reserve_of(11), 2);
        assert_eq!(reserve_of(1000), 100);
    }

    /// Takes `n` slots one at a time, each at once (panics if one would wait).
    fn take(lanes: &Arc<Lanes>, lane: Priority, n: usize) -> Vec<LaneSlots> {
        (0..n)
            .map(|_| lanes.acquire(lane, 1).now_or_never().expect("a free slot"))
            .collect()
    }

    #[tokio::test]
    async fn one_lane_alone_gets_every_slot_but_bulk_leaves_the_reserve() {
        let lanes = Lanes::new(100);
        for lane in [T, N] {
            let held = take(&lanes, lane, 100);
            assert!(lanes.acquire(lane, 1).now_or_never().is_none());
            drop(held);
        }
        let held = take(&lanes, B, 90);
        assert!(
            lanes.acquire(B, 1).now_or_never().is_none(),
            "bulk took the reserve"
        );
        assert_eq!(lanes.in_flight(), 90);
        drop(held);
        assert_eq!(lanes.in_flight(), 0);
    }

    /// Bulk saturating — every slot it may hold taken, thousands more waiting — cannot delay
    /// transactional's reserve: it is granted at once.
    #[tokio::test]
    async fn bulk_saturating_never_delays_transactional_within_its_reserve() {
        let lanes = Lanes::new(50);
        let _bulk = take(&lanes, B, 45);
        let waiting: Vec<_> = (0..2000)
            .map(|_| {
                tokio::spawn({
                    let lanes = lanes.clone();
                    async move { drop(lanes.acquire(B, 1).await) }
                })
            })
            .collect();
        tokio::task::yield_now().await;
        let tx = take(&lanes, T, 5);
        assert_eq!(lanes.held_by(T), 5);
        // Beyond its reserve, transactional waits — and goes before every bulk waiter.
        let mut more = Box::pin(lanes.acquire(T, 1));
        assert!((&mut more).now_or_never().is_none());
        drop(tx);
        assert_eq!((lanes.held_by(T), lanes.held_by(B)), (1, 45));
        assert!(more.now_or_never().is_some());
        waiting.iter().for_each(|w| w.abort());
    }

    /// A slot that comes back goes to transactional's waiter, then normal's, then bulk's,
    /// whoever asked first.
    #[tokio::test]
    async fn returned_slots_go_to_the_highest_lane_waiting() {
        let lanes = Lanes::new(10);
        let mut held = take(&lanes, N, 10);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for lane in [B, N, B, T, N] {
            let (lanes, order) = (lanes.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let slot = lanes.acquire(lane, 1).await;
                order.lock().unwrap().push(lane);
                slot
            }));
            tokio::task::yield_now().await;
        }
        for _ in 0..5 {
            drop(held.pop());
            tokio::task::yield_now().await;
        }
        for t in tasks {
            drop(t.await.unwrap());
        }
        assert_eq!(*order.lock().unwrap(), vec![T, N, N, B, B]);
    }

    /// `acquire_some` takes what is free (bulk: never the reserve), queues for at least one
    /// behind the waiters before it, and is granted as many as have come back by its turn.
    #[tokio::test]
    async fn some_takes_what_is_free_and_waits_its_turn_for_at_least_one() {
        let lanes = Lanes::new(20);
        let mut bulk = lanes
            .acquire_some(B, 100, false)
            .now_or_never()
            .expect("free slots");
        assert_eq!(bulk.len(), 18, "all but transactional's reserve");
        let normal = lanes
            .acquire_some(N, 100, false)
            .now_or_never()
            .expect("the reserve");
        assert_eq!((normal.len(), lanes.in_flight()), (2, 20));
        let mut first = Box::pin(lanes.acquire_some(N, 5, false));
        let mut second = Box::pin(lanes.acquire_some(N, 5, false));
        assert!((&mut first).now_or_never().is_none());
        assert!((&mut second).now_or_never().is_none());
        drop(bulk.split(3));
        assert_eq!(bulk.len(), 15);
        let first = first.now_or_never().expect("granted");
        assert_eq!(first.len(), 3, "what came back, not all it asked for");
        drop(bulk.split(10));
        let second = second.now_or_never().expect("granted");
        assert_eq!(second.len(), 5, "at most what it asked for");
        assert_eq!(lanes.in_flight(), 5 + 2 + 3 + 5);
        drop((bulk, normal, first, second));
        assert_eq!(lanes.in_flight(), 0);
    }

    /// The rest of a request granted in part waits at the head of its lane, before those that
    /// queued after the request — but still behind a higher lane.
    #[tokio::test]
    async fn the_rest_of_a_request_waits_where_it_did() {
        let lanes = Lanes::new(10);
        let mut held = lanes
            .acquire_some(N, 10, false)
            .now_or_never()
            .expect("free");
        let mut later = Box::pin(lanes.acquire_some(N, 4, false));
        assert!((&mut later).now_or_never().is_none());
        let mut rest = Box::pin(lanes.acquire_some(N, 4, true));
        assert!((&mut rest).now_or_never().is_none());
        let mut tx = Box::pin(lanes.acquire(T, 1));
        assert!((&mut tx).now_or_never().is_none());
        drop(held.split(1));
        let _tx = tx.now_or_never().expect("transactional first");
        drop(held.split(3));
        let rest = rest.now_or_never().expect("the rest next");
        assert_eq!(rest.len(), 3);
        assert!((&mut later).now_or_never().is_none());
        drop(held.split(2));
        assert_eq!(later.now_or_never().expect("then the later one").len(), 2);
    }

    #[tokio::test]
    async fn a_waiter_given_up_gives_back_what_it_was_granted() {
        let lanes = Lanes::new(4);
        let held = take(&lanes, N, 4);
        let waiting = lanes.acquire(T, 2);
        let mut waiting = Box::pin(waiting);
        assert!((&mut waiting).now_or_never().is_none());
        drop(held);
        // Granted while nobody polled it, then dropped: the slots come back.
        assert_eq!(lanes.in_flight(), 2);
        drop(waiting);
        assert_eq!(lanes.in_flight(), 0);
        // A waiter dropped before its grant leaves no trace in the queue.
        let held = take(&lanes, N, 4);
        drop(Box::pin(lanes.acquire(B, 1)));
        drop(held);
        assert_eq!(lanes.in_flight(), 0);
        let _all = take(&lanes, N, 4);
    }

    /// Many pushes of random lanes, sizes and durations: the total never exceeds the slots,
    /// bulk never eats into transactional's unused reserve, and transactional never waits
    /// longer than the longest push (it is first in line for every slot that comes back, and
    /// asks for so few that it rarely queues behind itself).
    #[tokio::test(start_paused = true)]
    async fn totals_are_never_exceeded_and_transactional_waits_at_most_one_push() {
        let lanes = Lanes::new(20);
        let reserve = reserve_of(20);
        let longest = Duration::from_millis(50);
        let worst_tx_wait = Arc::new(Mutex::new(Duration::ZERO));
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut tasks = Vec::new();
        for k in 0..3000u64 {
            let lane = match next() % 100 {
                0..=2 => T,
                3..=50 => N,
                _ => B,
            };
            let n = if lane == T {
                1
            } else {
                1 + (next() % 3) as usize
            };
            let hold = Duration::from_millis(1 + next() % 50);
            let start = Duration::from_millis(k / 2);
            let (lanes, worst) = (lanes.clone(), worst_tx_wait.clone());
            tasks.push(tokio::spawn(async move {
                sleep(start).await;
                let asked = Instant::now();
                let slots = lanes.acquire(lane, n).await;
                if lane == T {
                    let mut w = worst.lock().unwrap();
                    *w = (*w).max(asked.elapsed());
                }
                {
                    let s = lanes.lock();
                    assert!(s.total() <= 20, "{:?}", s.held);
                    assert!(
                        s.held[BULK] + reserve.saturating_sub(s.held[TRANSACTIONAL]) <= 20,
                        "bulk in the reserve: {:?}",
                        s.held
                    );
                }
                sleep(hold).await;
                drop(slots);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(lanes.in_flight(), 0);
        let worst = *worst_tx_wait.lock().unwrap();
        assert!(worst <= longest, "transactional waited {worst:?}");
    }
}
