//! One job across several processes: a timely cluster (`--processes N --process I
//! --hostfile F`).
//!
//! Every process reads the same job file. Process `I` of `N` owns the buckets `b` with
//! `b % N == I` ([`Route`], [`Placement`]), whatever the worker count: it loads only their
//! users, feeds only their scans, and (with the embedded store) keeps their ledger in its own
//! subdirectory `DIR/process-I`. `DIR/PROCESSES` records `N`, so a re-run with another process
//! count — whose buckets would map to other processes — is refused; a re-run with another `-w`
//! is not (its buckets stay put). The Redis store is shared as it is by concurrent runs.
//!
//! [`execute`] runs a process's share of the dataflow as a member of the cluster (the job's
//! fingerprint checked first, the tallies gathered on process 0 last). A process that starts
//! before its peers waits for them at most [`Cluster::wait`], then stops
//! with exit 1 instead of hanging ([`launch`]).

use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::driver::Feed;
use crate::dataflow::Context;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::metrics::Tally;
use crate::model::{Buckets, Placement, Route};

/// How long a process waits for its peers by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// The first port of the default addresses, like timely's own: `127.0.0.1:2101 + i`.
const DEFAULT_PORT: u16 = 2101;
/// The embedded store's record of how many processes share it.
const MARKER: &str = "PROCESSES";

/// Which process of which cluster this is. The default is a single process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Processes in the cluster (1: no cluster).
    pub processes: usize,
    /// This process's index, `0 .. processes`.
    pub process: usize,
    /// `host:port` of every process, in process order.
    pub addresses: Vec<String>,
    /// How long to wait for the peers to connect.
    pub wait: Duration,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            processes: 1,
            process: 0,
            addresses: Vec::new(),
            wait: DEFAULT_WAIT,
        }
    }
}

