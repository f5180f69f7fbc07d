//! Command-line flags (clap). Parsing only: no I/O happens here.
//!
//! Each subcommand shows and accepts exactly the flags it uses. Flags that several share are
//! defined once, in a group flattened into each of them: [`JobArgs`] (run, serve, plan),
//! [`PushArgs`] (run, serve), [`ClockArgs`] (run, plan), [`ClusterArgs`] (run), [`StoreArg`]
//! (the `campaigns` commands).
//!
//! Every flag may also come from the environment variable `FANOUT_<FLAG>` (`--store` from
//! `FANOUT_STORE`, `-w` from `FANOUT_WORKERS`); a flag on the command line wins. Help never
//! shows those variables' values (a store URL may carry a password).

use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::job::Overrides;

/// What `fanout --help` says after the commands: inputs, environment, exit codes.
const AFTER_HELP: &str = "\
Inputs and stores:
  users     a .jsonl or .csv file, synthetic:N[:SEED], or redis://[user:pass@]host:port/db
            (hashes fanout:user:{id}, fanout:users:max_id)
  logins    a .jsonl file, or redis://… (the stream fanout:logins)
  campaigns (serve) redis://… (the stream fanout:campaigns)
  store     file:DIR (embedded, the default file:.fanout), redis://… or rediss://… (TLS)
  provider  log:PATH, log:-, mock:…, http(s)://…, fcm:project=ID[,endpoint=URL]

Environment:
  Every flag may come from FANOUT_<FLAG> instead: FANOUT_STORE for --store, FANOUT_WORKERS
  for -w/--workers, FANOUT_SKIP_BAD_LINES=true for --skip-bad-lines…; the flag wins.
  Secrets come only from the environment and are never printed: FANOUT_REDIS_PASSWORD,
  FANOUT_FCM_TOKEN. RUST_LOG sets the log level (default warn).

Exit codes:
  0    done
  1    runtime failure: store or provider unreachable past retries, our credentials
       refused, the provider failing systemically, a crash
  2    bad usage or bad input (the message names file, line and field)
  3    a campaign rejected as a duplicate of one admitted in the last 30 minutes
  130  interrupted (SIGINT/SIGTERM): drained, partial summary written; re-run to finish

The whole contract (job file, record formats, Redis keys): docs/cli.md.";

/// Help headings of the flag groups.
const JOB_OVERRIDES: &str = "Job overrides";
const PUSH_OVERRIDES: &str = "Push overrides";
const CLUSTER: &str = "Cluster";

/// What each job-running command's help says after its flags.
const JOB_AFTER_HELP: &str = "\
Values given here (or in FANOUT_<FLAG>) override the job file's.
Exit codes: 0 done, 1 runtime failure, 2 bad usage or input, 3 duplicate campaign,
130 interrupted. See `fanout --help` and docs/cli.md.";

/// fanout: fan campaigns out to millions of users through one timely dataflow.
#[derive(Debug, Parser)]
#[command(name = "fanout", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// Log lines on stderr: text, or json (one object a line) for a log collector; RUST_LOG
    /// picks which lines (default: warnings and errors).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "FANOUT_LOG_FORMAT",
        hide_env_values = true
    )]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line (tracing-subscriber's json format).
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// One pass: admit the job's campaigns, fan out, drain, exit.
    #[command(after_help = JOB_AFTER_HELP)]
    Run(RunArgs),
    /// Long-running: campaigns and logins as Redis streams, schedules, a status page, /metrics
    /// and /healthz.
    #[command(after_help = JOB_AFTER_HELP)]
    Serve(ServeArgs),
    /// Dry run: audience sizes, buckets, batches and an ETA; pushes nothing.
    #[command(after_help = JOB_AFTER_HELP)]
    Plan(PlanArgs),
    /// Generate inputs.
    #[command(subcommand)]
    Gen(GenCommand),
    /// Print the user ids a campaign was granted to, sorted, one per line.
    Grants(GrantsArgs),
    /// A campaign's outcome counts; with --conversions, its lift against the held-out users.
    Report(ReportArgs),
    /// The campaigns a store admitted: list them, show one, pause, resume or cancel one.
    #[command(subcommand, after_help = CAMPAIGNS_AFTER_HELP)]
    Campaigns(CampaignsCommand),
}

/// What `fanout campaigns --help` says after the commands.
const CAMPAIGNS_AFTER_HELP: &str = "\
A change (pause, resume, cancel) is recorded durably when the command returns; it needs no
lock, so it works while a run holds the store. Every run and serve using the store sees it
within 50 ms: a paused campaign is claimed no more and its pushes not yet attempted wait (a
run waits for resume or cancel); a cancelled one's users not yet pushed end as cancelled.
cancel is final. done is derived: the window ended, nothing in flight.
Exit codes: 0 done, 1 store unreachable, 2 bad usage or an unknown campaign id.";

