//! Seeded fault schedules against `fanout serve`, the long-running mode (the fault harness,
//! `tests/faults.rs`, drives `fanout run`). Each seed draws a workload — users, fan-out
//! promotions and a push coupon, lazy coupons granted at login, sometimes a promotion
//! submitted on the campaigns stream mid-way; the file or the Redis store; 1 or 2 workers;
//! the provider's concurrency, rate and batch size — and one to three faults, each after a
//! delay or once the process has written some deliveries: a kill -9; (a sixth) a Redis
//! restart with its data under the running process, which must then stop on SIGTERM with 0
//! or 1; (a sixth) the Redis server's disk full for 0.1–1.5 s — it exits and is started again,
//! or, fsyncing once a second, refuses writes meanwhile — then the same; (a sixth) the Redis
//! server stopped (SIGSTOP) for 0.1–3 s, then resumed, then the same; or (a sixth, Redis
//! store only) SIGSTOP past the run lease while the next process takes over, then SIGCONT:
//! the stalled one must exit 1 on its own within 3 s; or (a sixth, file store only) the
//! store's disk full under the running process, which must exit 1, or 0 or 1 on SIGTERM a
//! second later if it wrote nothing more; the disk then has room again. Each disk is a tmpfs
//! the harness mounts, so it runs as root. In a quarter of the schedules the processes that
//! take a fault run on one CPU beside a busy loop (`common::cpu`); a Redis one descheduled
//! past its lease may stop with 1 there, as it must. Logins are XADDed in
//! waves: before the first start, while each process runs and after it ended. After the last fault a process runs until everything the naive reading
//! expects is out and every stream entry is acknowledged, then stops on SIGTERM (it must exit
//! 0). Deliveries over all processes are then checked against the naive reading of the
//! inputs: nothing lost, nothing unexpected, a repeated key carries the identical record,
//! duplicates within what the faults left in flight (concurrency per fault); and for each
//! campaign without a holdout, the store's grants (`fanout grants`) are exactly the users the
//! naive reading expects.
//!
//! ```text
//! cargo test --release --test serve_faults                          # the CI set: seeds 1..=16
//! cargo test --release --test serve_faults -- --schedules 200 --from 1000   # a soak
//! cargo test --release --test serve_faults -- --seed 17             # one schedule, verbosely
//! ```
//! `--jobs N` runs N schedules at once (default 2); `--one-cpu` puts every schedule's faulted
//! processes on one CPU; `--seeds 3,17,42` runs exactly those; `--list` prints the schedules
//! without running them.

mod common;
mod naive;
mod redis_server;
mod serving;

#[allow(dead_code)]
#[path = "faults/check.rs"]
mod check;
#[path = "faults/disk.rs"]
mod disk;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use common::cpu::{self, OneCpu};
use common::{naive_users_jsonl, Lcg, Scratch, Seeds, TUser};
use naive::{expected, NLogin};
use redis_server::{Persist, RedisServer};
use serving::{pending, sigterm, start_serve_on, KillOnDrop};

const TAGS: [&str; 4] = ["sports", "mom", "tech", "gamer"];
/// How long the last process may take to send what is expected.
const SETTLE: Duration = Duration::from_secs(90);
/// How long a kill waits for its number of deliveries (a process may have less to do).
const LINES_WAIT: Duration = Duration::from_secs(3);

/// When a fault lands in the process it interrupts.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// This many milliseconds after it answered /healthz.
    Delay(u64),
    /// Once its log holds this many deliveries (or after [`LINES_WAIT`]).
    Lines(usize),
}