impl Cluster {
    /// The cluster the flags describe. Without a hostfile the addresses are
    /// `127.0.0.1:2101 + i`. Bad flags or a bad hostfile are usage errors (exit 2).
    pub fn from_flags(
        processes: Option<usize>,
        process: Option<usize>,
        hostfile: Option<&Path>,
        wait: Option<Duration>,
    ) -> Result<Cluster> {
        let n = processes.unwrap_or(1);
        if n == 0 {
            return Err(Error::Usage("--processes must be at least 1".into()));
        }
        let i = match (processes, process) {
            (_, Some(i)) if i >= n => {
                return Err(Error::Usage(format!(
                    "--process {i} is out of range: processes are numbered 0..{n}"
                )))
            }
            (Some(n), None) if n > 1 => {
                return Err(Error::Usage(format!(
                    "--processes {n} needs --process I (0..{n}): which process this is"
                )))
            }
            (_, i) => i.unwrap_or(0),
        };
        let addresses = match hostfile {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Error::Usage(format!("hostfile {}: cannot read: {e}", path.display()))
                })?;
                parse_hostfile(&path.display().to_string(), &text, n)?
            }
            None if n == 1 => Vec::new(), // no cluster, no network
            None => (0..n)
                .map(|p| {
                    match u16::try_from(p)
                        .ok()
                        .and_then(|p| DEFAULT_PORT.checked_add(p))
                    {
                        Some(port) => Ok(format!("127.0.0.1:{port}")),
                        None => Err(Error::Usage(format!(
                            "--processes {n}: too many for the default ports; give a --hostfile"
                        ))),
                    }
                })
                .collect::<Result<_>>()?,
        };
        Ok(Cluster {
            processes: n,
            process: i,
            addresses,
            wait: wait.unwrap_or(DEFAULT_WAIT),
        })
    }

    /// Whether this is one process of several.
    pub fn is_cluster(&self) -> bool {
        self.processes > 1
    }

    /// This process as a store sees it (which users it owns); `None` for a single process.
    pub fn member(&self, buckets: Buckets) -> Option<crate::store::Member> {
        self.route(buckets).map(|route| crate::store::Member {
            process: self.process,
            processes: self.processes,
            route,
        })
    }

    /// The buckets this process owns; `None` for a single process (it owns every bucket).
    pub fn route(&self, buckets: Buckets) -> Option<Route> {
        self.is_cluster()
            .then(|| Route::process(buckets, self.processes, self.process))
    }

    /// Which worker of the cluster owns each bucket, with `workers` per process.
    pub fn placement(&self, buckets: Buckets, workers: usize) -> Placement {
        Placement::new(buckets, self.processes, workers)
    }

    /// The timely configuration of this process with `workers` worker threads.
    pub fn config(&self, workers: usize) -> timely::Config {
        let workers = workers.max(1);
        let communication = if self.is_cluster() {
            timely::CommunicationConfig::Cluster {
                threads: workers,
                process: self.process,
                addresses: self.addresses.clone(),
                report: false,
                zerocopy: false,
            }
        } else if workers == 1 {
            timely::CommunicationConfig::Thread
        } else {
            timely::CommunicationConfig::Process(workers)
        };
        timely::Config {
            communication,
            worker: timely::WorkerConfig::default(),
        }
    }

    /// The store this process writes to. `file:DIR` of a cluster becomes `file:DIR/process-I`
    /// (each process's users' ledgers apart), after checking `DIR/PROCESSES` against the
    /// process count; a store written with another count is refused (exit 2). Any other URL
    /// (Redis) is shared as it is.
    pub fn store_url(&self, url: &str) -> Result<String> {
        let Some(dir) = crate::store::file_dir(url) else {
            return Ok(url.to_owned());
        };
        let dir = Path::new(dir);
        let marker = dir.join(MARKER);
        let recorded = match std::fs::read_to_string(&marker) {
            Ok(text) => Some(text.trim().parse::<usize>().map_err(|_| {
                Error::Usage(format!(
                    "store {url}: {} should hold a process count, holds {:?}",
                    marker.display(),
                    text.trim()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(Error::runtime(format!(
                    "cannot read {}: {e}",
                    marker.display()
                )))
            }
        };
        let refuse = |was: usize| {
            Error::Usage(format!(
                "store {url} was written by a cluster of {was} process(es) and this run has {}: \
                 each process keeps the ledger of its own buckets, which another count would \
                 route elsewhere. Re-run with --processes {was}, or use a new store directory \
                 (or the Redis store, which any count shares)",
                self.processes
            ))
        };
        match recorded {
            Some(was) if was != self.processes => return Err(refuse(was)),
            Some(_) => {}
            None if !self.is_cluster() => return Ok(url.to_owned()),
            None => {
                let ledgers = dir.join("ledgers");
                let used = std::fs::read_dir(&ledgers)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(false);
                if used {
                    return Err(refuse(1));
                }
                write_marker(dir, &marker, self.processes, self.process)?;
            }
        }
        if !self.is_cluster() {
            return Ok(url.to_owned());
        }
        let sub = dir.join(format!("process-{}", self.process));
        Ok(format!("file:{}", sub.display()))
    }

    /// The error when process `other` runs another job than this one (exit 2).
    pub fn disagreement(&self, other: usize) -> Error {
        Error::Usage(format!(
            "process {other} of the cluster runs another job than process {}: every process \
             needs the same job file, inputs, -w and overrides, and the same clock (pass the \
             same --now to all when a campaign window or schedule tick may pass between \
             their starts)",
            self.process
        ))
    }

    /// A worker failure in words: in a cluster it is most often a peer that stopped.
    pub fn worker_failure(&self, e: &str) -> Error {
        if self.is_cluster() {
            Error::runtime(format!(
                "a worker of process {} failed ({e}); in a cluster this usually means a peer \
                 process stopped or was killed (see its own output). Re-run every process: \
                 nothing delivered is sent again",
                self.process
            ))
        } else {
            Error::runtime(format!("a worker failed: {e}"))
        }
    }
}

/// What one process of a cluster shares with its timely workers.
pub struct Shared {
    /// [`fingerprint`] of the job as this process sees it.
    pub fingerprint: u32,
    /// On process 0, the other processes' counters at the end of the run.
    pub tallies: std::sync::Mutex<Vec<Tally>>,
}

/// A checksum of what the processes of a cluster must agree on: inputs, bucketing, workers,
/// batching, and each run target (`targets`, in order: id, content, occurrence, kind of
/// run), so records naming targets by index mean the same everywhere.
pub fn fingerprint(job: &Job, targets: impl Iterator<Item = String>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let e = &job.engine;
    h.update(
        format!(
            "{:?}|{}|{}|{}|{}|{}",
            job.inputs,
            e.bucket_size,
            e.workers,
            e.batch_max_messages,
            e.batch_max_bytes,
            e.logins_per_epoch
        )
        .as_bytes(),
    );
    for t in targets {
        h.update(b"\n");
        h.update(t.as_bytes());
    }
    h.finalize()
}

/// The stores to read for `url`: `file:DIR/process-I` for every process of a cluster that
/// split `file:DIR` (see [`Cluster::store_url`]), else `url` itself.
pub fn store_parts(url: &str) -> Result<Vec<String>> {
    let Some(dir) = crate::store::file_dir(url) else {
        return Ok(vec![url.to_owned()]);
    };
    let marker = Path::new(dir).join(MARKER);
    match std::fs::read_to_string(&marker) {
        Ok(text) => {
            let n: usize = text.trim().parse().map_err(|_| {
                Error::Usage(format!(
                    "store {url}: {} is not a process count",
                    marker.display()
                ))
            })?;
            Ok((0..n)
                .map(|i| {
                    format!(
                        "file:{}",
                        Path::new(dir).join(format!("process-{i}")).display()
                    )
                })
                .collect())
        }
        Err(_) => Ok(vec![url.to_owned()]),
    }
}

/// Writes `DIR/PROCESSES` atomically (every process of a new cluster may write it at once).
fn write_marker(dir: &Path, marker: &Path, processes: usize, process: usize) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::runtime(format!("cannot create {}: {e}", dir.display())))?;
    let tmp = dir.join(format!("{MARKER}.{process}.tmp"));
    std::fs::write(&tmp, format!("{processes}\n"))
        .and_then(|()| std::fs::rename(&tmp, marker))
        .map_err(|e| Error::runtime(format!("cannot write {}: {e}", marker.display())))
}

/// The addresses of a hostfile: one `host:port` a line (blank lines and `#` comments
/// skipped), at least `processes` of them; the first `processes` are used.
pub fn parse_hostfile(name: &str, text: &str, processes: usize) -> Result<Vec<String>> {
    let mut addresses = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let ok = line.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
        });
        if !ok {
            return Err(Error::Usage(format!(
                "{name}:{}: expected host:port (e.g. 10.0.0.5:2101), found {line:?}",
                no + 1
            )));
        }
        addresses.push(line.to_owned());
    }
    if addresses.len() < processes {
        return Err(Error::Usage(format!(
            "{name}: {} address(es) for --processes {processes}: one host:port a line, one per process",
            addresses.len()
        )));
    }
    addresses.truncate(processes);
    Ok(addresses)
}

