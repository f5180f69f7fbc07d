//! Jepsen-style fault schedules against the real `fanout` binary: each seed draws a small
//! workload (promotions, segment and lazy coupons, hot products at several ticks; file or
//! Redis store; `log:` or HTTP provider; one process or a cluster of two) and a few faults
//! (kill -9, SIGSTOP past the Redis lease, Redis restarts with and without persistence, the
//! Redis server stopped for 0.1–3 s (SIGSTOP, then SIGCONT), provider 5xx/429/timeouts, a
//! credential stop, and the embedded store's or the Redis server's disk filling up: a tmpfs
//! of its own, mounted by the harness, so it runs as root;
//! a full Redis either exits or, fsyncing once a second, refuses writes; and, for a quarter
//! of the schedules, the fault runs on one CPU beside a busy loop), then a clean run, and
//! checks the deliveries over all runs against the naive reading of the job: nothing lost,
//! nothing unexpected, repeated keys carry identical records, duplicates within what was in
//! flight.
//! Jobs draw holdouts, a control group, night quiet hours and (about a quarter of them, where
//! a user is offered two capped sends) frequency caps; under caps every run's `--now` is
//! non-decreasing (the fault runs all at the first tick), a Redis restart keeps its data, and
//! no user's distinct deliveries may exceed a cap, whatever was killed between a claim and
//! its record in the send history.
//!
//! About a fifth of the schedules (28% of those without caps) also draw an operator's
//! `fanout campaigns pause|resume|cancel` on one campaign of the job, landing in a fault run
//! at a trigger of its own (a schedule without faults gets a calm run to carry it): pause and
//! resume while the run goes on; pause, then the run's kill -9 while paused, resumed before
//! the next run or while the next run waits for it; pause then cancel; cancel, then the run's
//! own fault; cancel, then kill -9 0–40 ms later (before the run's next poll or epoch); cancel
//! once a run ended (between a kill and the restart). A pause always ends in a resume or a
//! cancel before the clean runs. A paused campaign ends exactly as the naive reading says. A
//! cancelled one has no fixed expectation (the engine chose which users it sent first), so:
//! (a) the store settles each of its naive eligible pairs exactly once (delivered, cancelled,
//! held out, …; read with the library from every part of the store) and nothing is left in
//! flight; (b) no provider attempt of it (an HTTP request, any answer; a `log:` line) begins
//! later than a grace after the command returned — nor after a pause's, until the resume —
//! the grace being `--grace` (1 s: the run polls every 50 ms, and a loaded machine may hold
//! a process back; an attempt already waiting for its slot or its rate token sends nothing
//! once the run has seen the change); (c) every pair it records as delivered was sent,
//! and what was sent beyond those (in flight at an interruption, then settled as cancelled)
//! is cancelled in the store and within the in-flight bound; (d) the clean runs push none of
//! it. The job's other campaigns stay exact — except under frequency caps, where a pause
//! reorders a user's capped offers and a cancel frees cap room, so the naive reading says who
//! is eligible but not who is sent: there, every campaign is held to (a) and (c) with the
//! in-flight bound, nothing is sent that is not eligible, and the caps are checked on what was
//! sent. A Redis then restarts with its data.
//!
//! ```text
//! cargo test --release --test faults                          # the CI set: seeds 1..=200
//! cargo test --release --test faults -- --schedules 2000 --from 1000   # a soak
//! cargo test --release --test faults -- --seed 17             # replay one schedule verbosely
//! cargo test --release --test faults -- --seeds 3,17,42       # exactly these schedules
//! ```
//! Other flags: `--jobs N` (schedules at once, default 3), `--lease DUR` (the Redis run lease
//! given to the children as `FANOUT_LEASE` and waited past, default 1s), `--http-timeout MS`
//! (`FANOUT_HTTP_TIMEOUT`, default 1500: a tighter one times out
//! answered requests on a loaded machine, and the receiver cannot tell those re-sends apart),
//! `--grace MS` (the base of the grace after a pause or cancel, default 1000), `--verbose`.
//! Unknown flags (cargo's own) are ignored.
//! `--clean` runs the same workloads without faults or operators' commands (a control of the
//! naive reading). `--one-cpu` runs every schedule on one CPU beside a busy loop (a quarter of
//! them draw that: `plan::one_cpu`).
//! `--list` prints the schedules without running them. `FAULTS_KEEP=1` keeps a failing schedule's files under the temp directory.

mod common;
mod http_server;
mod naive;
mod redis_server;

#[path = "faults/check.rs"]
mod check;
#[path = "faults/disk.rs"]
mod disk;
#[path = "faults/exec.rs"]
mod exec;
#[path = "faults/plan.rs"]
mod plan;

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Args {
    seeds: common::Seeds,
    jobs: usize,
    /// Print the schedules' descriptions only.
    list: bool,
    env: exec::Env,
}

