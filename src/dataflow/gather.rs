//! Small exchanges between the processes of a cluster, each through a dataflow of its own:
//! [`everyone`] at the start (every process checks that the others run the same job), and
//! [`gather`] at the end (each process's [`crate::metrics::Tally`] to worker 0, so process 0
//! can write the summary of the whole cluster).
//!
//! Every worker builds each of these dataflows, in the same order, as timely requires. The
//! end-of-run tallies are final when sent: the fan-out's probe passes only once every push of
//! every worker is acknowledged.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Input, Operator};
use timely::dataflow::InputHandle;
use timely::worker::Worker;
use timely::ExchangeData;

/// Sends `mine` (if any) to worker 0 and steps until every worker's is there; returns what
/// worker 0 received (empty on the other workers).
pub fn gather<T: ExchangeData + Clone>(worker: &mut Worker, mine: Option<T>) -> Vec<T> {
    collect(worker, mine, false)
}

/// Sends `mine` (if any) to every worker; returns what every worker sent, on every worker.
pub fn everyone<T: ExchangeData + Clone>(worker: &mut Worker, mine: Option<T>) -> Vec<T> {
    collect(worker, mine, true)
}

fn collect<T: ExchangeData + Clone>(worker: &mut Worker, mine: Option<T>, to_all: bool) -> Vec<T> {
    let got: Rc<RefCell<Vec<T>>> = Rc::default();
    let sink = got.clone();
    let mut input: InputHandle<u64, _> = InputHandle::new();
    worker.dataflow::<u64, _, _>(|scope| {
        let stream = scope.input_from(&mut input).container::<Vec<T>>();
        if to_all {
            stream
                .broadcast()
                .container::<Vec<T>>()
                .sink(Pipeline, "Everyone", move |(i, _)| {
                    i.for_each_stamp(|_, data| {
                        for batch in data {
                            sink.borrow_mut().append(batch);
                        }
                    })
                });
        } else {
            stream.sink(Exchange::new(|_: &T| 0), "Gather", move |(i, _)| {
                i.for_each_stamp(|_, data| {
                    for batch in data {
                        sink.borrow_mut().append(batch);
                    }
                })
            });
        }
    });
    if let Some(t) = mine {
        input.send(t);
    }
    drop(input);
    while worker.step_or_park(Some(Duration::from_millis(50))) {}
    got.take()
}
