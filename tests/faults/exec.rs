//! Runs one schedule: the fault runs (with the operators' commands drawn for them), then one
//! clean run per tick, then the checks.

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::check::{self, Delivery};
use crate::common::cpu::{self, OneCpu};
use crate::disk::Disk;
use crate::http_server::{fault_bucket, Answer, Reply, Req, RetryAfter, TestServer};
use crate::plan::{Act, Fault, ProviderKind, Schedule, StoreKind, Trigger};
use crate::redis_server::{Persist, RedisServer};

#[path = "control.rs"]
mod control;
use control::Silence;

/// What every schedule of one invocation shares.
pub struct Env {
    /// The Redis run lease the children are told (`FANOUT_LEASE`) and the harness waits past.
    pub lease: Duration,
    pub lease_text: String,
    /// `FANOUT_HTTP_TIMEOUT` of the children, in ms.
    pub http_timeout_ms: u64,
    /// How late an attempt of a paused or cancelled campaign may begin after the command
    /// returned (see [`Ctx::grace`]).
    pub grace: Duration,
    pub verbose: bool,
    /// Control runs: no faults, a provider that never fails (checks the naive reading
    /// against the binary on every workload).
    pub clean: bool,
    /// Every schedule on one CPU, whether or not it drew that (`--one-cpu`).
    pub one_cpu: bool,
}

/// How long any one process may run before it counts as hung.
const HANG: Duration = Duration::from_secs(90);

/// The HTTP receiver's dials.
struct Ctl {
    ok: AtomicUsize,
    /// Answer 401 to everything once `ok` reaches this.
    refuse_at: AtomicUsize,
    slow_left: AtomicI64,
}

fn key_of(r: &Req) -> Option<String> {
    r.header("idempotency-key").map(str::to_owned)
}

struct Http {
    server: TestServer,
    ctl: Arc<Ctl>,
}

impl Http {
    fn start(pct_5xx: u64, pct_429: u64, slow: u64, timeout_ms: u64) -> Http {
        let ctl = Arc::new(Ctl {
            ok: AtomicUsize::new(0),
            refuse_at: AtomicUsize::new(usize::MAX),
            slow_left: AtomicI64::new(slow as i64),
        });
        let c = ctl.clone();
        let server = TestServer::start(key_of, move |_req, key, attempt| {
            if c.ok.load(Ordering::SeqCst) >= c.refuse_at.load(Ordering::SeqCst) {
                return Reply::status(401, r#"{"error":"bad credentials"}"#);
            }
            if attempt <= 2 {
                let b = fault_bucket(&format!("{key}#{attempt}"), 100);
                if b < pct_5xx {
                    return Reply::status(503, "{}");
                }
                if b < pct_5xx + pct_429 {
                    return Reply::status(429, "{}").after(RetryAfter::Secs(1));
                }
                if attempt == 1
                    && fault_bucket(key, 16) == 0
                    && c.slow_left.fetch_sub(1, Ordering::SeqCst) > 0
                {
                    return Reply::Slow(Duration::from_millis(timeout_ms + 700));
                }
            }
            c.ok.fetch_add(1, Ordering::SeqCst);
            Reply::ok()
        });
        Http { server, ctl }
    }
}

/// One child process of a run.
struct Proc {
    child: Child,
    name: String,
    stopped: bool,
    status: Option<ExitStatus>,
}

impl Proc {
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn signal(&mut self, sig: &str) {
        Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .ok();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            if self.stopped {
                self.signal("-CONT");
            }
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// Counts the lines appended to a file since it was opened, reading only what is new.
struct Lines {
    path: PathBuf,
    offset: u64,
    count: usize,
}

impl Lines {
    fn new(path: PathBuf) -> Lines {
        Lines {
            path,
            offset: 0,
            count: 0,
        }
    }

    fn now(&mut self) -> usize {
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            if f.seek(SeekFrom::Start(self.offset)).is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf) {
                    self.offset += n as u64;
                    self.count += buf.iter().filter(|&&c| c == b'\n').count();
                }
            }
        }
        self.count
    }
}

fn code(st: ExitStatus) -> String {
    match st.code() {
        Some(c) => format!("exit {c}"),
        None => "killed".to_owned(),
    }
}