/// What ends a process that is not the last.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// kill -9 at the trigger.
    Kill(Trigger),
    /// At the trigger the Redis server (the streams, and the store where it is Redis) is
    /// killed and restarted this many ms later with its data; the process runs on for
    /// [`RUN_ON_MS`], then SIGTERM: it must exit 0 (recovered), or 1 (stopped on a store
    /// error), and never anything else.
    RedisRestart(Trigger, u64),
    /// SIGSTOP at the trigger (Redis store only), held past the run lease while the next
    /// process starts and takes over; SIGCONT once that one has run for a while: the
    /// stalled process, its lease gone, must end with 0 or 1 ([`Cx::resume`]).
    Stall(Trigger),
    /// At the trigger the file store's disk (a tmpfs of its own) is full: the process must
    /// stop with 1 on its next write that needs a page, or — having written none in
    /// [`RUN_ON_MS`] — stop on SIGTERM with 0 or 1. Then the disk has room again.
    DiskFull(Trigger),
    /// At the trigger the Redis server's disk (a tmpfs of its own) is full for this many ms:
    /// persisting at every write (where the schedule also restarts it) the server exits at its
    /// next write and is started again once there is room; once a second, it refuses writes
    /// (`MISCONF`) meanwhile. Then as [`Fault::RedisRestart`]: 0 or 1 on SIGTERM.
    RedisDiskFull(Trigger, u64),
    /// At the trigger the Redis server is stopped (SIGSTOP) for this many ms, then resumed:
    /// it keeps its connections and answers nothing meanwhile. Then as
    /// [`Fault::RedisRestart`]: 0 or 1 on SIGTERM (1: a Redis store's lease lapsed).
    RedisStall(Trigger, u64),
}

/// How long a process runs on after a Redis restart before it is stopped, and how long the
/// successor of a stalled process runs before the stalled one is resumed.
const RUN_ON_MS: u64 = 1000;
/// The Redis run lease the processes take (`FANOUT_LEASE`, set in `main`).
const LEASE: Duration = Duration::from_secs(1);
/// How long a resumed stalled process is given to notice its lease is gone and exit.
const STALL_EXIT: Duration = Duration::from_secs(3);
/// Stalled processes resumed.
static RESUMED: AtomicUsize = AtomicUsize::new(0);

/// Sends `sig` (`-STOP`, `-CONT`) to the process.
fn signal(child: &KillOnDrop, sig: &str) {
    let pid = child.0.id().to_string();
    std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .ok();
}

/// One schedule: its inputs and its faults.
struct Schedule {
    seed: u64,
    redis_store: bool,
    workers: u64,
    concurrency: u64,
    job: String,
    users_text: String,
    users: BTreeMap<u64, TUser>,
    /// Logins XADDed: `[0]` before the first start, `[1 + 2k]` while process k runs,
    /// `[2 + 2k]` after it ended.
    waves: Vec<Vec<NLogin>>,
    /// A promotion submitted on the campaigns stream while process `.0` runs.
    submitted: Option<(usize, String)>,
    faults: Vec<Fault>,
    /// The processes that take a fault run on one CPU beside a busy loop (`common::cpu`);
    /// the last one runs anywhere.
    one_cpu: bool,
}

impl Schedule {
    fn describe(&self) -> String {
        format!(
            "{} store, -w {}, concurrency {}, {} users, {} login waves, submitted {:?}, faults {:?}{}",
            if self.redis_store { "redis" } else { "file" },
            self.workers,
            self.concurrency,
            self.users.len(),
            self.waves.len(),
            self.submitted.as_ref().map(|s| s.0),
            self.faults,
            if self.one_cpu { ", one cpu" } else { "" }
        )
    }

    /// Every campaign the processes learn of: the job's and the submitted one.
    fn all_campaigns(&self) -> String {
        let mut job = self.job.clone();
        if let Some((_, c)) = &self.submitted {
            job.push_str(c);
        }
        job
    }

    fn logins(&self) -> Vec<NLogin> {
        self.waves.concat()
    }
}

fn audience(r: &mut Lcg) -> String {
    let mut a = String::from("[campaign.audience]\n");
    if r.below(2) == 0 {
        let _ = writeln!(a, "min_level = {}", 1 + r.below(5));
    }
    let _ = writeln!(
        a,
        "tags_any = [\"{}\", \"{}\"]",
        TAGS[r.below(4) as usize],
        TAGS[r.below(4) as usize]
    );
    a
}

