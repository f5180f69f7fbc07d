//! `fanout serve`'s `/metrics` read by real clients (issue #13): a real Prometheus server
//! scrapes it every second while a fan-out happens, and its query API must report as many
//! deliveries as the delivery log holds lines; `promtool check metrics` must accept the
//! exposition text as served.
//!
//! The fan-out is a campaign submitted on a real Redis stream once Prometheus has scraped the
//! counter at 0, so Prometheus sees it move. The expected value is counted in the delivery
//! file, never taken from fanout's own reports.

mod common;
mod redis_server;
mod serving;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{pairs_once, ports, read_deliveries, Scratch};
use redis_server::RedisServer;
use serde_json::Value;
use serving::*;

/// Users of the fan-out: all of them get the promotion.
const USERS: u64 = 10_000;
/// How long anything the test waits for may take on a busy machine before the test fails.
const LIVENESS: Duration = Duration::from_secs(60);

/// A real `prometheus` on a reserved loopback port, with its config and TSDB in a temporary
/// directory; killed on drop.
struct Prometheus {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
    _reserved: ports::Port,
}

impl Prometheus {
    /// Starts Prometheus scraping `http://127.0.0.1:{target}/metrics` every second (job
    /// `fanout`); returns once it says it is ready. A port lost to another program costs a
    /// retry on a fresh one.
    fn start(target: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: fanout\n    static_configs:\n\
                 \x20     - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let log = dir.path().join("prometheus.log");
        for _ in 0..10 {
            let reserved = ports::reserve();
            let port = reserved.port;
            let mut child = match Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
            {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "the prometheus binary is not installed: ./scripts/test installs it (Debian \
                     package prometheus, which also ships promtool)"
                ),
                Err(e) => panic!("cannot start prometheus: {e}"),
            };
            let started = Instant::now();
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    let said = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        ports::says_address_in_use(&said),
                        "prometheus exited at start ({status:?}):\n{said}"
                    );
                    break;
                }
                if request(port, "/-/ready").is_some_and(|(status, _)| status == 200) {
                    return Prometheus {
                        port,
                        dir,
                        child,
                        _reserved: reserved,
                    };
                }
                if started.elapsed() > LIVENESS {
                    child.kill().ok();
                    child.wait().ok();
                    panic!(
                        "prometheus never became ready:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("prometheus lost its port 10 times");
    }

    /// `GET /api/v1/query?query=QUERY`: the `data.result` array of a successful answer.
    fn query(&self, query: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", url_encode(query));
        let (status, body) =
            request(self.port, &path).unwrap_or_else(|| panic!("prometheus did not answer {path}"));
        assert_eq!(status, 200, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(v["status"], "success", "{path}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The raw samples of the scraped series `metric` (labelled only with the job and
    /// instance) from the last minute, as (milliseconds since the epoch, value), oldest first. A range selector, so
    /// each sample comes with its own scrape time (an instant query's timestamp is only the
    /// time it was evaluated).
    fn samples(&self, metric: &str) -> Vec<(u64, f64)> {
        let result = self.query(&format!("{metric}{{job=\"fanout\"}}[1m]"));
        assert!(
            result.len() <= 1,
            "more than one {metric} series: {result:?}"
        );
        let Some(series) = result.first() else {
            return Vec::new();
        };
        series["values"]
            .as_array()
            .expect("a matrix's values")
            .iter()
            .map(|pair| {
                let ts = pair[0].as_f64().expect("a sample's timestamp");
                let value = pair[1].as_str().expect("a sample's value");
                ((ts * 1000.0).round() as u64, value.parse().unwrap())
            })
            .collect()
    }

    /// What Prometheus says about its scrape target: health and last error (for messages).
    fn targets(&self) -> String {
        request(self.port, "/api/v1/targets")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// Polls `samples(metric)` until `done` holds for them; fails after [`LIVENESS`] saying
    /// what Prometheus had and thought of its target.
    fn wait_for(
        &self,
        what: &str,
        metric: &str,
        serve: &mut Child,
        done: impl Fn(&[(u64, f64)]) -> bool,
    ) -> Vec<(u64, f64)> {
        let started = Instant::now();
        loop {
            let samples = self.samples(metric);
            if done(&samples) {
                return samples;
            }
            assert!(
                serve.try_wait().unwrap().is_none(),
                "serve exited while waiting for {what}"
            );
            assert!(
                started.elapsed() < LIVENESS,
                "never: {what}; {metric} samples: {samples:?}\ntargets: {}\nprometheus log:\n{}",
                self.targets(),
                std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Percent-encodes a query parameter's value (everything but unreserved characters).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Milliseconds since the epoch, now.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Lines in `path` (missing = 0).
fn lines_in(path: &Path) -> u64 {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
        .unwrap_or(0)
}

/// `promtool check metrics` with `text` on stdin: its exit status and what it said.
fn promtool_check_metrics(text: &str) -> (std::process::ExitStatus, String) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed: ./scripts/test installs it (Debian package prometheus)"
        ),
        Err(e) => panic!("cannot start promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, said)
}

#[test]
fn prometheus_scrapes_as_many_deliveries_as_the_log_holds_and_promtool_accepts_the_exposition() {
    let redis = RedisServer::start();
    let s = Scratch::new();
    s.write(
        "job.toml",
        format!(
            "[inputs]\nusers = \"synthetic:{USERS}\"\n[store]\nurl = \"file:store\"\n\
             [provider]\nurl = \"log:deliveries.jsonl\"\nconcurrency = 1000\n"
        ),
    );
    let url = redis.url(0);
    let args = ["serve", "job.toml", "--campaigns", &url, "--quiet"];
    let (serve, port, _reserved) = start_serve(&s, &args);
    // Killed even if an assertion fails; stopped with SIGTERM at the end.
    let mut serve = KillOnDrop(serve);
    let serve = &mut serve.0;
    let prometheus = Prometheus::start(port);

    // Prometheus reads the counter before anything is sent: it is there, at 0.
    let before = prometheus.wait_for(
        "a first scrape",
        "fanout_deliveries_total",
        serve,
        |samples| !samples.is_empty(),
    );
    assert!(
        before.iter().all(|&(_, v)| v == 0.0),
        "deliveries before any campaign: {before:?}"
    );

    // The fan-out: a promotion to everyone, submitted on the stream.
    let promo = "[[campaign]]\nid = \"promo\"\nkind = \"promotion\"\n\
        start = \"2020-01-01T00:00:00Z\"\nend = \"2100-01-01T00:00:00Z\"\ntitle = \"Sale\"\n\
        body = \"Hi {user.id}\"\n[campaign.audience]\n";
    redis.cli(&["XADD", "fanout:campaigns", "*", "job", promo]);
    let log = s.path("deliveries.jsonl");
    s.wait_for_lines("deliveries.jsonl", USERS as usize, serve);
    // Every user's line is written: the fan-out is over. (Serve acknowledges the stream entry
    // only when its generation ends, up to a minute later, so Redis cannot say so sooner.)
    let ended = now_ms();

    // The independent count: every line a (campaign, user) pair, none twice, everyone.
    let delivered = lines_in(&log);
    let pairs = pairs_once(&read_deliveries(&log));
    let want: BTreeSet<(String, u64)> = (1..=USERS).map(|u| ("promo".to_owned(), u)).collect();
    assert_eq!(
        pairs, want,
        "the delivery log is not the promotion to every user"
    );
    assert_eq!(delivered, USERS);
    let count = delivered as f64;

    // A scrape that started after the last line was written (a sample's timestamp is taken
    // before its request) must come to report the log's count. Not necessarily the first
    // one: a slice of messages is counted just after its line is written, once the ledger
    // has recorded it. A counter that settles below the count fails at the deadline; one that
    // overshoots it or goes down fails at once.
    let counter = |samples: &[(u64, f64)]| {
        assert!(
            samples
                .windows(2)
                .all(|w| w[0].1 <= w[1].1 && w[1].1 <= count),
            "fanout_deliveries_total went down or past the {delivered} lines of the log: \
             {samples:?}"
        );
    };
    let samples = prometheus.wait_for(
        "a scrape after the fan-out reporting the log's count",
        "fanout_deliveries_total",
        serve,
        |samples| {
            counter(samples);
            samples
                .last()
                .is_some_and(|&(ts, v)| ts > ended && v == count)
        },
    );
    // And it stays there: the next scrape too (nothing counted late or twice).
    let (settled, _) = *samples.last().unwrap();
    let samples = prometheus.wait_for(
        "another scrape after the fan-out",
        "fanout_deliveries_total",
        serve,
        |samples| {
            counter(samples);
            samples.last().is_some_and(|&(ts, _)| ts > settled)
        },
    );
    assert!(
        samples.iter().all(|&(ts, v)| ts < settled || v == count),
        "fanout_deliveries_total moved after reaching the log's {delivered}: {samples:?}"
    );
    assert_eq!(lines_in(&log), delivered, "lines written after the fan-out");
    // The plain instant query answers the same.
    let instant = prometheus.query("fanout_deliveries_total");
    assert_eq!(instant.len(), 1, "{instant:?}");
    assert_eq!(instant[0]["metric"]["job"], "fanout");
    assert_eq!(
        instant[0]["value"][1].as_str(),
        Some(delivered.to_string().as_str()),
        "{instant:?}"
    );
    let up = prometheus.query("up{job=\"fanout\"}");
    assert_eq!(up[0]["value"][1], "1", "{up:?}");

    // promtool accepts the exposition text exactly as served (lint warnings would still exit 0).
    let text = get(port, "/metrics");
    let (status, said) = promtool_check_metrics(&text);
    assert!(
        status.success(),
        "promtool check metrics failed ({status:?}):\n{said}\non:\n{text}"
    );
    if !said.trim().is_empty() {
        eprintln!("promtool check metrics (lint, exit 0):\n{said}");
    }

    drop(prometheus);
    let (status, _, err) = sigterm(serve);
    assert!(status.success(), "serve after SIGTERM: {status:?}\n{err}");
}
