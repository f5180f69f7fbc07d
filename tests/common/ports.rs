//! Loopback ports for servers the tests run as other processes (redis-server, `fanout serve
//! --listen`, a cluster's hostfile), which cannot be handed a bound listener.
//!
//! Binding port 0 and releasing it races: the kernel hands the same ephemeral ports to every
//! outgoing connection and every other `bind(0)` on the machine. So ports come from below the
//! ephemeral range (where the kernel never picks one by itself), from a pseudo-random start,
//! and each is reserved by an exclusive lock on a file named after it in a shared temporary
//! directory: every test process (of any binary, and any copy of this module) that takes ports
//! here skips a reserved one. A port some other program already listens on is skipped too; what
//! is left (another program binding the port between our check and the server's bind) is
//! caught by the callers, which start their server again on a fresh port.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// The lowest port handed out (below it sit well-known services).
const LOW: u16 = 20_000;

/// A loopback port reserved for one server until this is dropped.
#[derive(Debug)]
pub struct Port {
    /// The port number.
    pub port: u16,
    /// The held lock that reserves it.
    _lock: File,
}

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

fn lock_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("fanout-test-ports");
    std::fs::create_dir_all(&dir).expect("create the port lock directory");
    dir
}

/// A pseudo-random number, different in every call and every process.
fn seed() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    std::process::id().hash(&mut h);
    CALLS.fetch_add(1, Ordering::Relaxed).hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    h.finish()
}

/// Reserves a free loopback port outside the ephemeral range.
pub fn reserve() -> Port {
    let high = ephemeral_low();
    let dir = lock_dir();
    if high <= LOW + 1000 {
        // No room below the ephemeral range on this machine: take the kernel's pick, still
        // reserved against the other tests; the callers' retries cover the rest.
        for _ in 0..100 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("bind a loopback port")
                .port();
            if let Some(reserved) = try_reserve(&dir, port) {
                return reserved;
            }
        }
        panic!("no free loopback port");
    }
    let span = u64::from(high - LOW);
    let start = seed() % span;
    for k in 0..span {
        let port = LOW + ((start + k) % span) as u16;
        if let Some(reserved) = try_reserve(&dir, port) {
            return reserved;
        }
    }
    panic!("no free loopback port in {LOW}..{high}");
}

/// `port`, if no other test holds it and nothing listens on it.
fn try_reserve(dir: &std::path::Path, port: u16) -> Option<Port> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{port}.lock")))
        .expect("open a port lock file");
    file.try_lock().ok()?;
    // Someone outside these tests may listen there already.
    TcpListener::bind(("127.0.0.1", port)).ok()?;
    Some(Port { port, _lock: file })
}

/// Whether a process's error output says its port was taken (retry on another port).
pub fn says_address_in_use(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    s.contains("address already in use") || s.contains("address in use")
}