/// `fanout campaigns …`
#[derive(Debug, Subcommand)]
pub enum CampaignsCommand {
    /// Every campaign the store has a record of: kind, priority, state, window, outcomes.
    List {
        /// Which store.
        #[command(flatten)]
        store: StoreArg,
        /// Print JSON instead of the table.
        #[arg(
            long,
            env = "FANOUT_CAMPAIGNS_JSON",
            hide_env_values = true,
            value_parser = BoolishValueParser::new()
        )]
        json: bool,
    },
    /// One campaign: state, outcome counts, window; rate and ETA where known.
    Show {
        /// The campaign id.
        id: String,
        /// Which store.
        #[command(flatten)]
        store: StoreArg,
        /// Print JSON instead of text.
        #[arg(
            long,
            env = "FANOUT_CAMPAIGNS_JSON",
            hide_env_values = true,
            value_parser = BoolishValueParser::new()
        )]
        json: bool,
    },
    /// Pause a campaign: nothing more of it is claimed or pushed until it is resumed.
    Pause(ChangeArgs),
    /// Resume a paused campaign where it stopped.
    Resume(ChangeArgs),
    /// Cancel a campaign for good: its users not yet pushed end as cancelled.
    Cancel(ChangeArgs),
}

/// The store a `campaigns` command reads or changes.
#[derive(Debug, Args)]
pub struct StoreArg {
    /// The store: file:DIR, redis://[user:pass@]host:port/db or rediss://….
    #[arg(
        long,
        default_value = "file:.fanout",
        env = "FANOUT_STORE",
        hide_env_values = true
    )]
    pub store: String,
}

/// `fanout campaigns pause|resume|cancel ID`
#[derive(Debug, Args)]
pub struct ChangeArgs {
    /// The campaign id.
    pub id: String,
    /// Which store.
    #[command(flatten)]
    pub store: StoreArg,
}

/// `fanout gen …`
#[derive(Debug, Subcommand)]
pub enum GenCommand {
    /// Synthetic users, the same ones `synthetic:N:SEED` produces.
    Users {
        /// How many users (ids 1..=N).
        #[arg(long, env = "FANOUT_COUNT", hide_env_values = true)]
        count: u32,
        /// Generator seed.
        #[arg(long, default_value_t = 0, env = "FANOUT_SEED", hide_env_values = true)]
        seed: u64,
        /// Output: a .jsonl or .csv file, or redis://[user:pass@]host:port/db (hashes
        /// fanout:user:{id} and fanout:users:max_id); stdout when omitted or `-`.
        #[arg(long, env = "FANOUT_OUT", hide_env_values = true)]
        out: Option<String>,
    },
}

/// `fanout grants …`
#[derive(Debug, Args)]
pub struct GrantsArgs {
    /// The store: file:DIR, redis://[user:pass@]host:port/db or rediss://….
    #[arg(long, env = "FANOUT_STORE", hide_env_values = true)]
    pub store: String,
    /// The campaign id.
    #[arg(long, env = "FANOUT_CAMPAIGN", hide_env_values = true)]
    pub campaign: String,
    /// The occurrence of a scheduled campaign (hot product): its tick's start, RFC 3339.
    #[arg(long, env = "FANOUT_OCCURRENCE", hide_env_values = true)]
    pub occurrence: Option<String>,
}

/// `fanout report …`
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The store: file:DIR, redis://[user:pass@]host:port/db or rediss://….
    #[arg(long, env = "FANOUT_STORE", hide_env_values = true)]
    pub store: String,
    /// The campaign id.
    #[arg(long, env = "FANOUT_CAMPAIGN", hide_env_values = true)]
    pub campaign: String,
    /// The occurrence of a scheduled campaign (hot product): its tick's start, RFC 3339.
    #[arg(long, env = "FANOUT_OCCURRENCE", hide_env_values = true)]
    pub occurrence: Option<String>,
    /// Conversion events, JSON Lines {"user": 42, "ts": "RFC 3339"}: compare the conversion
    /// rate of delivered users with that of held-out users (lift, 95% CI).
    #[arg(long, env = "FANOUT_CONVERSIONS", hide_env_values = true)]
    pub conversions: Option<String>,
    /// Also write the report as JSON to this file; `-` writes it to stdout instead of the text.
    #[arg(long, env = "FANOUT_JSON", hide_env_values = true)]
    pub json: Option<String>,
}

