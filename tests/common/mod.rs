//! Helpers for the end-to-end tests: run the real `fanout` binary, read what it wrote, and
//! compute the expected outcome naively, without any of fanout's code.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use serde_json::Value;

pub mod cpu;
pub mod ports;

/// The stderr of each process [`Scratch::start`] started, by pid: a thread reads it to its
/// end as the process writes, so a chatty process never blocks on a full pipe while a test
/// waits for it to do something else.
static STDERR: Mutex<BTreeMap<u32, JoinHandle<String>>> = Mutex::new(BTreeMap::new());

fn drain_stderr(child: &mut Child) {
    let Some(mut pipe) = child.stderr.take() else {
        return;
    };
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        pipe.read_to_end(&mut text).ok();
        String::from_utf8_lossy(&text).into_owned()
    });
    let mut all = STDERR.lock().unwrap_or_else(PoisonError::into_inner);
    all.insert(child.id(), reader);
}

/// What `child` wrote on stderr, read to its end: call once it has exited (or been killed).
pub fn stderr_of(child: &mut Child) -> String {
    let drained = STDERR
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&child.id());
    if let Some(reader) = drained {
        return reader.join().unwrap_or_default();
    }
    let mut err = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut err).ok();
    }
    err
}

/// Waits for `child` to exit: its status and its stderr ([`stderr_of`]).
pub fn exit_of(child: &mut Child) -> (ExitStatus, String) {
    let status = child.wait().expect("wait for fanout");
    (status, stderr_of(child))
}

/// Which schedules a fault harness runs: `count` seeds from `from`, or exactly those
/// `--seeds` lists.
pub struct Seeds {
    pub from: u64,
    pub count: u64,
    list: Option<Vec<u64>>,
}

impl Seeds {
    pub fn new(from: u64, count: u64) -> Self {
        Seeds {
            from,
            count,
            list: None,
        }
    }

    /// `--seeds 3,17,42`: exactly these (what does not parse is left out).
    pub fn set_list(&mut self, text: &str) {
        let list: Vec<u64> = (text.split(','))
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        self.count = list.len() as u64;
        self.list = Some(list);
    }

    /// The `k`th seed to run.
    pub fn nth(&self, k: u64) -> u64 {
        match &self.list {
            Some(list) => list[k as usize],
            None => self.from + k,
        }
    }

    /// The first seed, for the report.
    pub fn first(&self) -> u64 {
        (self.list.as_ref().and_then(|l| l.first().copied())).unwrap_or(self.from)
    }
}

