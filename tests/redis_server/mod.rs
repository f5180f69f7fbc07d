//! A real `redis-server` for the tests: started on a free loopback port in a temporary
//! directory (append-only file, fsync always, so a restart keeps every write, unless started
//! with another [`Persist`]), killed on drop.
//! The port is reserved (see `ports`); should another program bind it first anyway, the
//! server exits, and it is started again on a fresh port (a restart waits for its own port).
//! [`RedisServer::start_tls`] serves TLS only, with a certificate for 127.0.0.1 signed by a CA
//! made for the test (the `openssl` command line tool). [`RedisServer::start_on_tmpfs`] keeps
//! its data on a tmpfs of its own that a test can fill: fsynced once a second, a write it
//! cannot persist is refused (`MISCONF`) until the disk has room again; fsynced at every
//! write, the server exits.
#![allow(dead_code)]

// Its own copy, for test binaries that use this module without `common`; two copies in one
// binary still never hand out one port twice (the reservation is a file lock, not a static).
#[allow(clippy::duplicate_mod)]
#[path = "../common/ports.rs"]
mod ports;
// Its own copy too, for the fault harnesses that also mount a tmpfs for the file store.
#[allow(clippy::duplicate_mod)]
#[path = "../faults/disk.rs"]
mod disk;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How the server keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// Not at all: a restart forgets everything.
    No,
    /// An append-only file fsynced at every write: a crash loses nothing acknowledged, and a
    /// write that fails (a full disk) makes the server exit.
    Always,
    /// Fsynced once a second: a write that fails makes the server refuse writes (`MISCONF`)
    /// until one succeeds again; a crash may lose a second of acknowledged writes.
    EverySec,
}

/// What a server did while its disk was full ([`RedisServer::fill_disk_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhileFull {
    /// It exited on a failed write ([`Persist::Always`]) and was started again.
    Exited,
    /// It refused writes (`MISCONF`, [`Persist::EverySec`]).
    Refused,
    /// It wrote nothing that needed a page.
    WroteNothing,
}

impl std::fmt::Display for WhileFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WhileFull::Exited => "redis exited on its full disk and was started again",
            WhileFull::Refused => "redis refused writes (MISCONF) until it had room",
            WhileFull::WroteNothing => "redis wrote nothing that needed room",
        })
    }
}

pub struct RedisServer {
    pub port: u16,
    /// The tmpfs at `dir`, if it has one: unmounted before `dir` is removed.
    disk: Option<disk::Disk>,
    persist: Persist,
    dir: tempfile::TempDir,
    child: Option<Child>,
    tls: bool,
    /// Keeps the port reserved for restarts.
    _reserved: Option<ports::Port>,
}

/// Why a launch did not give a running server.
enum Launch {
    /// The server exited at once; its log says why.
    Exited(String),
}

/// How many fresh ports a start tries before giving up.
const START_ATTEMPTS: usize = 20;
/// How long one launch may take to answer (generous: the machine may be busy).
const LAUNCH_WAIT: Duration = Duration::from_secs(60);