struct Ctx<'a> {
    s: &'a Schedule,
    env: &'a Env,
    /// The store's own filesystem, for a disk-full fault (declared before `dir`: unmounted
    /// before the directory is removed).
    disk: Option<Disk>,
    dir: tempfile::TempDir,
    redis: Option<&'a mut RedisServer>,
    http: Option<Http>,
    /// The CPU every fault run's processes run on, where the schedule drew that.
    one_cpu: Option<OneCpu>,
    /// The runs pinned to it.
    pinned: BTreeSet<usize>,
    run_no: usize,
    w_next: usize,
    expected_n: usize,
    violations: Vec<String>,
    /// Faults that interrupted a process, each allowing that process's in-flight messages
    /// (its `concurrency`) to be sent again.
    interruptions: Vec<String>,
    /// A Redis restart without persistence: re-sends of expected pairs are allowed.
    forgetful: bool,
    /// Each run's start and `--now`, by run number.
    runs: Vec<(Instant, String)>,
    /// Stretches in which a campaign must start no provider attempt (paused, cancelled).
    silences: Vec<Silence>,
    /// A paused campaign's silence and when to resume it in the next run (ms after its start).
    resume_next: Option<(usize, u64)>,
    /// Campaigns an operator cancelled.
    cancelled: BTreeSet<String>,
}

