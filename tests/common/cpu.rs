//! One CPU for a fault schedule's processes, with a busy loop pinned to it: the processes,
//! pinned there too (`taskset`), get time slices between the loop's, so their threads are
//! preempted at arbitrary points and take turns instead of running side by side — as in a
//! container given one CPU on a busy host.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};

/// What a Redis-store process says when it stops because it went too long without refreshing
/// its lease (1 s in the harnesses). On one CPU beside the busy loop (and the other schedules,
/// and the host taking the VM's CPUs) a process may be descheduled that long: it cannot know
/// that it still holds the lease and sends nothing more — what it must do. The harnesses allow
/// that exit (1) there, its in-flight messages counted as a kill's.
pub const STOPPED_FOR_ITS_LEASE: &str = "lease may have expired";

/// The CPU chosen by a seed among those allowed, and its busy loop while one runs.
pub struct OneCpu {
    cpu: usize,
    hog: Option<Child>,
}

impl OneCpu {
    pub fn new(seed: u64) -> OneCpu {
        let cpus = allowed_cpus();
        let cpu = cpus[(seed % cpus.len() as u64) as usize];
        OneCpu { cpu, hog: None }
    }

    /// The CPU to pin a process to, the busy loop started (`on`); `None`, the loop stopped.
    pub fn pin(&mut self, on: bool) -> Option<usize> {
        if !on {
            self.stop();
            return None;
        }
        if self.hog.is_none() {
            // It spins while its parent (this harness) lives: a harness killed before it
            // could stop the loop leaves no CPU spinning.
            let hog = Command::new("taskset")
                .args(["--cpu-list", &self.cpu.to_string()])
                .args(["sh", "-c", "while kill -0 $PPID 2>/dev/null; do :; done"])
                .stdout(Stdio::null())
                .spawn()
                .expect("start a busy loop with taskset");
            self.hog = Some(hog);
        }
        Some(self.cpu)
    }

    fn stop(&mut self) {
        if let Some(mut hog) = self.hog.take() {
            hog.kill().ok();
            hog.wait().ok();
        }
    }
}

impl Drop for OneCpu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The command that runs `fanout`, on `cpu` where one is given.
pub fn fanout_on(cpu: Option<usize>) -> Command {
    let fanout = env!("CARGO_BIN_EXE_fanout");
    match cpu {
        None => Command::new(fanout),
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["--cpu-list", &cpu.to_string(), fanout]);
            c
        }
    }
}

/// The CPUs this process may run on: `Cpus_allowed_list` of /proc/self/status ("0-3,6");
/// CPU 0 where that cannot be read.
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_default();
    let cpus: Vec<usize> = list
        .trim()
        .split(',')
        .filter_map(|part| match part.split_once('-') {
            Some((lo, hi)) => Some(lo.parse().ok()?..=hi.parse().ok()?),
            None => part.parse().ok().map(|c| c..=c),
        })
        .flatten()
        .collect();
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}