/// Runs the dataflow on `workers` threads of this process (one process of `cluster`). The
/// processes first check that they agree on `shared.fingerprint`; the tallies the other
/// processes send at the end land in `shared.tallies` (on process 0).
pub fn execute(
    cluster: &Cluster,
    ctx: Arc<Context>,
    feed: Arc<Feed>,
    shared: Arc<Shared>,
) -> Result<()> {
    let workers = ctx.placement.workers;
    let config = cluster.config(workers);
    let (me, failure) = (cluster.clone(), cluster.clone());
    let failed = {
        let ctx = ctx.clone();
        move || ctx.failed()
    };
    launch(cluster, workers, failed, move |events| {
        let events = Mutex::new(events);
        let tell = move |e| {
            if let Ok(tx) = events.lock() {
                let _ = tx.send(e);
            }
        };
        let guards = timely::execute(config, move |worker| {
            tell(Event::Started);
            let ended = Ended {
                tell: &tell,
                ctx: &ctx,
                cluster: &me,
            };
            // One worker of each process speaks for it.
            let first = worker.index() % workers == 0;
            if me.is_cluster() {
                let fp = shared.fingerprint;
                let all =
                    crate::dataflow::gather::everyone(worker, first.then_some((me.process, fp)));
                if let Some((other, _)) = all.iter().find(|(_, f)| *f != fp) {
                    ctx.fail(me.disagreement(*other));
                    // Every process finds the same disagreement; none leaves before all have
                    // (a second round), since one that exits closes its connections and a
                    // peer's network thread may then fail on that before its worker read the
                    // fingerprints (a panic, exit 1, not the disagreement's exit 2). A failure
                    // in this round leaves the disagreement recorded first.
                    crate::dataflow::gather::everyone(worker, first.then_some((me.process, fp)));
                }
            }
            if !ctx.failed() {
                super::driver::drive(worker, ctx.clone(), feed.clone());
            }
            if me.is_cluster() && !ctx.failed() {
                let mine = (first && me.process != 0)
                    .then(|| ctx.metrics.tally(ctx.targets.iter().map(|rt| &rt.stats)));
                let got = crate::dataflow::gather::gather(worker, mine);
                if let Ok(mut g) = shared.tallies.lock() {
                    g.extend(got);
                }
            }
            drop(ended);
            if me.is_cluster() && ctx.failed() {
                hold_connections();
            }
        })
        .map_err(|e| Error::runtime(format!("cannot start timely workers: {e}")))?;
        for result in guards.join() {
            result.map_err(|e| failure.worker_failure(&e))?;
        }
        Ok(())
    })
}

