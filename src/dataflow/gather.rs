//! The end of a cluster run: each process's [`Tally`] sent to worker 0 through a small
//! dataflow of its own, so process 0 can write the summary of the whole cluster.
//!
//! Built after the fan-out dataflow has completed on every worker (every worker builds it, in
//! the same order, as timely requires); the counters are final by then because the fan-out's
//! probe passes only once every push of every worker is acknowledged.

use std::cell::RefCell;
use std::rc::Rc;

use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Input, Operator};
use timely::dataflow::InputHandle;
use timely::worker::Worker;

use crate::metrics::Tally;

/// Sends `mine` (if any) to worker 0 and steps until every worker's is there; returns what
/// worker 0 received (empty on the other workers).
pub fn gather(worker: &mut Worker, mine: Option<Tally>) -> Vec<Tally> {
    let got: Rc<RefCell<Vec<Tally>>> = Rc::default();
    let sink = got.clone();
    let mut input: InputHandle<u64, _> = InputHandle::new();
    worker.dataflow::<u64, _, _>(|scope| {
        scope.input_from(&mut input).container::<Vec<Tally>>().sink(
            Exchange::new(|_: &Tally| 0),
            "GatherTallies",
            move |(i, _)| {
                i.for_each_stamp(|_, data| {
                    for batch in data {
                        sink.borrow_mut().append(batch);
                    }
                });
            },
        );
    });
    if let Some(t) = mine {
        input.send(t);
    }
    drop(input);
    while worker.step_or_park(Some(std::time::Duration::from_millis(50))) {}
    got.take()
}