/// `fanout run JOB.toml [flags]`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job and the overrides every job command takes.
    #[command(flatten)]
    pub job: JobArgs,
    /// Overrides of how messages are pushed.
    #[command(flatten)]
    pub push: PushArgs,
    /// The clock.
    #[command(flatten)]
    pub clock: ClockArgs,
    /// One process of a cluster.
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Write the run summary as JSON here.
    #[arg(long, env = "FANOUT_SUMMARY", hide_env_values = true)]
    pub summary: Option<PathBuf>,
    /// Send the dead-lettered users of each campaign once more (after fixing tokens or the
    /// provider): they become claimable again at the start of the run.
    #[arg(
        long,
        env = "FANOUT_RETRY_DEAD_LETTERS",
        hide_env_values = true,
        value_parser = BoolishValueParser::new()
    )]
    pub retry_dead_letters: bool,
}

/// `fanout plan JOB.toml [flags]`
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The job and the overrides every job command takes.
    #[command(flatten)]
    pub job: JobArgs,
    /// The clock.
    #[command(flatten)]
    pub clock: ClockArgs,
    /// Write the plan as JSON here.
    #[arg(long, env = "FANOUT_SUMMARY", hide_env_values = true)]
    pub summary: Option<PathBuf>,
}

/// `fanout serve JOB.toml [flags]`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The job and the overrides every job command takes.
    #[command(flatten)]
    pub job: JobArgs,
    /// Overrides of how messages are pushed.
    #[command(flatten)]
    pub push: PushArgs,
    /// Campaigns submitted while serving: redis://… (its fanout:campaigns stream). Without
    /// it (or inputs.campaigns in the job), serve reads no stream of campaigns.
    #[arg(long, env = "FANOUT_CAMPAIGNS", hide_env_values = true, help_heading = JOB_OVERRIDES)]
    pub campaigns: Option<String>,
    /// Where the status page, /metrics (Prometheus text) and /healthz are served.
    #[arg(
        long,
        default_value = "127.0.0.1:9898",
        env = "FANOUT_LISTEN",
        hide_env_values = true
    )]
    pub listen: std::net::SocketAddr,
    /// This process's consumer name in the Redis consumer group `fanout`; a restarted
    /// process with the same name takes back the entries it had not finished.
    #[arg(
        long,
        default_value = "fanout-serve",
        env = "FANOUT_CONSUMER",
        hide_env_values = true
    )]
    pub consumer: String,
}

/// The job file and the flags every command that runs one takes (`run`, `serve`, `plan`).
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job file (TOML).
    pub job: PathBuf,
    /// Users: a .jsonl or .csv file, synthetic:N[:SEED], or redis://[user:pass@]host:port/db.
    #[arg(long, env = "FANOUT_USERS", hide_env_values = true, help_heading = JOB_OVERRIDES)]
    pub users: Option<String>,
    /// Login events (coupon on_login only): a .jsonl file or redis://… (fanout:logins).
    #[arg(long, env = "FANOUT_LOGINS", hide_env_values = true, help_heading = JOB_OVERRIDES)]
    pub logins: Option<String>,
    /// Pairs granted before fanout existed: a .jsonl file.
    #[arg(long, env = "FANOUT_GRANTED", hide_env_values = true, help_heading = JOB_OVERRIDES)]
    pub granted: Option<String>,
    /// The store: file:DIR, redis://[user:pass@]host:port/db or rediss://….
    #[arg(long, env = "FANOUT_STORE", hide_env_values = true, help_heading = JOB_OVERRIDES)]
    pub store: Option<String>,
    /// The provider: log:PATH, log:-, mock:…, http(s)://…, fcm:project=ID[,endpoint=URL].
    #[arg(long, env = "FANOUT_PROVIDER", hide_env_values = true, help_heading = JOB_OVERRIDES)]
    pub provider: Option<String>,
    /// Pushes in flight at once.
    #[arg(long, env = "FANOUT_CONCURRENCY", hide_env_values = true, help_heading = JOB_OVERRIDES)]
    pub concurrency: Option<usize>,
    /// Pushes per second, 0 = unlimited.
    #[arg(long, env = "FANOUT_RATE_PER_S", hide_env_values = true, help_heading = JOB_OVERRIDES)]
    pub rate_per_s: Option<u64>,
    /// Users (ids) per bucket.
    #[arg(long, env = "FANOUT_BUCKET_SIZE", hide_env_values = true, help_heading = JOB_OVERRIDES)]
    pub bucket_size: Option<u32>,
    /// Messages per provider batch.
    #[arg(
        long,
        env = "FANOUT_BATCH_MAX_MESSAGES",
        hide_env_values = true,
        help_heading = JOB_OVERRIDES
    )]
    pub batch_max_messages: Option<usize>,
    /// No progress bar, no report on stderr.
    #[arg(
        short,
        long,
        env = "FANOUT_QUIET",
        hide_env_values = true,
        value_parser = BoolishValueParser::new()
    )]
    pub quiet: bool,
    /// Count and report bad input lines instead of stopping at the first.
    #[arg(
        long,
        env = "FANOUT_SKIP_BAD_LINES",
        hide_env_values = true,
        value_parser = BoolishValueParser::new()
    )]
    pub skip_bad_lines: bool,
}