/// A scratch directory for one test, with the job's files in it.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, content).expect("write scratch file");
        p
    }

    /// Runs `fanout ARGS` with this directory as the working directory.
    pub fn fanout(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run fanout")
    }

    /// Starts `fanout ARGS` in this directory without waiting; its stderr is read as it is
    /// written (see [`stderr_of`]).
    pub fn start(&self, args: &[&str]) -> Child {
        self.start_on(args, None)
    }

    /// [`Scratch::start`] on `cpu` where one is given ([`cpu::fanout_on`]).
    pub fn start_on(&self, args: &[&str], cpu: Option<usize>) -> Child {
        let mut child = cpu::fanout_on(cpu)
            .args(args)
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start fanout");
        drain_stderr(&mut child);
        child
    }

    /// Waits until `file` here holds at least `lines` lines, while `child` keeps running.
    pub fn wait_for_lines(&self, file: &str, lines: usize, child: &mut std::process::Child) {
        let started = std::time::Instant::now();
        loop {
            let n = std::fs::read(self.path(file))
                .map(|b| b.iter().filter(|&&c| c == b'\n').count())
                .unwrap_or(0);
            if n >= lines {
                return;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the run never got going"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before {lines} lines"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Runs and asserts exit 0, returning stderr.
    pub fn fanout_ok(&self, args: &[&str]) -> String {
        let out = self.fanout(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "fanout {args:?} failed ({:?}):\n{stderr}",
            out.status.code()
        );
        stderr
    }
}

/// A user as the tests see it.
#[derive(Debug, Clone, PartialEq)]
pub struct TUser {
    pub id: u64,
    pub level: u64,
    pub points: u64,
    pub tags: Vec<String>,
}

/// Reads users from JSON Lines the naive way: every non-blank line is an object; the last line
/// of an id wins.
pub fn naive_users_jsonl(text: &str) -> BTreeMap<u64, TUser> {
    let mut users = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).expect("test input is valid");
        let tags = v["tags"]
            .as_array()
            .map(|a| a.iter().map(|t| t.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default();
        let u = TUser {
            id: v["id"].as_u64().unwrap(),
            level: v["level"].as_u64().unwrap(),
            points: v["points"].as_u64().unwrap(),
            tags,
        };
        users.insert(u.id, u);
    }
    users
}

/// A persona, as a test states it.
#[derive(Debug, Clone, Default)]
pub struct Persona {
    pub min_level: Option<u64>,
    pub max_level: Option<u64>,
    pub min_points: Option<u64>,
    pub max_points: Option<u64>,
    pub tags_any: Vec<String>,
    pub tags_all: Vec<String>,
}

impl Persona {
    pub fn matches(&self, u: &TUser) -> bool {
        self.min_level.is_none_or(|m| u.level >= m)
            && self.max_level.is_none_or(|m| u.level <= m)
            && self.min_points.is_none_or(|m| u.points >= m)
            && self.max_points.is_none_or(|m| u.points <= m)
            && (self.tags_any.is_empty() || self.tags_any.iter().any(|t| u.tags.contains(t)))
            && self.tags_all.iter().all(|t| u.tags.contains(t))
    }
}

/// One line of a `log:` delivery file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rec {
    pub campaign: String,
    pub user: u64,
    pub key: String,
    pub title: String,
    pub body: String,
}

/// Reads a delivery log (missing file = no deliveries).
pub fn read_deliveries(path: &Path) -> Vec<Rec> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("delivery line is JSON");
            Rec {
                campaign: v["campaign"].as_str().unwrap().to_owned(),
                user: v["user"].as_u64().unwrap(),
                key: v["key"].as_str().unwrap().to_owned(),
                title: v["title"].as_str().unwrap().to_owned(),
                body: v["body"].as_str().unwrap().to_owned(),
            }
        })
        .collect()
}

/// The (campaign, user) pairs of deliveries, asserting none repeats.
pub fn pairs_once(recs: &[Rec]) -> BTreeSet<(String, u64)> {
    let mut seen = BTreeSet::new();
    for r in recs {
        assert!(
            seen.insert((r.campaign.clone(), r.user)),
            "delivered twice: {} to {}",
            r.campaign,
            r.user
        );
    }
    seen
}

/// SPEC's outcomes of an eligible pair: a summary line's `eligible` is their sum.
pub const OUTCOMES: [&str; 7] = [
    "delivered",
    "dead_lettered",
    "unreachable",
    "capped",
    "quiet_held",
    "held_out",
    "cancelled",
];

/// Reads a summary file and checks SPEC's invariant: eligible is the sum of delivered,
/// dead_lettered, unreachable, capped, quiet_held, held_out and cancelled (of an interrupted
/// run, ≥: claimed users may be left for the re-run).
pub fn read_summary(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("summary written");
    let v: Value = serde_json::from_str(&text).expect("summary is JSON");
    let interrupted = v["interrupted"].as_bool().expect("interrupted");
    for c in v["campaigns"].as_array().expect("campaigns") {
        let n = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{k} in {c}"));
        let settled = OUTCOMES.iter().map(|k| n(k)).sum::<u64>();
        match interrupted {
            false => assert_eq!(n("eligible"), settled, "invariant broken in {c}"),
            true => assert!(n("eligible") >= settled, "invariant broken in {c}"),
        }
    }
    v
}

/// The summary line of `campaign`.
pub fn campaign_line<'a>(summary: &'a Value, campaign: &str) -> &'a Value {
    summary["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == campaign)
        .unwrap_or_else(|| panic!("no summary line for {campaign}"))
}

/// A pseudo-random sequence for building test inputs (not fanout's generator).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