/// Tells [`launch`] that a worker ended, however it ends. A worker that panics (in a cluster,
/// a peer's lost connection poisons timely's channels) counts too, and fails the run: else
/// its process, whose other workers may be holding their connections, would wait for it
/// forever, and so would its peers (seen in the soak: seed 1740).
struct Ended<'a> {
    tell: &'a (dyn Fn(Event) + Sync),
    ctx: &'a Context,
    cluster: &'a Cluster,
}

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.ctx
                .fail(self.cluster.worker_failure("the worker panicked"));
        }
        (self.tell)(Event::Finished);
    }
}

/// What the worker threads tell [`launch`].
pub enum Event {
    /// A worker is running: the cluster is connected.
    Started,
    /// A worker returned.
    Finished,
}

/// Runs `start` (which calls `timely::execute` and joins the workers) on its own thread and
/// waits: at most `wait` for the first worker to start (the peers to connect) when `cluster`,
/// then until the workers finish. When every local worker has finished and `failed()` says
/// the run failed, returns without joining timely's network threads, which would wait for
/// peers that may never finish; the caller reports the failure and exits.
pub fn launch(
    cluster: &Cluster,
    workers: usize,
    failed: impl Fn() -> bool,
    start: impl FnOnce(mpsc::Sender<Event>) -> Result<()> + Send + 'static,
) -> Result<()> {
    let (events, rx) = mpsc::channel();
    let (done_tx, done) = mpsc::channel();
    std::thread::Builder::new()
        .name("fanout-timely".into())
        .spawn(move || {
            let _ = done_tx.send(start(events));
        })
        .map_err(|e| Error::runtime(format!("cannot start the timely thread: {e}")))?;
    let deadline = cluster.is_cluster().then(|| Instant::now() + cluster.wait);
    let mut started = false;
    let mut finished = 0;
    loop {
        if let Ok(result) = done.try_recv() {
            return result;
        }
        let tick = Duration::from_millis(50);
        match rx.recv_timeout(tick) {
            Ok(Event::Started) => started = true,
            Ok(Event::Finished) => finished += 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Every worker is gone; the result comes (or the joining thread panicked).
                return done.recv().unwrap_or_else(|_| {
                    Err(cluster.worker_failure("the timely runtime panicked"))
                });
            }
        }
        // Checked on every tick, not only as a worker finishes: the failure may be recorded
        // after the last worker said it finished (a store sync failing on the runtime) and
        // before that worker looked, and then it holds its connections and never ends.
        if finished >= workers && failed() {
            return Ok(());
        }
        if let Some(deadline) = deadline.filter(|_| !started) {
            if Instant::now() >= deadline {
                return Err(Error::runtime(format!(
                    "process {} of {} waited {} s for its peers at {} and gave up: start every \
                     process of the cluster (same job, same --processes, its own --process) \
                     within that time, or raise --peer-wait",
                    cluster.process,
                    cluster.processes,
                    cluster.wait.as_secs(),
                    cluster.addresses.join(", ")
                )));
            }
        }
    }
}