/// Flags of the commands that push (`run`, `serve`).
#[derive(Debug, Args)]
pub struct PushArgs {
    /// Worker threads (default: the machine's cores).
    #[arg(
        short = 'w',
        long,
        env = "FANOUT_WORKERS",
        hide_env_values = true,
        help_heading = PUSH_OVERRIDES
    )]
    pub workers: Option<usize>,
    /// Serialized bytes per provider batch.
    #[arg(
        long,
        env = "FANOUT_BATCH_MAX_BYTES",
        hide_env_values = true,
        help_heading = PUSH_OVERRIDES
    )]
    pub batch_max_bytes: Option<usize>,
    /// Attempts per message for retryable failures.
    #[arg(long, env = "FANOUT_MAX_ATTEMPTS", hide_env_values = true, help_heading = PUSH_OVERRIDES)]
    pub max_attempts: Option<u32>,
    /// Where dead letters go (JSON Lines).
    #[arg(long, env = "FANOUT_DEAD_LETTER", hide_env_values = true, help_heading = PUSH_OVERRIDES)]
    pub dead_letter: Option<String>,
    /// Login events fed to the dataflow per epoch.
    #[arg(
        long,
        env = "FANOUT_LOGINS_PER_EPOCH",
        hide_env_values = true,
        help_heading = PUSH_OVERRIDES
    )]
    pub logins_per_epoch: Option<usize>,
}

/// The clock of the commands that take one (`run`, `plan`; `serve` uses the system clock).
#[derive(Debug, Args)]
pub struct ClockArgs {
    /// Clock override, RFC 3339 (default: the job's [engine] now, else the system clock).
    #[arg(long, env = "FANOUT_NOW", hide_env_values = true, help_heading = JOB_OVERRIDES)]
    pub now: Option<String>,
}

/// One process of a timely cluster (`run` only).
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Run one process of a timely cluster of this many processes (every process gets the
    /// same job file and inputs).
    #[arg(long, env = "FANOUT_PROCESSES", hide_env_values = true, help_heading = CLUSTER)]
    pub processes: Option<usize>,
    /// This process's index in the cluster, 0..processes. Process 0 writes the summary.
    #[arg(long, env = "FANOUT_PROCESS", hide_env_values = true, help_heading = CLUSTER)]
    pub process: Option<usize>,
    /// The cluster's addresses: one host:port a line, in process order (default
    /// 127.0.0.1:2101, 2102, …).
    #[arg(long, env = "FANOUT_HOSTFILE", hide_env_values = true, help_heading = CLUSTER)]
    pub hostfile: Option<PathBuf>,
    /// How long a process waits for its peers to connect, e.g. 60s (the default).
    #[arg(
        long,
        value_parser = humantime::parse_duration,
        env = "FANOUT_PEER_WAIT",
        hide_env_values = true,
        help_heading = CLUSTER
    )]
    pub peer_wait: Option<std::time::Duration>,
}

impl JobArgs {
    /// The overrides this group sets; the other groups add theirs.
    fn overrides(&self) -> Overrides {
        Overrides {
            users: self.users.clone(),
            logins: self.logins.clone(),
            granted: self.granted.clone(),
            store: self.store.clone(),
            provider: self.provider.clone(),
            concurrency: self.concurrency,
            rate_per_s: self.rate_per_s,
            bucket_size: self.bucket_size,
            batch_max_messages: self.batch_max_messages,
            ..Overrides::default()
        }
    }
}

impl PushArgs {
    /// Adds this group's overrides to `o`.
    fn apply(&self, o: Overrides) -> Overrides {
        Overrides {
            workers: self.workers,
            batch_max_bytes: self.batch_max_bytes,
            max_attempts: self.max_attempts,
            dead_letter: self.dead_letter.clone(),
            logins_per_epoch: self.logins_per_epoch,
            ..o
        }
    }
}

