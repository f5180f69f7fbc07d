//! Why the engine does not remove granted pairs with a differential `antijoin` over every
//! proposed (campaign, user) pair: this measures exactly that shape — 10M proposed pairs fed in
//! the engine's epochs, `antijoin` against a (here empty) granted collection, `consolidate`,
//! each epoch's pairs retracted one epoch later so the traces stay bounded — beside the test the
//! engine does instead (one roaring bit per user, routed by bucket).
//!
//! `cargo bench --bench antijoin -- [USERS] [WORKERS]` prints one JSON object.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use differential_dataflow::input::Input;
use roaring::RoaringBitmap;
use timely::dataflow::operators::probe::Handle as ProbeHandle;

const EPOCH: u32 = 1 << 18;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let users: u32 = args.first().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let workers: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2);

    // The engine's way: one bit test per user against the granted bitmap.
    let granted = RoaringBitmap::new();
    let started = Instant::now();
    let kept = (1..=users).filter(|u| !granted.contains(*u)).count();
    let bitmap_s = started.elapsed().as_secs_f64();
    assert_eq!(kept as u32, users);

    let out = Arc::new(AtomicU64::new(0));
    let seen = out.clone();
    let started = Instant::now();
    let config = timely::Config::process(workers);
    let guards = timely::execute(config, move |worker| {
        let seen = seen.clone();
        let probe = ProbeHandle::new();
        let (mut pairs, granted) = worker.dataflow::<u64, _, _>(|scope| {
            let (pairs_in, pairs) = scope.new_collection::<(u32, u32), isize>();
            let (granted_in, granted) = scope.new_collection::<(u32, u32), isize>();
            pairs
                .map(|p| (p, ()))
                .antijoin(granted)
                .consolidate()
                .inspect(move |(_, _, diff)| {
                    if *diff > 0 {
                        seen.fetch_add(1, Relaxed);
                    }
                })
                .probe_with(&probe);
            (pairs_in, granted_in)
        });
        granted.close();
        let (index, peers) = (worker.index() as u32, worker.peers() as u32);
        let mut epoch = 0u64;
        let mut lo = 1u32;
        while lo <= users {
            let hi = users.min(lo.saturating_add(EPOCH - 1));
            for u in (lo..=hi).filter(|u| u % peers == index) {
                pairs.insert((0, u));
            }
            // Retract the previous epoch's pairs: without it the traces keep every pair.
            if epoch > 0 {
                let prev_lo = lo - EPOCH;
                for u in (prev_lo..lo).filter(|u| u % peers == index) {
                    pairs.remove((0, u));
                }
            }
            epoch += 1;
            pairs.advance_to(epoch);
            pairs.flush();
            worker.step_while(|| probe.less_than(pairs.time()));
            lo = hi.saturating_add(1);
            if hi == u32::MAX {
                break;
            }
        }
    })
    .expect("timely starts");
    drop(guards);
    let antijoin_s = started.elapsed().as_secs_f64();
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    assert_eq!(out.load(Relaxed), u64::from(users));
    println!(
        "{{\"users\": {users}, \"workers\": {workers}, \"antijoin_consolidate_s\": {antijoin_s:.3}, \"bitmap_test_s\": {bitmap_s:.4}, \"peak_rss_kb\": {rss}}}"
    );
}