/// A campaign; fan-outs are live for years around now (serve's clock is the system's), lazy
/// coupons from 2026-03-01 to 03-04 (the logins' times decide). The title names the id, so no
/// two have the same content (a title equal to the id hashes as the default, and the
/// repeated-campaign guard would refuse a submitted twin).
fn campaign(r: &mut Lcg, id: &str, kind: &str, lazy: bool, persona: bool) -> String {
    let (start, end) = match lazy {
        true => ("2026-03-01T00:00:00Z", "2026-03-04T00:00:00Z"),
        false => ("2020-01-01T00:00:00Z", "2100-01-01T00:00:00Z"),
    };
    let mut c = format!(
        "[[campaign]]\nid = \"{id}\"\nkind = \"{kind}\"\nstart = \"{start}\"\nend = \"{end}\"\n\
         title = \"Title {id}\"\nbody = \"Hi {{user.id}} L{{user.level}} {{campaign.id}}\"\n"
    );
    if r.below(10) < 3 {
        let _ = writeln!(c, "holdout = 0.25");
    }
    if persona {
        c.push_str(&audience(r));
    }
    if kind == "coupon" {
        let delivery = if lazy { "on_login" } else { "push" };
        let _ = write!(
            c,
            "[campaign.coupon]\ncoupon_id = \"C-{id}\"\namount = {}\ndelivery = \"{delivery}\"\n",
            1 + r.below(50)
        );
    }
    c.push('\n');
    c
}

/// Whether a schedule's faulted processes run on one CPU: a quarter of them, drawn from a
/// sequence of their own (a schedule is otherwise the one its seed drew before).
fn one_cpu(seed: u64) -> bool {
    let mut r = Lcg(seed ^ 0x0C90_0C90);
    r.next();
    r.below(4) == 0
}

fn plan(seed: u64) -> Schedule {
    let mut r = Lcg(seed ^ 0x5EED_F00D_CAFE);
    r.next();
    let n = 100 + r.below(700);
    let mut users_text = String::new();
    for _ in 0..n {
        let id = 1 + r.below(n * 3);
        let tags: Vec<String> = TAGS
            .iter()
            .filter(|_| r.below(3) == 0)
            .map(|t| format!("\"{t}\""))
            .collect();
        let _ = writeln!(
            users_text,
            "{{\"id\": {id}, \"level\": {}, \"points\": {}, \"tags\": [{}], \"token\": \"t-{id}\"}}",
            r.below(10),
            r.below(50_000),
            tags.join(",")
        );
    }
    let users = naive_users_jsonl(&users_text);
    let concurrency = [2, 8, 32, 100][r.below(4) as usize];
    let mut job = format!(
        "[inputs]\nusers = \"users.jsonl\"\n\n[engine]\nbucket_size = {}\nbatch_max_messages = {}\n\n\
         [provider]\nurl = \"log:unused.jsonl\"\nconcurrency = {concurrency}\nrate_per_s = {}\n\n",
        [16, 64, 256][r.below(3) as usize],
        [1, 5, 20][r.below(3) as usize],
        [400, 1000, 3000][r.below(3) as usize],
    );
    if r.below(10) < 7 {
        job.push_str(&campaign(&mut r, "promo-all", "promotion", false, false));
    }
    if r.below(2) == 0 {
        job.push_str(&campaign(&mut r, "promo-persona", "promotion", false, true));
    }
    if r.below(10) < 4 {
        job.push_str(&campaign(&mut r, "seg-coupon", "coupon", false, true));
    }
    for k in 0..1 + r.below(2) {
        let persona = r.below(2) == 0;
        job.push_str(&campaign(
            &mut r,
            &format!("lazy-{k}"),
            "coupon",
            true,
            persona,
        ));
    }
    let redis_store = r.below(2) == 0;
    let faults: Vec<Fault> = (0..1 + r.below(3))
        .map(|_| {
            let at = match r.below(2) {
                0 => Trigger::Delay(r.below(1500)),
                _ => Trigger::Lines(1 + r.below(n) as usize),
            };
            match r.below(6) {
                0 => Fault::RedisRestart(at, r.below(1000)),
                3 => Fault::RedisStall(at, 100 + r.below(2900)),
                1 if redis_store => Fault::Stall(at),
                1 => Fault::DiskFull(at),
                2 => Fault::RedisDiskFull(at, 100 + r.below(1400)),
                _ => Fault::Kill(at),
            }
        })
        .collect();
    let submitted = (r.below(2) == 0).then(|| {
        let at = r.below(faults.len() as u64 + 1) as usize;
        (at, campaign(&mut r, "submitted", "promotion", false, true))
    });
    // Logins: mostly known users, a few unknown ids; each Feb 27 … Mar 6 (some outside every
    // lazy coupon's window), spread over the waves.
    let ids: Vec<u64> = users.keys().copied().collect();
    let mut waves = vec![Vec::new(); 2 + 2 * faults.len()];
    let feb27 = Utc.with_ymd_and_hms(2026, 2, 27, 0, 0, 0).unwrap();
    for _ in 0..n / 2 + r.below(2 * n) {
        let user = match r.below(20) {
            0 => n * 3 + 1 + r.below(100),
            _ => ids[r.below(ids.len() as u64) as usize],
        };
        let ts = feb27 + chrono::Duration::hours(r.below(8 * 24) as i64);
        let wave = r.below(waves.len() as u64) as usize;
        waves[wave].push((user, ts));
    }
    Schedule {
        seed,
        redis_store,
        workers: 1 + r.below(2),
        concurrency,
        job,
        users_text,
        users,
        waves,
        submitted,
        faults,
        one_cpu: one_cpu(seed),
    }
}