impl Ctx<'_> {
    fn note(&self, msg: impl AsRef<str>) {
        if self.env.verbose {
            eprintln!("  [seed {}] {}", self.s.seed, msg.as_ref());
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn next_w(&mut self) -> usize {
        let w = self.s.workers[self.w_next.min(self.s.workers.len() - 1)];
        self.w_next += 1;
        w
    }

    /// Deliveries so far, over every run (an estimate for placing the next fault).
    fn delivered_so_far(&self) -> usize {
        match &self.http {
            Some(h) => h.ctl.ok.load(Ordering::SeqCst),
            None => (0..self.run_no)
                .flat_map(|r| (0..self.s.processes).map(move |p| (r, p)))
                .map(|(r, p)| Lines::new(self.path(&format!("run{r}-p{p}.jsonl"))).now())
                .sum(),
        }
    }

    /// Starts one run (every process of it); returns its processes and the run number.
    fn start(
        &mut self,
        tick: &str,
        w: usize,
        clean: bool,
        summary: Option<&str>,
    ) -> (Vec<Proc>, usize) {
        let run = self.run_no;
        self.run_no += 1;
        self.runs.push((Instant::now(), tick.to_owned()));
        let n = self.s.processes;
        if n > 1 {
            let listeners: Vec<_> = (0..n)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
                .collect();
            let hosts: String = listeners
                .iter()
                .map(|l| format!("127.0.0.1:{}\n", l.local_addr().unwrap().port()))
                .collect();
            drop(listeners);
            std::fs::write(self.path(&format!("hosts-{run}.txt")), hosts).unwrap();
        }
        let mut procs = Vec::new();
        for i in (0..n).rev() {
            let mut args: Vec<String> = vec![
                "run".into(),
                "job.toml".into(),
                "--now".into(),
                tick.into(),
                "-w".into(),
                w.to_string(),
                "--quiet".into(),
            ];
            if let Some(r) = &self.redis {
                args.extend(["--store".into(), r.url(0)]);
            }
            match &self.http {
                Some(h) => args.extend(["--provider".into(), h.server.url("/push")]),
                None => args.extend(["--provider".into(), format!("log:run{run}-p{i}.jsonl")]),
            }
            if n > 1 {
                args.extend([
                    "--processes".into(),
                    n.to_string(),
                    "--process".into(),
                    i.to_string(),
                    "--hostfile".into(),
                    format!("hosts-{run}.txt"),
                    // A peer killed before the cluster connected is not waited for long.
                    "--peer-wait".into(),
                    "5s".into(),
                ]);
            }
            if clean {
                args.extend(["--rate-per-s".into(), "0".into()]);
            }
            if let (Some(sum), 0) = (summary, i) {
                args.extend(["--summary".into(), sum.into()]);
            }
            let err =
                std::fs::File::create(self.path(&format!("stderr-run{run}-p{i}.txt"))).unwrap();
            let mut command = self.fanout_command(run, clean);
            let child = command
                .args(&args)
                .current_dir(self.dir.path())
                .env_remove("RUST_LOG")
                .env("FANOUT_LEASE", &self.env.lease_text)
                .env(
                    "FANOUT_HTTP_TIMEOUT",
                    format!("{}ms", self.env.http_timeout_ms),
                )
                .env("FANOUT_HTTP_CONNECT_TIMEOUT", "2s")
                .stdout(Stdio::null())
                .stderr(err)
                .spawn()
                .expect("start fanout");
            self.note(format!("run {run} p{i}: fanout {}", args.join(" ")));
            procs.push(Proc {
                child,
                name: format!("run {run} p{i}"),
                stopped: false,
                status: None,
            });
        }
        procs.reverse();
        (procs, run)
    }

    /// The command that starts `fanout`: a fault run on the schedule's one CPU where it drew
    /// that (the busy loop there runs meanwhile); a clean run anywhere, the loop stopped.
    fn fanout_command(&mut self, run: usize, clean: bool) -> Command {
        let cpu = self.one_cpu.as_mut().and_then(|one| one.pin(!clean));
        if cpu.is_some() {
            self.pinned.insert(run);
        }
        cpu::fanout_on(cpu)
    }

    fn stderr_of(&self, run: usize, i: usize) -> String {
        std::fs::read_to_string(self.path(&format!("stderr-run{run}-p{i}.txt"))).unwrap_or_default()
    }

    fn addr_in_use(&self, run: usize) -> bool {
        (0..self.s.processes).any(|i| {
            let e = self.stderr_of(run, i).to_lowercase();
            e.contains("address already in use") || e.contains("addrinuse")
        })
    }

    /// Waits until the fault's moment while `victim` runs; false if it ended first.
    fn wait_trigger(&mut self, procs: &mut [Proc], run: usize, victim: usize, at: Trigger) -> bool {
        let started = Instant::now();
        let remaining = self
            .expected_n
            .saturating_sub(self.delivered_so_far())
            .max(1);
        let (mut lines, threshold, http_base) = match &self.http {
            Some(h) => (None, 0, h.ctl.ok.load(Ordering::SeqCst)),
            None => (
                Some(Lines::new(self.path(&format!("run{run}-p{victim}.jsonl")))),
                0,
                0,
            ),
        };
        let threshold = match at {
            Trigger::Lines(pm) => {
                let share = if lines.is_some() { self.s.processes } else { 1 };
                (remaining * pm as usize / 1000 / share).max(1)
            }
            Trigger::Delay(_) => threshold,
        };
        loop {
            if procs[victim].poll().is_some() {
                self.note(format!("{} ended before the fault", procs[victim].name));
                return false;
            }
            let fire = match at {
                Trigger::Delay(ms) => started.elapsed() >= Duration::from_millis(ms),
                Trigger::Lines(_) => {
                    let done = match (&mut lines, &self.http) {
                        (Some(l), _) => l.now(),
                        (None, Some(h)) => h.ctl.ok.load(Ordering::SeqCst) - http_base,
                        _ => 0,
                    };
                    done >= threshold
                }
            };
            if fire {
                self.note(format!(
                    "fault lands after {} ms (threshold {threshold} of ~{remaining} to do)",
                    started.elapsed().as_millis()
                ));
                return true;
            }
            if started.elapsed() > HANG {
                self.violations
                    .push(format!("{} hung before its fault", procs[victim].name));
                return false;
            }
            std::thread::sleep(Duration::from_millis(3));
        }
    }

    /// Waits for a process to exit (a hang is a violation and a kill).
    fn wait_exit(&mut self, p: &mut Proc) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(st) = p.poll() {
                return Some(st);
            }
            if started.elapsed() > HANG {
                self.violations
                    .push(format!("{} hung (killed after {HANG:?})", p.name));
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Checks a process's exit against what the fault allows; exit 1 (when allowed) counts
    /// as an interruption.
    fn judge(&mut self, run: usize, i: usize, st: Option<ExitStatus>, allowed: &[i32], why: &str) {
        let Some(st) = st else { return };
        let c = st.code();
        self.note(format!("run {run} p{i}: {}", code(st)));
        match c {
            Some(0) => {}
            Some(c) if allowed.contains(&c) => self
                .interruptions
                .push(format!("run {run} p{i} {why} exit {c}")),
            Some(1) if self.starved_past_lease(run, i) => self
                .interruptions
                .push(format!("run {run} p{i} on one CPU, past its lease: exit 1")),
            _ => {
                if c.is_none() {
                    // Ended by a signal we did not send (an abort): its in-flight may repeat.
                    self.interruptions
                        .push(format!("run {run} p{i} {why} {}", code(st)));
                }
                let err = self.stderr_of(run, i);
                let tail: String = err.lines().rev().take(2).collect::<Vec<_>>().join(" / ");
                self.violations.push(format!(
                    "run {run} p{i} ({why}): {} not allowed (allowed 0{}): {tail}",
                    code(st),
                    allowed.iter().map(|a| format!(",{a}")).collect::<String>()
                ));
            }
        }
    }

    /// Whether process `i` of run `run` ran on one CPU beside the busy loop and stopped for
    /// its Redis lease ([`cpu::STOPPED_FOR_ITS_LEASE`]).
    fn starved_past_lease(&self, run: usize, i: usize) -> bool {
        self.pinned.contains(&run) && self.stderr_of(run, i).contains(cpu::STOPPED_FOR_ITS_LEASE)
    }

    /// Fault run `k`, with the operator's command drawn for it; retried (as a new run) when a
    /// cluster's port was taken.
    fn fault_step(&mut self, k: usize, fault: Fault, tick: &str) {
        let w = self.next_w();
        let mut control = self.s.controls.iter().find(|c| c.step == k).cloned();
        for attempt in 0..3 {
            // An interrupted run writes its partial summary: it must account for every user.
            let summary = matches!(fault, Fault::Interrupt { .. })
                .then(|| format!("summary-run{}.json", self.run_no));
            let (mut procs, run) = self.start(tick, w, false, summary.as_deref());
            if let Some((silence, ms)) = self.resume_next.take() {
                // This run starts with the campaign paused: it waits for the resume.
                std::thread::sleep(Duration::from_millis(ms));
                self.resume(silence);
            }
            let left = match control.take() {
                Some(c) if c.act == Act::CancelBetween => {
                    let retry = self.fault_run(fault, tick, &mut procs, run);
                    self.cancel(&c.campaign, None);
                    retry
                }
                Some(c) => match self.control(&c, fault, &mut procs, run) {
                    Some(fault) => self.fault_run(fault, tick, &mut procs, run),
                    None => false,
                },
                None => self.fault_run(fault, tick, &mut procs, run),
            };
            if !(left && self.addr_in_use(run)) {
                return;
            }
            self.note(format!("run {run}: address in use, retrying ({attempt})"));
        }
    }

    /// kill -9 of process `victim` now (if it still runs); its peers may exit 1. Returns
    /// whether some process ended on its own with an error while the victim was gone already.
    fn kill(&mut self, procs: &mut [Proc], run: usize, victim: usize, delayed_rerun: bool) -> bool {
        let fired = procs[victim].poll().is_none();
        if fired {
            procs[victim].child.kill().ok();
            let st = procs[victim].child.wait().ok();
            procs[victim].status = st;
            if st.and_then(|s| s.code()).is_none() {
                self.interruptions
                    .push(format!("run {run} p{victim} kill -9"));
                self.note(format!("run {run} p{victim}: kill -9"));
            } else {
                self.judge(run, victim, st, &[], "ended at the kill");
            }
        }
        let mut early_error = false;
        for (i, p) in procs.iter_mut().enumerate() {
            if fired && i == victim {
                continue;
            }
            let st = self.wait_exit(p);
            early_error |= st.is_some_and(|s| !s.success());
            if !fired && self.s.processes > 1 && self.addr_in_use(run) {
                continue;
            }
            let allowed: &[i32] = if fired { &[1] } else { &[] };
            self.judge(run, i, st, allowed, "peer of a killed process");
        }
        if delayed_rerun {
            std::thread::sleep(self.env.lease + Duration::from_millis(300));
        }
        !fired && early_error
    }

    /// Returns true when the run ended on its own with an error before the fault (so the
    /// caller may retry a cluster whose port was taken).
    fn fault_run(&mut self, fault: Fault, tick: &str, procs: &mut [Proc], run: usize) -> bool {
        match fault {
            Fault::Kill {
                at,
                victim,
                delayed_rerun,
            } => {
                self.wait_trigger(procs, run, victim, at);
                self.kill(procs, run, victim, delayed_rerun)
            }
            Fault::Calm => self.wait_all(procs, run, false, "a calm run"),
            Fault::Stall { at } => {
                let fired = self.wait_trigger(procs, run, 0, at);
                let w2 = self.next_w();
                if fired {
                    procs[0].signal("-STOP");
                    procs[0].stopped = true;
                    self.note(format!("run {run}: SIGSTOP"));
                    std::thread::sleep(self.env.lease + Duration::from_millis(500));
                    let (mut second, run2) = self.start(tick, w2, false, None);
                    let st = self.wait_exit(&mut second[0]);
                    self.judge(run2, 0, st, &[], "takes over a stalled run");
                    procs[0].signal("-CONT");
                    procs[0].stopped = false;
                    self.note(format!("run {run}: SIGCONT"));
                    let st = self.wait_exit(&mut procs[0]);
                    self.judge(run, 0, st, &[1], "stalled past its lease");
                    // Stopped while pushing: what it had in flight may go out again.
                    if st.is_some_and(|s| s.success()) {
                        self.interruptions
                            .push(format!("run {run} p0 stalled past its lease"));
                    }
                } else {
                    let st = self.wait_exit(&mut procs[0]);
                    self.judge(run, 0, st, &[], "ended before its stall");
                }
                false
            }
            Fault::RedisRestart { at, down_ms } => {
                self.under_redis(procs, run, at, "through a redis restart", |cx, r| {
                    cx.note(format!("redis restart, down {down_ms} ms"));
                    r.restart_after(Duration::from_millis(down_ms));
                    if cx.s.redis == Persist::No {
                        cx.forgetful = true;
                    }
                })
            }
            Fault::RedisStall { at, stall_ms } => {
                self.under_redis(procs, run, at, "through a redis stall", |cx, r| {
                    cx.note(format!("redis stopped for {stall_ms} ms"));
                    r.stall_for(Duration::from_millis(stall_ms));
                })
            }
            Fault::DiskFull { at } => self.disk_full(at, procs, run),
            Fault::Interrupt { at, again_ms } => self.interrupt(procs, run, at, again_ms),
            Fault::RedisDiskFull { at, full_ms } => {
                self.under_redis(procs, run, at, "through a full redis disk", |cx, r| {
                    cx.note(format!("redis's disk full for {full_ms} ms"));
                    match r.fill_disk_for(Duration::from_millis(full_ms)) {
                        Ok(what) => cx.note(what.to_string()),
                        Err(e) => cx.violations.push(format!("redis disk: {e}")),
                    }
                })
            }
            Fault::CredStop { at } => {
                let fired = self.wait_trigger(procs, run, 0, at);
                if fired {
                    if let Some(h) = &self.http {
                        h.ctl.refuse_at.store(0, Ordering::SeqCst);
                    }
                    self.note("provider answers 401 from now on");
                }
                let st = self.wait_exit(&mut procs[0]);
                let allowed: &[i32] = if fired { &[1] } else { &[] };
                self.judge(run, 0, st, allowed, "provider refused credentials");
                if let Some(h) = &self.http {
                    h.ctl.refuse_at.store(usize::MAX, Ordering::SeqCst);
                }
                false
            }
        }
    }

    /// SIGINT to every process of the run at `at` (and again `again_ms` later); returns
    /// whether the run ended with an error before the fault. One SIGINT drains: exit 130
    /// allows no message to go out twice. A second exits without the drain, as a crash; a
    /// SIGINT before a process listens for it ends it as a kill would.
    fn interrupt(
        &mut self,
        procs: &mut [Proc],
        run: usize,
        at: Trigger,
        again_ms: Option<u64>,
    ) -> bool {
        let fired = self.wait_trigger(procs, run, 0, at);
        if fired {
            let signal_all = |procs: &mut [Proc]| {
                for p in procs.iter_mut().filter(|p| p.status.is_none()) {
                    p.signal("-INT");
                }
            };
            signal_all(procs);
            self.note(format!("run {run}: SIGINT"));
            if let Some(ms) = again_ms {
                std::thread::sleep(Duration::from_millis(ms));
                signal_all(procs);
                self.note(format!("run {run}: SIGINT again"));
            }
        }
        let sts: Vec<_> = procs.iter_mut().map(|p| self.wait_exit(p)).collect();
        // A process the SIGINT reached before it listened died as a killed one does: its
        // cluster peers then stop with exit 1, as after a kill.
        let peer_died = sts.iter().any(|s| s.is_some_and(|s| s.signal() == Some(2)));
        let mut early_error = false;
        for (i, st) in sts.into_iter().enumerate() {
            early_error |= !fired && st.is_some_and(|s| !s.success());
            match st.map(|s| (s.code(), s.signal())) {
                Some((Some(130), _)) if fired && again_ms.is_none() => {
                    self.note(format!("run {run} p{i}: exit 130, drained"));
                    if i == 0 {
                        // The partial summary (process 0 writes a cluster's).
                        let path = self.path(&format!("summary-run{run}.json"));
                        check::summary(&path, &mut self.violations);
                    }
                }
                Some((None, Some(2))) if fired => {
                    self.note(format!("run {run} p{i}: ended by SIGINT"));
                    self.interruptions
                        .push(format!("run {run} p{i} SIGINT before it listened"));
                }
                _ => {
                    let allowed: &[i32] = match (fired, peer_died) {
                        (true, true) => &[130, 1],
                        (true, false) => &[130],
                        (false, _) => &[],
                    };
                    self.judge(run, i, st, allowed, "interrupted by the operator");
                }
            }
        }
        early_error
    }

    /// The store's filesystem full from `at` on, until every process of the run has ended
    /// (each may exit 1 then); then it has room again. Returns whether the run ended with an
    /// error before the fault.
    fn disk_full(&mut self, at: Trigger, procs: &mut [Proc], run: usize) -> bool {
        let fired = self.wait_trigger(procs, run, 0, at);
        if fired {
            if let Some(Err(e)) = self.disk.as_ref().map(Disk::fill) {
                self.violations
                    .push(format!("run {run}: cannot fill the disk: {e}"));
            }
            self.note("the store's disk is full from now on");
        }
        let early_error = self.wait_all(procs, run, fired, "on a full disk");
        if let Some(Err(e)) = self.disk.as_ref().map(Disk::grow) {
            self.violations
                .push(format!("run {run}: cannot grow the disk: {e}"));
        }
        early_error
    }

    /// A fault on the Redis server under the run: at `at`, `fault` acts on the server; then
    /// every process ends, with exit 1 allowed if it fired ([`Self::wait_all`]).
    fn under_redis(
        &mut self,
        procs: &mut [Proc],
        run: usize,
        at: Trigger,
        why: &str,
        fault: impl FnOnce(&mut Self, &mut RedisServer),
    ) -> bool {
        let fired = self.wait_trigger(procs, run, 0, at);
        if fired {
            // Out of `self` while the fault holds it, so the fault may note and flag.
            let mut redis = self.redis.take();
            if let Some(r) = redis.as_deref_mut() {
                fault(self, r);
            }
            self.redis = redis;
        }
        self.wait_all(procs, run, fired, why)
    }

    /// Waits for every process of the run and judges its exit: 1 allowed once the fault
    /// `fired`, else only 0 (a cluster whose port was taken is not judged: it is retried).
    /// Returns whether the run ended with an error before the fault.
    fn wait_all(&mut self, procs: &mut [Proc], run: usize, fired: bool, why: &str) -> bool {
        let mut early_error = false;
        for (i, p) in procs.iter_mut().enumerate() {
            let st = self.wait_exit(p);
            early_error |= st.is_some_and(|s| !s.success());
            if !fired && self.s.processes > 1 && self.addr_in_use(run) {
                continue;
            }
            let allowed: &[i32] = if fired { &[1] } else { &[] };
            self.judge(run, i, st, allowed, why);
        }
        !fired && early_error
    }

    /// One clean run at `tick`: every process must exit 0.
    fn clean_step(&mut self, tick: &str, summary: &str) {
        let w = self.next_w();
        for attempt in 0..3 {
            let (mut procs, run) = self.start(tick, w, true, Some(summary));
            let mut sts = Vec::new();
            for p in procs.iter_mut() {
                sts.push(self.wait_exit(p));
            }
            if self.s.processes > 1
                && sts.iter().any(|s| s.is_some_and(|s| !s.success()))
                && self.addr_in_use(run)
            {
                self.note(format!("run {run}: address in use, retrying ({attempt})"));
                continue;
            }
            for (i, st) in sts.into_iter().enumerate() {
                self.judge(run, i, st, &[], "final clean run");
            }
            return;
        }
    }

    /// Every delivery over every run: lines of the `log:` files (a torn last line is not a
    /// delivery) or requests the HTTP receiver answered 2xx.
    fn deliveries(&mut self) -> Vec<Delivery> {
        let mut out = Vec::new();
        match &self.http {
            Some(h) => {
                let hits = h.server.hits();
                let mut bodies: std::collections::HashMap<String, Vec<u8>> = Default::default();
                for hit in hits {
                    let body = hit.req.body.to_vec();
                    if let Some(prev) = bodies.get(&hit.key) {
                        if *prev != body {
                            self.violations.push(format!(
                                "key {} sent with two different bodies: {} / {}",
                                hit.key,
                                String::from_utf8_lossy(prev),
                                String::from_utf8_lossy(&body)
                            ));
                        }
                    } else {
                        bodies.insert(hit.key.clone(), body.clone());
                    }
                    if matches!(hit.answer, Answer::Status(200..=299)) {
                        match check::parse(&body) {
                            Some(mut d) => {
                                if d.key != hit.key {
                                    self.violations.push(format!(
                                        "Idempotency-Key {} on a body whose key is {}",
                                        hit.key, d.key
                                    ));
                                }
                                d.source = "http".into();
                                // Runs follow one another (a stalled one resumes at the
                                // tick of the run that took over): the latest run started.
                                let started = self.runs.iter().filter(|r| r.0 <= hit.at);
                                d.run = started.count().saturating_sub(1);
                                out.push(d);
                            }
                            None => self.violations.push(format!(
                                "2xx request body is not a delivery record: {}",
                                String::from_utf8_lossy(&body)
                            )),
                        }
                    }
                }
            }
            None => {
                for run in 0..self.run_no {
                    for p in 0..self.s.processes {
                        let name = format!("run{run}-p{p}.jsonl");
                        let text = std::fs::read(self.path(&name)).unwrap_or_default();
                        let lines: Vec<&[u8]> = text.split(|&c| c == b'\n').collect();
                        let last = lines.len().saturating_sub(1);
                        for (n, l) in lines.iter().enumerate() {
                            if l.is_empty() {
                                continue;
                            }
                            match check::parse(l) {
                                Some(mut d) => {
                                    d.source = name.clone();
                                    d.run = run;
                                    out.push(d);
                                }
                                // A torn final line (killed mid-write) is not a delivery.
                                None if n + 1 >= last => {
                                    self.note(format!("{name}: torn last line"))
                                }
                                None => self.violations.push(format!(
                                    "{name}:{}: not a delivery record: {}",
                                    n + 1,
                                    String::from_utf8_lossy(l)
                                )),
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// Runs schedule `s`; returns what it violated (empty: passed).
pub fn run(s: &Schedule, env: &Env, shared_redis: &mut Option<RedisServer>) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    w("job.toml", &s.job);
    w("users.jsonl", &s.users_text);
    if let Some(t) = &s.logins_text {
        w("logins.jsonl", t);
    }
    if let Some(t) = &s.granted_text {
        w("granted.jsonl", t);
    }
    let has = |pick: fn(&Fault) -> bool| !env.clean && s.faults.iter().any(pick);
    let restarts = has(|f| matches!(f, Fault::RedisRestart { .. }));
    let redis_full = has(|f| matches!(f, Fault::RedisDiskFull { .. }));
    let mut own;
    let redis: Option<&mut RedisServer> = match s.store {
        StoreKind::File => None,
        StoreKind::Redis if redis_full => match RedisServer::start_on_tmpfs(s.redis) {
            Ok(r) => {
                own = r;
                Some(&mut own)
            }
            Err(e) => return vec![e],
        },
        StoreKind::Redis if restarts => {
            own = RedisServer::start_persisting(s.redis);
            Some(&mut own)
        }
        StoreKind::Redis => {
            if !shared_redis.as_ref().is_some_and(RedisServer::alive) {
                *shared_redis = Some(RedisServer::start_persisting(Persist::No));
            }
            let r = shared_redis.as_mut().unwrap();
            r.cli(&["FLUSHALL"]);
            Some(r)
        }
    };
    let http = match s.provider {
        ProviderKind::Log => None,
        ProviderKind::Http {
            pct_5xx,
            pct_429,
            slow,
        } if !env.clean => Some(Http::start(pct_5xx, pct_429, slow, env.http_timeout_ms)),
        ProviderKind::Http { .. } => Some(Http::start(0, 0, 0, env.http_timeout_ms)),
    };
    let disk = match has(|f| matches!(f, Fault::DiskFull { .. })) {
        true => match Disk::mount(&dir.path().join("store")) {
            Ok(disk) => Some(disk),
            Err(e) => return vec![e],
        },
        false => None,
    };
    let reading = s.reading();
    let expected = &reading.expected;
    let mut cx = Ctx {
        s,
        env,
        disk,
        dir,
        redis,
        http,
        run_no: 0,
        one_cpu: ((s.one_cpu || env.one_cpu) && !env.clean).then(|| OneCpu::new(s.seed)),
        pinned: BTreeSet::new(),
        w_next: 0,
        expected_n: expected.len() / s.ticks.len(),
        violations: Vec::new(),
        interruptions: Vec::new(),
        forgetful: false,
        runs: Vec::new(),
        silences: Vec::new(),
        resume_next: None,
        cancelled: BTreeSet::new(),
    };
    cx.note(format!("{} expected deliveries", expected.len()));
    // The faults walk through the ticks in order; the final phase runs every tick cleanly.
    let nf = s.faults.len().max(1);
    let faults: &[Fault] = if env.clean { &[] } else { &s.faults };
    for (k, &fault) in faults.iter().enumerate() {
        // Under caps `--now` never goes back (the final phase starts at the first tick).
        let tick = match s.capped {
            true => &s.ticks[0],
            false => &s.ticks[k * s.ticks.len() / nf],
        };
        cx.note(format!("fault {k}: {fault} at --now {tick}"));
        cx.fault_step(k, fault, tick);
    }
    if let Some((silence, _)) = cx.resume_next.take() {
        // The plan resumes before the clean runs; a paused campaign would hold them for ever.
        cx.resume(silence);
    }
    let clean_from = cx.run_no;
    for (k, tick) in s.ticks.iter().enumerate() {
        let summary = format!("summary-{k}.json");
        cx.note(format!("clean run at --now {tick}"));
        cx.clean_step(tick, &summary);
        check::summary(&cx.path(&summary), &mut cx.violations);
        check::summary_cancelled(&cx.path(&summary), &cx.cancelled, &mut cx.violations);
    }
    let deliveries = cx.deliveries();
    let bound = s.concurrency * cx.interruptions.len() as u64;
    // Caps beside an operator's commands: who is offered first, so who is capped, depends on
    // when the commands land; the naive reading says who is eligible, the store accounts for
    // each of them (below), and the caps are checked on what was sent.
    let loose = s.capped && !s.controls.is_empty();
    let stats = check::deliveries(
        &deliveries,
        if loose { &reading.eligible } else { expected },
        &cx.cancelled,
        loose,
        (!cx.forgetful).then_some(bound),
        &cx.interruptions,
        &mut cx.violations,
    );
    cx.note(stats);
    cx.check_control(&deliveries, &reading.eligible, bound, clean_from);
    // Every user's outcome is accounted for — unless a Redis restart forgot some of it.
    if !cx.forgetful {
        let unsent = (!loose).then_some(&reading.unsent);
        cx.check_settled(&deliveries, &reading.eligible, unsent, bound);
    }
    if s.capped {
        let (caps, capped) = s.caps();
        let ticks: Vec<String> = cx.runs.iter().map(|r| r.1.clone()).collect();
        check::caps(&deliveries, &ticks, &caps, &capped, &mut cx.violations);
        cx.check_capped(&deliveries, &ticks);
    }
    keep_dir_if(&cx);
    cx.violations
}

/// With `FAULTS_KEEP=1`, a failing schedule's directory is kept and named.
fn keep_dir_if(cx: &Ctx) {
    if !cx.violations.is_empty() && std::env::var_os("FAULTS_KEEP").is_some() {
        let kept: &Path = cx.dir.path();
        let to = std::env::temp_dir().join(format!("fanout-faults-seed-{}", cx.s.seed));
        let _ = std::fs::remove_dir_all(&to);
        if copy_dir(kept, &to).is_ok() {
            eprintln!("  [seed {}] files kept in {}", cx.s.seed, to.display());
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), dest)?;
        }
    }
    Ok(())
}