/// Runs `openssl` with `args` in `dir`; panics with its output if it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_persisting(Persist::Always)
    }

    /// A server that keeps its data as `persist` says.
    pub fn start_persisting(persist: Persist) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), None, persist, false)
    }

    /// A server that speaks TLS only; its certificate is signed by [`RedisServer::ca`].
    pub fn start_tls() -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), None, Persist::Always, true)
    }

    /// A server whose directory is a tmpfs of its own (mounting needs root), for
    /// [`RedisServer::fill_disk`].
    pub fn start_on_tmpfs(persist: Persist) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk::Disk::mount(dir.path())?;
        Ok(Self::start_in(dir, Some(disk), persist, false))
    }

    fn start_in(
        dir: tempfile::TempDir,
        disk: Option<disk::Disk>,
        persist: Persist,
        tls: bool,
    ) -> Self {
        let mut server = RedisServer {
            port: 0,
            disk,
            persist,
            dir,
            child: None,
            tls,
            _reserved: None,
        };
        if tls {
            server.make_certificates();
        }
        let mut why = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let reserved = ports::reserve();
            server.port = reserved.port;
            server._reserved = Some(reserved);
            match server.launch() {
                Ok(()) => return server,
                // Lost the port to another program: a fresh port, not a failed test.
                Err(Launch::Exited(log)) => why.push(format!("port {}: {log}", server.port)),
            }
        }
        panic!(
            "redis-server did not start on {START_ATTEMPTS} ports:\n{}",
            why.join("\n")
        );
    }

    /// A CA (ca.crt) and a server certificate for 127.0.0.1 and localhost it signed.
    fn make_certificates(&self) {
        let dir = self.dir.path();
        let new_key = ["-newkey", "rsa:2048", "-nodes"];
        let ca = [
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=fanout test CA",
            "-keyout",
            "ca.key",
        ];
        openssl(
            dir,
            &[&["req"][..], &new_key, &ca, &["-out", "ca.crt"]].concat(),
        );
        let csr = [
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ];
        openssl(dir, &[&["req"][..], &new_key, &csr].concat());
        std::fs::write(
            dir.join("san.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "san.cnf",
                "-out",
                "server.crt",
            ],
        );
    }

    /// The PEM file of the CA that signed a TLS server's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Starts redis-server on `self.port` and waits until it answers as itself (its pid, so an
    /// answer from another server on the port does not count); `Exited` if it stopped first.
    fn launch(&mut self) -> Result<(), Launch> {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        if self.tls {
            let file = |name: &str| self.dir.path().join(name);
            cmd.args([
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-auth-clients",
                "no",
            ])
            .arg("--tls-cert-file")
            .arg(file("server.crt"))
            .arg("--tls-key-file")
            .arg(file("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(file("ca.crt"));
        } else {
            cmd.args(["--port", &port]);
        }
        let (aof, fsync) = match self.persist {
            Persist::No => ("no", "always"),
            Persist::Always => ("yes", "always"),
            Persist::EverySec => ("yes", "everysec"),
        };
        // A fresh log per launch: what it says is about this launch only.
        std::fs::remove_file(self.log_path()).ok();
        let mut child = cmd
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", aof, "--appendfsync", fsync])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        let me = format!("process_id:{}", child.id());
        let started = Instant::now();
        loop {
            if child.try_wait().expect("wait for redis-server").is_some() {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                return Err(Launch::Exited(log));
            }
            if self
                .cli(&["INFO", "server"])
                .lines()
                .any(|l| l.trim() == me)
            {
                self.child = Some(child);
                return Ok(());
            }
            if started.elapsed() > LAUNCH_WAIT {
                child.kill().ok();
                child.wait().ok();
                panic!(
                    "redis-server did not answer on port {port}:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT/DB`, or `rediss://…` for a TLS server.
    pub fn url(&self, db: u8) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/{db}", self.port)
    }

    /// Runs a command with redis-cli; returns its trimmed output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]);
        if self.tls {
            cmd.arg("--tls").arg("--cacert").arg(self.ca());
        }
        let out = cmd.args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs `commands` (one a line, arguments without spaces) through one redis-cli, in order.
    pub fn pipe(&self, commands: &str) {
        use std::io::Write as _;
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]);
        if self.tls {
            cmd.arg("--tls").arg("--cacert").arg(self.ca());
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-cli");
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(commands.as_bytes())
                .expect("redis-cli stdin");
        }
        assert!(
            child.wait().expect("redis-cli").success(),
            "redis-cli failed"
        );
    }

    /// Stops the server (SIGSTOP) for `stall`, then lets it go on (SIGCONT): it answers
    /// nothing meanwhile and keeps every connection, as a server stuck in a long fork or a
    /// paused VM does; its clock runs on, so keys expire as they would have.
    pub fn stall_for(&mut self, stall: Duration) {
        let Some(pid) = self.child.as_ref().map(|c| c.id().to_string()) else {
            return;
        };
        let signal = |sig: &str| {
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .is_ok_and(|s| s.success())
        };
        if signal("-STOP") {
            std::thread::sleep(stall);
            assert!(signal("-CONT"), "redis-server {pid} did not take SIGCONT");
        }
    }

    /// Kills the server with SIGKILL and starts it again on the same port and data.
    pub fn restart_after(&mut self, down: Duration) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
        std::thread::sleep(down);
        // The port stays reserved, but a connection's TIME_WAIT or another program may hold it
        // a moment: retry on the same port, which the clients' URLs name.
        let started = Instant::now();
        while let Err(Launch::Exited(log)) = self.launch() {
            assert!(
                started.elapsed() < LAUNCH_WAIT,
                "redis-server did not restart on port {}:\n{log}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the server for good; its port stays reserved while `self` lives, so a check that
    /// nothing listens there is not answered by another test's server.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// Fills the server's tmpfs ([`RedisServer::start_on_tmpfs`]): its next write that needs
    /// a page fails.
    pub fn fill_disk(&self) -> Result<(), String> {
        self.disk.as_ref().ok_or("the server has no tmpfs")?.fill()
    }

    /// Whether the server answers (a harness that finds it gone starts a new one).
    pub fn alive(&self) -> bool {
        self.cli(&["PING"]) == "PONG"
    }

    /// Whether the server refuses writes, having failed to persist one (`MISCONF`).
    pub fn refusing(&self) -> bool {
        self.cli(&["INFO", "persistence"])
            .lines()
            .any(|l| l.trim() == "aof_last_write_status:err")
    }

    /// Fills the server's tmpfs for `full` (its clients going on meanwhile), then gives it room
    /// again ([`RedisServer::grow_disk`]); says what the server did meanwhile.
    pub fn fill_disk_for(&mut self, full: Duration) -> Result<WhileFull, String> {
        self.fill_disk()?;
        std::thread::sleep(full);
        let refused = self.refusing();
        Ok(match self.grow_disk()? {
            true => WhileFull::Exited,
            false if refused => WhileFull::Refused,
            false => WhileFull::WroteNothing,
        })
    }

    /// Gives the server's tmpfs room again and returns once it takes writes: started again
    /// (same port and data) if it exited on a failed write, else once its next write
    /// succeeded (within a second). Returns whether it had exited.
    pub fn grow_disk(&mut self) -> Result<bool, String> {
        let disk = self.disk.as_ref().ok_or("the server has no tmpfs")?;
        disk.grow()?;
        let exited = !matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)));
        if exited {
            self.restart_after(Duration::ZERO);
        }
        let started = Instant::now();
        while self.refusing() {
            if started.elapsed() > LAUNCH_WAIT {
                return Err(format!(
                    "redis still refuses writes {LAUNCH_WAIT:?} after its disk grew"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(exited)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}
