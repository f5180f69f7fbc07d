//! What a [`super::Dispatcher::deliver`] call hands back: each message's [`Fate`], settled
//! with the concurrency slots it held ([`Settled`]), and what may hold a batch back ([`Hold`]).

use std::ops::Range;

use crate::providers::lanes::LaneSlots;

/// What became of one message, for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The provider accepted it.
    Delivered,
    /// The provider cannot address the user (no token): counted, not sent.
    Unreachable,
    /// Refused for good or out of attempts; its dead letter is already written.
    Dead,
}

/// What holds a batch's pushes back besides a stop or a cut: its campaign paused or cancelled
/// ([`crate::dataflow::halts`]). No attempt starts while held; what was not attempted is left
/// unsettled for the caller.
#[derive(Clone, Copy)]
pub struct Hold<'a> {
    /// Whether the batch is held back now.
    pub held: &'a (dyn Fn() -> bool + Sync),
    /// Told of every change that may flip `held`: a message waiting for a slot leaves the
    /// queue as soon as it is held, instead of when its turn comes.
    pub changes: Option<&'a tokio::sync::watch::Sender<u64>>,
}

impl Hold<'_> {
    /// Never held.
    pub fn never() -> Hold<'static> {
        fn no() -> bool {
            false
        }
        Hold {
            held: &no,
            changes: None,
        }
    }

    pub(super) fn is_held(&self) -> bool {
        (self.held)()
    }
}

/// Messages whose fate is settled, with the concurrency slots they held. The slots go back
/// when this is dropped, which the caller does once it has recorded the fates in the store:
/// so at most `concurrency` messages are ever handed to the provider and not yet recorded —
/// all that a crash can make a re-run send twice.
#[derive(Debug)]
pub struct Settled {
    fates: Fates,
    /// The slots of these messages' last attempt.
    _slots: Option<LaneSlots>,
}

#[derive(Debug)]
enum Fates {
    /// Every position of the range delivered: a chunk of consecutive positions sent whole
    /// (a list provider's usual answer), kept as its range rather than a fate per message.
    Delivered(Range<usize>),
    /// `(position in the batch, fate)`.
    Each(Vec<(usize, Fate)>),
}

impl Settled {
    /// `chunk` (ascending positions), every one delivered.
    pub(super) fn all_delivered(chunk: &[usize], slots: Option<LaneSlots>) -> Settled {
        let fates = match consecutive(chunk) {
            Some(range) => Fates::Delivered(range),
            None => Fates::Each(chunk.iter().map(|&i| (i, Fate::Delivered)).collect()),
        };
        Settled {
            fates,
            _slots: slots,
        }
    }

    /// `(position in the batch, fate)` of each message.
    pub(super) fn each(fates: Vec<(usize, Fate)>, slots: Option<LaneSlots>) -> Settled {
        Settled {
            fates: Fates::Each(fates),
            _slots: slots,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        match &self.fates {
            Fates::Delivered(r) => r.is_empty(),
            Fates::Each(each) => each.is_empty(),
        }
    }

    /// Each message's `(position in the batch, fate)`.
    pub fn fates(&self) -> impl Iterator<Item = (usize, Fate)> + '_ {
        let (range, each) = match &self.fates {
            Fates::Delivered(r) => (r.clone(), &[][..]),
            Fates::Each(each) => (0..0, &each[..]),
        };
        (range.map(|i| (i, Fate::Delivered))).chain(each.iter().copied())
    }

    /// The positions, when every one was delivered and they are consecutive.
    pub fn delivered(&self) -> Option<Range<usize>> {
        match &self.fates {
            Fates::Delivered(r) => Some(r.clone()),
            Fates::Each(_) => None,
        }
    }
}

/// `positions` (strictly ascending, as `which` always is) as one range, if they are
/// consecutive.
fn consecutive(positions: &[usize]) -> Option<Range<usize>> {
    let (&first, &last) = (positions.first()?, positions.last()?);
    (last - first + 1 == positions.len()).then_some(first..last + 1)
}
