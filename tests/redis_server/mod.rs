//! A real `redis-server` for the tests: started on a free loopback port in a temporary
//! directory (append-only file, fsync always, so a restart keeps every write), killed on drop.
//! [`RedisServer::start_tls`] serves TLS only, with a certificate for 127.0.0.1 signed by a CA
//! made for the test (the `openssl` command line tool).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    tls: bool,
}

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
        Self::start_with(false)
    }

    /// A server that speaks TLS only; its certificate is signed by [`RedisServer::ca`].
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RedisServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            tls,
        };
        if tls {
            server.make_certificates();
        }
        server.launch();
        server
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

    fn launch(&mut self) {
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
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        self.child = Some(child);
        let started = Instant::now();
        while self.cli(&["PING"]) != "PONG" {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
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

    /// Kills the server with SIGKILL and starts it again on the same port and data.
    pub fn restart_after(&mut self, down: Duration) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
        std::thread::sleep(down);
        self.launch();
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
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