/// Never returns: a worker of a process whose run failed parks here instead of ending. A
/// worker that ends closes its connections to the peers cleanly, and a peer waiting for its
/// progress would then wait forever; held open until the process exits (with exit 1, [`launch`]
/// returns without waiting for the workers), they close abruptly and every peer stops with
/// exit 1 ("a peer process stopped").
pub fn hold_connections() -> ! {
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A runtime for a test's context (nothing is spawned on it).
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    /// A context for a run of ten synthetic users, pushing nowhere.
    fn context(runtime: &tokio::runtime::Runtime) -> Arc<Context> {
        use crate::providers::{dispatch::Dispatcher, mock::MockProvider};
        let (source, _) =
            crate::sources::UserSource::open("synthetic:10", &Default::default()).unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let provider = Box::new(MockProvider::parse("latency=0ms").unwrap());
        let engine = super::super::prepare::Engine {
            source,
            placement: Placement::new(Buckets::new(1000), 1, 1),
            dispatcher: Arc::new(Dispatcher::new(
                provider,
                1,
                0,
                1,
                "dead.jsonl",
                metrics.clone(),
            )),
            metrics,
            runtime: runtime.handle().clone(),
            sizing: super::super::prepare::Sizing {
                workers: 1,
                concurrency: 1,
                users_per_epoch: 10,
                logins_per_epoch: 10,
                batch_max_messages: 10,
                batch_max_bytes: 1000,
                task_users: 10,
                max_in_flight: 10,
            },
            cut: Default::default(),
        };
        engine.context(Vec::new(), None, crate::dataflow::halts::OnPause::Wait)
    }

    /// Seed 1740's hang, the second one: a worker of a failed cluster process panicked (its
    /// peer's connection was gone) and never said it finished, so `launch` waited for it
    /// while the others held their connections. A worker's end is told however it ends, and
    /// a panic fails the run.
    #[test]
    fn a_panicking_worker_is_counted_as_finished_and_fails_the_run() {
        let runtime = runtime();
        let ctx = context(&runtime);
        let (tx, rx) = mpsc::channel();
        let tell = move |e| {
            let _ = tx.send(e);
        };
        let (ctx2, cluster) = (ctx.clone(), Cluster::default());
        let worker = std::thread::spawn(move || {
            let _ended = Ended {
                tell: &tell,
                ctx: &ctx2,
                cluster: &cluster,
            };
            panic!("a lost peer");
        });
        assert!(worker.join().is_err());
        assert!(matches!(rx.try_recv(), Ok(Event::Finished)));
        assert!(ctx.failed());
    }

    /// Seed 171's hang (under load): a failed process's worker said it finished, `launch`
    /// returned and the run took its failure before the worker looked whether to hold its
    /// connections; reading "not failed", it ended them cleanly and its peer waited forever.
    /// A failure, once recorded, reads as failed after it is taken.
    #[test]
    fn a_worker_that_looks_after_the_failure_is_taken_still_holds() {
        let runtime = runtime();
        let ctx = context(&runtime);
        assert!(!ctx.failed());
        ctx.fail(Error::runtime("cannot append: no space left on device"));
        assert!(ctx.take_failure().is_err());
        assert!(ctx.failed(), "the worker would end its connections cleanly");
        assert!(ctx.take_failure().is_ok(), "the error is reported once");
    }

    /// The soak's hang: every worker said it finished, then the run failed (a store sync on
    /// the runtime), and the workers that looked after that hold their connections and never
    /// end. `launch` must still return, so the process exits and its peers stop.
    #[test]
    fn launch_returns_when_the_run_fails_after_every_worker_finished() {
        let failed = Arc::new(AtomicBool::new(false));
        let set = failed.clone();
        let started = Instant::now();
        let result = launch(
            &Cluster::default(),
            2,
            move || failed.load(Ordering::SeqCst),
            move |events| {
                for e in [Event::Started, Event::Finished, Event::Finished] {
                    let _ = events.send(e);
                }
                std::thread::sleep(Duration::from_millis(200));
                set.store(true, Ordering::SeqCst);
                // Holds the events channel open and never returns, as a held worker does.
                loop {
                    std::thread::park();
                }
            },
        );
        assert!(result.is_ok());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn hostfiles_name_the_bad_line() {
        let ok = parse_hostfile("h", "# cluster\n\n10.0.0.1:2101\n  host-b:2102 \nc:3\n", 2);
        assert_eq!(ok.unwrap(), ["10.0.0.1:2101", "host-b:2102"]);
        for (text, line) in [
            ("a:1\nb\n", 2),
            ("a:1\nb:x\n", 2),
            (":1\n", 1),
            ("a:70000\n", 1),
            ("a b:1\n", 1),
        ] {
            let e = parse_hostfile("hosts.txt", text, 1).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains(&format!("hosts.txt:{line}:")), "{e}");
        }
        let e = parse_hostfile("hosts.txt", "a:1\n", 2).unwrap_err();
        assert!(
            e.to_string().contains("1 address(es) for --processes 2"),
            "{e}"
        );
    }

    #[test]
    fn flags_default_to_timely_addresses_and_check_the_index() {
        let c = Cluster::from_flags(Some(3), Some(2), None, None).unwrap();
        assert_eq!(
            c.addresses,
            ["127.0.0.1:2101", "127.0.0.1:2102", "127.0.0.1:2103"]
        );
        assert_eq!(
            Cluster::from_flags(None, None, None, None).unwrap(),
            Cluster::default()
        );
        for (n, i) in [
            (Some(2), Some(2)),
            (Some(0), None),
            (Some(2), None),
            (None, Some(1)),
        ] {
            let e = Cluster::from_flags(n, i, None, None).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{n:?} {i:?}");
        }
    }

    #[test]
    fn a_file_store_remembers_its_process_count() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file:{}", dir.path().join("s").display());
        let two = |i| Cluster::from_flags(Some(2), Some(i), None, None).unwrap();
        let p1 = two(1).store_url(&url).unwrap();
        assert_eq!(p1, format!("{url}/process-1"));
        assert_eq!(two(0).store_url(&url).unwrap(), format!("{url}/process-0"));
        let three = Cluster::from_flags(Some(3), Some(0), None, None).unwrap();
        for other in [three, Cluster::default()] {
            let e = other.store_url(&url).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains("cluster of 2 process(es)"), "{e}");
        }
        // A store a single process wrote is not split after the fact.
        let single = format!("file:{}", dir.path().join("one").display());
        std::fs::create_dir_all(dir.path().join("one/ledgers")).unwrap();
        std::fs::write(dir.path().join("one/ledgers/x.log"), b"").unwrap();
        assert_eq!(Cluster::default().store_url(&single).unwrap(), single);
        assert!(two(0).store_url(&single).is_err());
        let redis = "redis://127.0.0.1:6379/0";
        assert_eq!(two(1).store_url(redis).unwrap(), redis);
    }
}
