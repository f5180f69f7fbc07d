//! The `fanout` command: parse flags, load the job, run, turn the outcome into an exit code.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use fanout::cli::{CampaignsCommand, Cli, Command, GenCommand, LogFormat};
use fanout::error::{Error, Result};
use fanout::run::{self, RunOptions};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match &e {
                Error::Runtime(inner) => eprintln!("fanout: {inner:#}"),
                other => eprintln!("fanout: {other}"),
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// Log lines (tracing) go to stderr, as text or one JSON object a line; RUST_LOG filters them.
fn init_logs(format: LogFormat) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,fanout::progress=info")
            }),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
}

fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            let cluster = args.cluster()?;
            let job = fanout::job::load(&args.job.job, &args.overrides())?;
            job.require_campaigns()?;
            let opts = RunOptions {
                quiet: args.job.quiet,
                skip_bad_lines: args.job.skip_bad_lines,
                retry_dead_letters: args.retry_dead_letters,
                cluster,
            };
            let summary = run::run(&job, &opts)?;
            if opts.cluster.process != 0 {
                // Process 0 writes the summary and the report for the whole cluster.
                if !args.job.quiet {
                    eprintln!(
                        "fanout: process {} of {} done; the summary is process 0's",
                        opts.cluster.process, opts.cluster.processes
                    );
                }
                return Ok(());
            }
            if let Some(path) = &args.summary {
                let json = serde_json::to_string_pretty(&summary).map_err(anyhow::Error::from)?;
                std::fs::write(path, json + "\n").map_err(|e| {
                    Error::runtime(format!("cannot write summary {}: {e}", path.display()))
                })?;
            }
            if !args.job.quiet {
                eprint!("{}", run::report(&summary));
            }
            if summary.interrupted {
                let delivered: u64 = summary.campaigns.iter().map(|c| c.counts.delivered).sum();
                return Err(Error::Interrupted(format!(
                    "interrupted: {delivered} delivered, re-run to finish"
                )));
            }
            Ok(())
        }
        Command::Serve(args) => {
            let job = fanout::job::load(&args.job.job, &args.overrides())?;
            if job.inputs.campaigns.is_none() {
                job.require_campaigns()?;
            }
            let opts = fanout::serve::ServeOptions {
                listen: args.listen,
                consumer: args.consumer,
                run: RunOptions {
                    quiet: args.job.quiet,
                    skip_bad_lines: args.job.skip_bad_lines,
                    ..RunOptions::default()
                },
            };
            fanout::serve::serve(&job, &opts)
        }
        Command::Plan(args) => {
            let job = fanout::job::load(&args.job.job, &args.overrides())?;
            job.require_campaigns()?;
            let opts = RunOptions {
                quiet: args.job.quiet,
                skip_bad_lines: args.job.skip_bad_lines,
                ..RunOptions::default()
            };
            let plan = run::plan::plan(&job, &opts)?;
            if let Some(path) = &args.summary {
                let json = serde_json::to_string_pretty(&plan).map_err(anyhow::Error::from)?;
                std::fs::write(path, json + "\n").map_err(|e| {
                    Error::runtime(format!("cannot write plan {}: {e}", path.display()))
                })?;
            }
            print!("{}", run::plan::render(&plan));
            Ok(())
        }
        Command::Gen(GenCommand::Users { count, seed, out }) => {
            let n = fanout::gen::gen_users(count, seed, out.as_deref())?;
            tracing::info!("wrote {n} users");
            Ok(())
        }
        Command::Grants(args) => {
            let ids =
                fanout::grants::granted(&args.store, &args.campaign, args.occurrence.as_deref())?;
            let mut out = String::with_capacity(ids.len() * 8);
            for id in ids {
                out.push_str(&id.to_string());
                out.push('\n');
            }
            print!("{out}");
            Ok(())
        }
        Command::Report(args) => {
            let report = fanout::report::report(&fanout::report::Question {
                store: &args.store,
                campaign: &args.campaign,
                occurrence: args.occurrence.as_deref(),
                conversions: args.conversions.as_deref(),
            })?;
            let Some(path) = &args.json else {
                print!("{}", fanout::report::render(&report));
                return Ok(());
            };
            let json = serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)? + "\n";
            if path == "-" {
                print!("{json}");
                return Ok(());
            }
            std::fs::write(path, json)
                .map_err(|e| Error::runtime(format!("cannot write report {path}: {e}")))?;
            print!("{}", fanout::report::render(&report));
            Ok(())
        }
        Command::Campaigns(command) => campaigns(command),
    }
}

/// `fanout campaigns …`: reads or changes the store, prints the answer on stdout.
fn campaigns(command: CampaignsCommand) -> Result<()> {
    use fanout::control;
    use fanout::store::campaigns::State;
    let (args, state) = match command {
        CampaignsCommand::List { store, json: true } => {
            print!("{}", json(&control::list(&store.store)?)?);
            return Ok(());
        }
        CampaignsCommand::List { store, json: false } => {
            print!("{}", control::render_table(&control::list(&store.store)?));
            return Ok(());
        }
        CampaignsCommand::Show {
            id,
            store,
            json: true,
        } => {
            print!("{}", json(&control::show(&store.store, &id)?)?);
            return Ok(());
        }
        CampaignsCommand::Show {
            id,
            store,
            json: false,
        } => {
            print!(
                "{}",
                control::render_status(&control::show(&store.store, &id)?)
            );
            return Ok(());
        }
        CampaignsCommand::Pause(args) => (args, State::Paused),
        CampaignsCommand::Resume(args) => (args, State::Running),
        CampaignsCommand::Cancel(args) => (args, State::Cancelled),
    };
    let change = control::set(&args.store.store, &args.id, state)?;
    print!("{}", control::render_change(&args.id, state, change));
    Ok(())
}

/// `value` as pretty JSON and a newline.
fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    Ok(serde_json::to_string_pretty(value).map_err(anyhow::Error::from)? + "\n")
}