fn parse_args() -> Args {
    let mut a = Args {
        seeds: common::Seeds::new(1, 200),
        jobs: 3,
        list: false,
        env: exec::Env {
            lease: Duration::from_secs(1),
            lease_text: "1s".into(),
            http_timeout_ms: 1500,
            grace: Duration::from_secs(1),
            verbose: false,
            clean: false,
            one_cpu: false,
        },
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let num = |i: usize| argv.get(i + 1).and_then(|v| v.parse::<u64>().ok());
    while i < argv.len() {
        match argv[i].as_str() {
            "--schedules" if num(i).is_some() => {
                a.seeds.count = num(i).unwrap();
                i += 1;
            }
            "--from" if num(i).is_some() => {
                a.seeds.from = num(i).unwrap();
                i += 1;
            }
            "--seed" if num(i).is_some() => {
                a.seeds = common::Seeds::new(num(i).unwrap(), 1);
                a.env.verbose = true;
                i += 1;
            }
            "--jobs" if num(i).is_some() => {
                a.jobs = num(i).unwrap().max(1) as usize;
                i += 1;
            }
            "--grace" if num(i).is_some() => {
                a.env.grace = Duration::from_millis(num(i).unwrap());
                i += 1;
            }
            "--http-timeout" if num(i).is_some() => {
                a.env.http_timeout_ms = num(i).unwrap();
                i += 1;
            }
            "--lease" if argv.get(i + 1).is_some() => {
                let text = argv[i + 1].clone();
                match humantime::parse_duration(&text) {
                    Ok(d) => {
                        a.env.lease = d;
                        a.env.lease_text = text;
                    }
                    Err(e) => eprintln!("faults: --lease {text}: {e} (kept 1s)"),
                }
                i += 1;
            }
            "--seeds" if argv.get(i + 1).is_some() => {
                a.seeds.set_list(&argv[i + 1]);
                i += 1;
            }
            "--verbose" => a.env.verbose = true,
            "--list" => a.list = true,
            "--clean" => a.env.clean = true,
            "--one-cpu" => a.env.one_cpu = true,
            // cargo's and libtest's flags (--nocapture, --test-threads N, a filter, …).
            _ => {}
        }
        i += 1;
    }
    a
}

fn main() -> ExitCode {
    let args = parse_args();
    if args.list {
        for k in 0..args.seeds.count {
            let seed = args.seeds.nth(k);
            println!("seed {seed}: {}", plan::plan(seed).describe());
        }
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::<u64>::new());
    let passed = AtomicUsize::new(0);
    let count = args.seeds.count as usize;
    let jobs = args.jobs.min(count.max(1));
    // A panic inside a schedule is its failure, reported on its line, not the harness's end.
    std::panic::set_hook(Box::new(|info| {
        if std::env::var_os("FAULTS_PANIC_TRACE").is_some() {
            eprintln!("{info}");
        }
    }));
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                let mut redis: Option<redis_server::RedisServer> = None;
                loop {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    if k >= count {
                        break;
                    }
                    let seed = args.seeds.nth(k as u64);
                    let schedule = plan::plan(seed);
                    if args.env.verbose {
                        eprintln!("seed {seed}: {}", schedule.describe());
                    }
                    let t = Instant::now();
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        exec::run(&schedule, &args.env, &mut redis)
                    }));
                    let violations = match outcome {
                        Ok(v) => v,
                        Err(p) => {
                            redis = None;
                            let msg = p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "panic".into());
                            vec![format!("harness panic: {msg}")]
                        }
                    };
                    if std::env::var_os("FAULTS_TIMES").is_some() {
                        eprintln!("seed {seed}: {:.1}s", t.elapsed().as_secs_f64());
                    }
                    if violations.is_empty() {
                        passed.fetch_add(1, Ordering::SeqCst);
                        if args.env.verbose {
                            eprintln!("seed {seed}: passed in {:.1}s", t.elapsed().as_secs_f64());
                        }
                    } else {
                        failed.lock().unwrap().push(seed);
                        println!(
                            "FAILED seed {seed}: {} || violated: {}",
                            schedule.describe(),
                            violations.join(" ; ")
                        );
                    }
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap();
    let passed = passed.load(Ordering::SeqCst);
    if !failed.is_empty() {
        let mut seeds = failed.clone();
        seeds.sort_unstable();
        println!(
            "failing seeds: {}",
            seeds
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    eprintln!(
        "({} schedules from seed {} in {:.0}s, {} at once)",
        count,
        args.seeds.first(),
        started.elapsed().as_secs_f64(),
        jobs
    );
    println!("fault schedules: {passed} passed, {} failed", failed.len());
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
