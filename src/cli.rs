//! Command-line flags (clap). Parsing only: no I/O happens here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::job::Overrides;

/// fanout: fan campaigns out to millions of users through one timely dataflow.
#[derive(Debug, Parser)]
#[command(name = "fanout", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// One pass: admit the job's campaigns, fan out, drain, exit.
    Run(RunArgs),
    /// Long-running: campaigns and logins as Redis streams, schedules, /metrics and /healthz.
    Serve(ServeArgs),
    /// Dry run: audience sizes, buckets, batches and an ETA; pushes nothing.
    Plan(RunArgs),
    /// Generate inputs.
    #[command(subcommand)]
    Gen(GenCommand),
    /// Print the user ids a campaign was granted to, sorted, one per line.
    Grants(GrantsArgs),
}

/// `fanout gen …`
#[derive(Debug, Subcommand)]
pub enum GenCommand {
    /// Synthetic users, the same ones `synthetic:N:SEED` produces.
    Users {
        /// How many users (ids 1..=N).
        #[arg(long)]
        count: u32,
        /// Generator seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output: a .jsonl or .csv file, or redis://[user:pass@]host:port/db (hashes
        /// fanout:user:{id} and fanout:users:max_id); stdout when omitted or `-`.
        #[arg(long)]
        out: Option<String>,
    },
}

/// `fanout grants …`
#[derive(Debug, Args)]
pub struct GrantsArgs {
    /// The store: file:DIR.
    #[arg(long)]
    pub store: String,
    /// The campaign id.
    #[arg(long)]
    pub campaign: String,
    /// The occurrence, for scheduled campaigns.
    #[arg(long)]
    pub occurrence: Option<String>,
}

/// `fanout serve JOB.toml [overrides] [--listen ADDR]`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The job and its overrides, as for `run`.
    #[command(flatten)]
    pub run: RunArgs,
    /// Where GET /metrics (Prometheus text) and GET /healthz are served.
    #[arg(long, default_value = "127.0.0.1:9898")]
    pub listen: std::net::SocketAddr,
    /// This process's consumer name in the Redis consumer group `fanout`; a restarted
    /// process with the same name takes back the entries it had not finished.
    #[arg(long, default_value = "fanout-serve")]
    pub consumer: String,
}

/// `fanout run|plan JOB.toml [overrides]`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job file.
    pub job: PathBuf,
    /// Users: a .jsonl or .csv path, or synthetic:N[:SEED].
    #[arg(long)]
    pub users: Option<String>,
    /// Login events (coupon on_login only).
    #[arg(long)]
    pub logins: Option<String>,
    /// Campaigns submitted to `serve`: redis://… (its fanout:campaigns stream).
    #[arg(long)]
    pub campaigns: Option<String>,
    /// Pairs granted before fanout existed.
    #[arg(long)]
    pub granted: Option<String>,
    /// The store: file:DIR.
    #[arg(long)]
    pub store: Option<String>,
    /// The provider: log:PATH, log:-, mock:…, http(s)://…, fcm:project=ID[,endpoint=URL].
    #[arg(long)]
    pub provider: Option<String>,
    /// Pushes in flight at once.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Worker threads (default: the machine's cores).
    #[arg(short = 'w', long)]
    pub workers: Option<usize>,
    /// Clock override, RFC 3339.
    #[arg(long)]
    pub now: Option<String>,
    /// Users (ids) per bucket.
    #[arg(long)]
    pub bucket_size: Option<u32>,
    /// Messages per provider batch.
    #[arg(long)]
    pub batch_max_messages: Option<usize>,
    /// Serialized bytes per provider batch.
    #[arg(long)]
    pub batch_max_bytes: Option<usize>,
    /// Pushes per second, 0 = unlimited.
    #[arg(long)]
    pub rate_per_s: Option<u64>,
    /// Attempts per message for retryable failures.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Where dead letters go.
    #[arg(long)]
    pub dead_letter: Option<String>,
    /// Login events fed to the dataflow per epoch.
    #[arg(long)]
    pub logins_per_epoch: Option<usize>,
    /// Run one process of a timely cluster of this many processes (every process gets the
    /// same job file and inputs).
    #[arg(long)]
    pub processes: Option<usize>,
    /// This process's index in the cluster, 0..processes. Process 0 writes the summary.
    #[arg(long)]
    pub process: Option<usize>,
    /// The cluster's addresses: one host:port a line, in process order (default
    /// 127.0.0.1:2101, 2102, …).
    #[arg(long)]
    pub hostfile: Option<PathBuf>,
    /// How long a process waits for its peers to connect, e.g. 60s (the default).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub peer_wait: Option<std::time::Duration>,
    /// Write the run summary as JSON here.
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// No progress bar, no report on stderr.
    #[arg(short, long)]
    pub quiet: bool,
    /// Count and report bad input lines instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Send the dead-lettered users of each campaign once more (after fixing tokens or the
    /// provider): they become claimable again at the start of the run.
    #[arg(long)]
    pub retry_dead_letters: bool,
}

impl RunArgs {
    /// Which process of which cluster the flags describe.
    pub fn cluster(&self) -> crate::Result<crate::run::cluster::Cluster> {
        crate::run::cluster::Cluster::from_flags(
            self.processes,
            self.process,
            self.hostfile.as_deref(),
            self.peer_wait,
        )
    }

    /// The values that override the job file.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            users: self.users.clone(),
            logins: self.logins.clone(),
            campaigns: self.campaigns.clone(),
            granted: self.granted.clone(),
            store: self.store.clone(),
            provider: self.provider.clone(),
            concurrency: self.concurrency,
            workers: self.workers,
            now: self.now.clone(),
            bucket_size: self.bucket_size,
            batch_max_messages: self.batch_max_messages,
            batch_max_bytes: self.batch_max_bytes,
            rate_per_s: self.rate_per_s,
            max_attempts: self.max_attempts,
            dead_letter: self.dead_letter.clone(),
            logins_per_epoch: self.logins_per_epoch,
        }
    }
}