impl ClockArgs {
    /// Adds this group's override to `o`.
    fn apply(&self, o: Overrides) -> Overrides {
        Overrides {
            now: self.now.clone(),
            ..o
        }
    }
}

impl RunArgs {
    /// Which process of which cluster the flags describe.
    pub fn cluster(&self) -> crate::Result<crate::run::cluster::Cluster> {
        let c = &self.cluster;
        crate::run::cluster::Cluster::from_flags(
            c.processes,
            c.process,
            c.hostfile.as_deref(),
            c.peer_wait,
        )
    }

    /// The values that override the job file.
    pub fn overrides(&self) -> Overrides {
        self.clock.apply(self.push.apply(self.job.overrides()))
    }
}

impl PlanArgs {
    /// The values that override the job file.
    pub fn overrides(&self) -> Overrides {
        self.clock.apply(self.job.overrides())
    }
}

impl ServeArgs {
    /// The values that override the job file.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            campaigns: self.campaigns.clone(),
            ..self.push.apply(self.job.overrides())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn the_flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn each_job_command_takes_only_its_own_flags() {
        let parse = |args: &[&str]| Cli::try_parse_from(["fanout"].iter().chain(args));
        // Shared by all three.
        for cmd in ["run", "serve", "plan"] {
            assert!(parse(&[cmd, "j.toml", "--users", "u", "--store", "file:s", "-q"]).is_ok());
        }
        // run only: the cluster, dead letters.
        for (flag, value) in [
            ("--processes", "2"),
            ("--process", "0"),
            ("--hostfile", "hosts.txt"),
            ("--peer-wait", "1s"),
        ] {
            assert!(parse(&["run", "j.toml", flag, value]).is_ok(), "run {flag}");
            for cmd in ["serve", "plan"] {
                assert!(
                    parse(&[cmd, "j.toml", flag, value]).is_err(),
                    "{cmd} {flag}"
                );
            }
        }
        assert!(parse(&["plan", "j.toml", "--retry-dead-letters"]).is_err());
        assert!(parse(&["serve", "j.toml", "--retry-dead-letters"]).is_err());
        // serve has no clock and writes no summary; plan pushes nothing.
        assert!(parse(&["serve", "j.toml", "--now", "2026-03-02T00:00:00Z"]).is_err());
        assert!(parse(&["serve", "j.toml", "--summary", "s.json"]).is_err());
        for flag in [
            "-w",
            "--max-attempts",
            "--batch-max-bytes",
            "--logins-per-epoch",
        ] {
            assert!(
                parse(&["plan", "j.toml", flag, "2"]).is_err(),
                "plan {flag}"
            );
            assert!(parse(&["run", "j.toml", flag, "2"]).is_ok(), "run {flag}");
            assert!(
                parse(&["serve", "j.toml", flag, "2"]).is_ok(),
                "serve {flag}"
            );
        }
        // --campaigns is serve's.
        assert!(parse(&["run", "j.toml", "--campaigns", "redis://h:1/0"]).is_err());
        let Ok(Cli {
            command: Command::Serve(serve),
            ..
        }) = parse(&["serve", "j.toml", "--campaigns", "redis://h:1/0", "-w", "3"])
        else {
            panic!("serve did not parse");
        };
        let o = serve.overrides();
        assert_eq!(
            (o.campaigns.as_deref(), o.workers, o.now),
            (Some("redis://h:1/0"), Some(3), None)
        );
    }

    #[test]
    fn campaigns_commands_take_a_store_an_id_and_json_where_it_fits() {
        let parse = |args: &[&str]| Cli::try_parse_from(["fanout", "campaigns"].iter().chain(args));
        let Ok(Cli {
            command: Command::Campaigns(CampaignsCommand::List { store, json }),
            ..
        }) = parse(&["list"])
        else {
            panic!("list did not parse");
        };
        assert_eq!((store.store.as_str(), json), ("file:.fanout", false));
        assert!(parse(&["list", "--json", "--store", "redis://h:1/0"]).is_ok());
        assert!(parse(&["show", "spring", "--json"]).is_ok());
        for cmd in ["show", "pause", "resume", "cancel"] {
            assert!(parse(&[cmd]).is_err(), "{cmd} without an id");
            assert!(
                parse(&[cmd, "spring", "--store", "file:s"]).is_ok(),
                "{cmd}"
            );
        }
        assert!(parse(&["pause", "spring", "--json"]).is_err());
        assert!(parse(&["list", "spring"]).is_err());
        assert!(parse(&["stop", "spring"]).is_err());
    }
}