fn xadd_logins(redis: &RedisServer, wave: &[NLogin]) {
    let mut commands = String::new();
    for (user, ts) in wave {
        let ts = ts.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let _ = writeln!(commands, "XADD fanout:logins * user {user} ts {ts}");
    }
    redis.pipe(&commands);
}

/// Every delivery in the processes' logs; a torn last line (killed mid-write) is skipped.
fn deliveries(dir: &Scratch, runs: usize, violations: &mut Vec<String>) -> Vec<check::Delivery> {
    let mut out = Vec::new();
    for run in 0..runs {
        let name = format!("run{run}.jsonl");
        let text = std::fs::read(dir.path(&name)).unwrap_or_default();
        let lines: Vec<&[u8]> = text.split(|&c| c == b'\n').collect();
        let last = lines.len().saturating_sub(1);
        for (n, l) in lines.iter().enumerate().filter(|(_, l)| !l.is_empty()) {
            match check::parse(l) {
                Some(mut d) => {
                    d.source = name.clone();
                    d.run = run;
                    out.push(d);
                }
                None if n + 1 >= last => {}
                None => violations.push(format!("{name}:{}: not a delivery record", n + 1)),
            }
        }
    }
    out
}

fn lines_in(dir: &Scratch, name: &str) -> usize {
    std::fs::read(dir.path(name))
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

/// What one schedule's processes share.
struct Cx<'a> {
    s: &'a Schedule,
    redis: RedisServer,
    /// The file store's own filesystem, for a disk-full fault (unmounted before `dir` goes).
    disk: Option<disk::Disk>,
    dir: Scratch,
    store: String,
    want: BTreeSet<check::Pair>,
    violations: Vec<String>,
    interruptions: Vec<String>,
    /// The CPU the faulted processes run on, where the schedule drew that.
    one_cpu: Option<OneCpu>,
}

/// Runs schedule `s`; returns what it violated (empty: passed).
fn execute(s: &Schedule, verbose: bool) -> Vec<String> {
    let has = |pick: fn(&Fault) -> bool| s.faults.iter().any(pick);
    let redis = match has(|f| matches!(f, Fault::RedisDiskFull(..))) {
        // Killed by a restart, a server fsyncing once a second may lose what it acknowledged.
        true => match has(|f| matches!(f, Fault::RedisRestart(..))) {
            true => RedisServer::start_on_tmpfs(Persist::Always),
            false => RedisServer::start_on_tmpfs(Persist::EverySec),
        },
        false => Ok(RedisServer::start()),
    };
    let redis = match redis {
        Ok(redis) => redis,
        Err(e) => return vec![e],
    };
    let dir = Scratch::new();
    dir.write("users.jsonl", &s.users_text);
    dir.write("job.toml", &s.job);
    let store = match s.redis_store {
        true => redis.url(1),
        false => "file:store".to_owned(),
    };
    let disk = match has(|f| matches!(f, Fault::DiskFull(_))) {
        true => match disk::Disk::mount(&dir.path("store")) {
            Ok(disk) => Some(disk),
            Err(e) => return vec![e],
        },
        false => None,
    };
    let logins = s.logins();
    let now = Some(Utc::now());
    let want = expected(&s.all_campaigns(), &s.users, &logins, &BTreeSet::new(), now);
    let mut cx = Cx {
        s,
        redis,
        disk,
        dir,
        store,
        want,
        violations: Vec::new(),
        interruptions: Vec::new(),
        one_cpu: s.one_cpu.then(|| OneCpu::new(s.seed)),
    };
    xadd_logins(&cx.redis, &s.waves[0]);
    // A process stalled by the fault before, resumed once the next one runs.
    let mut stalled: Option<KillOnDrop> = None;
    for k in 0..=s.faults.len() {
        let mut child = cx.start(k);
        if let Some(old) = stalled.take() {
            cx.resume(k - 1, old);
        }
        match s.faults.get(k) {
            Some(&fault) => {
                cx.fault(k, fault, &mut child);
                if let Fault::Stall(_) = fault {
                    stalled = Some(child);
                }
                xadd_logins(&cx.redis, &s.waves[2 + 2 * k]);
            }
            None => cx.last(k, &mut child, verbose),
        }
    }
    let got = deliveries(&cx.dir, s.faults.len() + 1, &mut cx.violations);
    let bound = s.concurrency * cx.interruptions.len() as u64;
    let account = check::deliveries(
        &got,
        &cx.want,
        &BTreeSet::new(),
        false,
        Some(bound),
        &cx.interruptions,
        &mut cx.violations,
    );
    grants_match(s, &cx.dir, &cx.store, &cx.want, &mut cx.violations);
    if verbose {
        eprintln!("seed {}: {account}", s.seed);
    }
    cx.violations
}

impl Cx<'_> {
    /// Starts process `k` (it logs to `run{k}.jsonl`), then adds its wave of logins and,
    /// where drawn, the submitted campaign.
    fn start(&mut self, k: usize) -> KillOnDrop {
        let streams = self.redis.url(0);
        let provider = format!("log:run{k}.jsonl");
        let workers = self.s.workers.to_string();
        let args = [
            "serve",
            "job.toml",
            "--campaigns",
            &streams,
            "--logins",
            &streams,
            "--store",
            &self.store,
            "--provider",
            &provider,
            "-w",
            &workers,
            "--quiet",
        ];
        let faulted = k < self.s.faults.len();
        let cpu = self.one_cpu.as_mut().and_then(|one| one.pin(faulted));
        let (child, _port, _reserved) = start_serve_on(&self.dir, &args, cpu);
        let child = KillOnDrop(child);
        xadd_logins(&self.redis, &self.s.waves[1 + 2 * k]);
        if let Some((_, toml)) = self.s.submitted.as_ref().filter(|(at, _)| *at == k) {
            self.redis
                .cli(&["XADD", "fanout:campaigns", "*", "job", toml]);
        }
        child
    }

    /// Waits for `at` in process `k`, then lands `fault`.
    fn fault(&mut self, k: usize, fault: Fault, child: &mut KillOnDrop) {
        let started = Instant::now();
        let log = format!("run{k}.jsonl");
        let at = match fault {
            Fault::Kill(at)
            | Fault::RedisRestart(at, _)
            | Fault::Stall(at)
            | Fault::DiskFull(at)
            | Fault::RedisDiskFull(at, _)
            | Fault::RedisStall(at, _) => at,
        };
        loop {
            let due = match at {
                Trigger::Delay(ms) => started.elapsed() >= Duration::from_millis(ms),
                Trigger::Lines(n) => {
                    lines_in(&self.dir, &log) >= n || started.elapsed() > LINES_WAIT
                }
            };
            if due || matches!(child.0.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Ok(Some(st)) = child.0.try_wait() {
            let err = serving::stderr_of(&mut child.0);
            // On one CPU, a Redis process may stop for its lease; the fault's interruption
            // (below) allows its in-flight messages to go again.
            let starved = self.one_cpu.is_some()
                && st.code() == Some(1)
                && err.contains(cpu::STOPPED_FOR_ITS_LEASE);
            if !starved {
                self.violations.push(format!(
                    "process {k} exited on its own: {st}: {}",
                    err.trim()
                ));
            }
        }
        let lines = lines_in(&self.dir, &log);
        self.interruptions
            .push(format!("{fault:?} in process {k} ({lines} lines)"));
        match fault {
            Fault::Kill(_) => {
                child.0.kill().ok();
                child.0.wait().ok();
            }
            Fault::Stall(_) => {
                signal(child, "-STOP");
                std::thread::sleep(LEASE + Duration::from_millis(500));
            }
            Fault::RedisRestart(_, down_ms) => {
                self.redis.restart_after(Duration::from_millis(down_ms));
                self.run_on(k, child, "the Redis restart");
            }
            Fault::RedisDiskFull(_, full_ms) => {
                match self.redis.fill_disk_for(Duration::from_millis(full_ms)) {
                    Ok(what) => {
                        if let Some(note) = self.interruptions.last_mut() {
                            let _ = write!(note, ", {what}");
                        }
                    }
                    Err(e) => self
                        .violations
                        .push(format!("process {k}: redis disk: {e}")),
                }
                self.run_on(k, child, "the Redis disk full");
            }
            Fault::RedisStall(_, stall_ms) => {
                self.redis.stall_for(Duration::from_millis(stall_ms));
                self.run_on(k, child, "the Redis stall");
            }
            Fault::DiskFull(_) => self.disk_full(k, child),
        }
    }

    /// Process `k` runs on for [`RUN_ON_MS`] after a Redis fault (`what`), then SIGTERM: it
    /// recovered and stops with 0, or stopped on a store error with 1; never anything else.
    fn run_on(&mut self, k: usize, child: &mut KillOnDrop, what: &str) {
        std::thread::sleep(Duration::from_millis(RUN_ON_MS));
        let (status, _, err) = match child.0.try_wait() {
            Ok(Some(st)) => (st, Duration::ZERO, serving::stderr_of(&mut child.0)),
            _ => sigterm(&mut child.0),
        };
        if let Some(note) = self.interruptions.last_mut() {
            let _ = write!(note, ", then {status}");
        }
        if !matches!(status.code(), Some(0 | 1)) {
            self.violations.push(format!(
                "process {k} after {what}: {status}: {}",
                err.trim()
            ));
        }
    }

    /// The store's disk full under process `k`: it exits 1 on its own, or is stopped after
    /// [`RUN_ON_MS`] with SIGTERM (0, or 1 if its last writes fail); then the disk grows.
    fn disk_full(&mut self, k: usize, child: &mut KillOnDrop) {
        if let Some(Err(e)) = self.disk.as_ref().map(disk::Disk::fill) {
            self.violations
                .push(format!("process {k}: cannot fill the disk: {e}"));
        }
        let full = Instant::now();
        let status = loop {
            if let Ok(Some(st)) = child.0.try_wait() {
                break (st, serving::stderr_of(&mut child.0));
            }
            if full.elapsed() > Duration::from_millis(RUN_ON_MS) {
                let (st, _, err) = sigterm(&mut child.0);
                break (st, err);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if let Some(note) = self.interruptions.last_mut() {
            let _ = write!(note, ", then {}", status.0);
        }
        if !matches!(status.0.code(), Some(0 | 1)) {
            let why = format!(
                "process {k} on a full disk: {}: {}",
                status.0,
                status.1.trim()
            );
            self.violations.push(why);
        }
        if let Some(Err(e)) = self.disk.as_ref().map(disk::Disk::grow) {
            self.violations
                .push(format!("process {k}: cannot grow the disk: {e}"));
        }
    }

    /// Resumes process `k`, stalled past its lease while its successor started: after
    /// [`RUN_ON_MS`], SIGCONT. Its lease is gone: it must exit 1 on its own within
    /// [`STALL_EXIT`] — a store call, or (idle) its lease's heartbeat, finds the lease taken —
    /// and send nothing meanwhile (the checks of the deliveries hold it to that). Still up
    /// then, it is a violation (and stopped with SIGTERM).
    fn resume(&mut self, k: usize, mut old: KillOnDrop) {
        std::thread::sleep(Duration::from_millis(RUN_ON_MS));
        signal(&old, "-CONT");
        RESUMED.fetch_add(1, Ordering::SeqCst);
        let resumed = Instant::now();
        let status = loop {
            if let Ok(Some(st)) = old.0.try_wait() {
                break (st, serving::stderr_of(&mut old.0));
            }
            if resumed.elapsed() > STALL_EXIT {
                let (st, _, err) = sigterm(&mut old.0);
                self.violations.push(format!(
                    "stalled process {k} still up {STALL_EXIT:?} after SIGCONT (then {st}): {}",
                    err.trim()
                ));
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if status.0.code() != Some(1) {
            let why = format!(
                "stalled process {k} after SIGCONT: {}: {}",
                status.0,
                status.1.trim()
            );
            self.violations.push(why);
        }
    }

    /// The last process: runs until every pair expected is out and both streams have nothing
    /// pending, then SIGTERM (exit 0).
    fn last(&mut self, k: usize, child: &mut KillOnDrop, verbose: bool) {
        let started = Instant::now();
        let done = |cx: &Cx| {
            let got: BTreeSet<_> = deliveries(&cx.dir, k + 1, &mut Vec::new())
                .into_iter()
                .map(|d| (d.campaign, d.occurrence, d.user))
                .collect();
            cx.want.is_subset(&got)
                && pending(&cx.redis, "fanout:logins") == 0
                && (cx.s.submitted.is_none() || pending(&cx.redis, "fanout:campaigns") == 0)
        };
        while !done(self) && started.elapsed() < SETTLE {
            if let Ok(Some(st)) = child.0.try_wait() {
                self.violations
                    .push(format!("the last process exited on its own: {st}"));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Time for anything unexpected to show.
        std::thread::sleep(Duration::from_millis(300));
        let (status, _, err) = sigterm(&mut child.0);
        if !status.success() {
            self.violations
                .push(format!("SIGTERM: {status}: {}", err.trim()));
        }
        if verbose {
            eprintln!(
                "seed {}: the last process's stderr:\n{}",
                self.s.seed,
                err.trim()
            );
        }
    }
}

/// For each campaign without a holdout: the store's grants are the naive reading's users.
fn grants_match(
    s: &Schedule,
    dir: &Scratch,
    store: &str,
    want: &BTreeSet<check::Pair>,
    violations: &mut Vec<String>,
) {
    let (campaigns, _) = naive::campaigns(&s.all_campaigns());
    for campaign in campaigns.iter().filter(|c| c.holdout == 0.0).map(|c| &c.id) {
        let out = dir.fanout(&["grants", "--store", store, "--campaign", campaign]);
        let got: BTreeSet<u64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        let expect: BTreeSet<u64> = want
            .iter()
            .filter(|p| p.0 == *campaign)
            .map(|p| p.2)
            .collect();
        if !out.status.success() || got != expect {
            violations.push(format!(
                "grants of {campaign}: {} in the store, {} expected ({})",
                got.len(),
                expect.len(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
}

struct Args {
    seeds: Seeds,
    jobs: usize,
    verbose: bool,
    /// Every schedule's faulted processes on one CPU (`--one-cpu`).
    one_cpu: bool,
    /// `--list`: print the schedules, run none.
    list: bool,
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let mut a = Args {
        seeds: Seeds::new(1, 16),
        jobs: 2,
        verbose: false,
        one_cpu: false,
        list: false,
    };
    let num = |i: usize| argv.get(i + 1).and_then(|v| v.parse::<u64>().ok());
    let mut i = 1;
    while i < argv.len() {
        match argv[i].as_str() {
            "--schedules" if num(i).is_some() => (a.seeds.count, i) = (num(i).unwrap_or(0), i + 1),
            "--from" if num(i).is_some() => (a.seeds.from, i) = (num(i).unwrap_or(1), i + 1),
            "--jobs" if num(i).is_some() => {
                (a.jobs, i) = (num(i).unwrap_or(1).max(1) as usize, i + 1)
            }
            "--seed" if num(i).is_some() => {
                (a.seeds, a.verbose) = (Seeds::new(num(i).unwrap_or(1), 1), true);
                i += 1;
            }
            "--seeds" if argv.get(i + 1).is_some() => {
                a.seeds.set_list(&argv[i + 1]);
                i += 1;
            }
            "--verbose" => a.verbose = true,
            "--list" => a.list = true,
            "--one-cpu" => a.one_cpu = true,
            // cargo's and libtest's flags (--nocapture, a filter, …).
            _ => {}
        }
        i += 1;
    }
    a
}

fn main() -> ExitCode {
    let args = parse_args();
    // The Redis run lease the processes take (default 5 s): a process started after a kill
    // waits it out before it claims, so a short one keeps a schedule short (as in
    // tests/faults.rs). Set before any thread starts; every child inherits it.
    std::env::set_var(
        "FANOUT_LEASE",
        humantime::format_duration(LEASE).to_string(),
    );
    if args.list {
        for k in 0..args.seeds.count {
            let seed = args.seeds.nth(k);
            println!("seed {seed}: {}", plan(seed).describe());
        }
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::<u64>::new());
    std::panic::set_hook(Box::new(|_| {}));
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.min(args.seeds.count.max(1) as usize) {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::SeqCst) as u64;
                if k >= args.seeds.count {
                    break;
                }
                let seed = args.seeds.nth(k);
                let mut s = plan(seed);
                s.one_cpu |= args.one_cpu;
                if args.verbose {
                    eprintln!("seed {seed}: {}", s.describe());
                }
                let outcome = std::panic::catch_unwind(|| execute(&s, args.verbose));
                let violations = outcome.unwrap_or_else(|p| {
                    let msg = (p.downcast_ref::<String>().cloned())
                        .or_else(|| p.downcast_ref::<&str>().map(|m| m.to_string()))
                        .unwrap_or_else(|| "panic".into());
                    vec![format!("harness panic: {msg}")]
                });
                if !violations.is_empty() {
                    println!(
                        "FAILED seed {seed}: {} || {}",
                        s.describe(),
                        violations.join(" ; ")
                    );
                    failed.lock().unwrap_or_else(|e| e.into_inner()).push(seed);
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap_or_else(|e| e.into_inner());
    println!(
        "serve fault schedules: {} passed, {} failed ({} from seed {} in {:.0}s; {} stalled \
         processes resumed, each gone within {STALL_EXIT:?})",
        args.seeds.count as usize - failed.len(),
        failed.len(),
        args.seeds.count,
        args.seeds.first(),
        started.elapsed().as_secs_f64(),
        RESUMED.load(Ordering::SeqCst),
    );
    match failed.is_empty() {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    }
}
