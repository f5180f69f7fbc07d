//! The `fanout` command: parse flags, load the job, run, turn the outcome into an exit code.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use fanout::cli::{Cli, Command, GenCommand};
use fanout::error::{Error, Result};
use fanout::run::{self, RunOptions};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match execute(Cli::parse()) {
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

fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            let cluster = args.cluster()?;
            let job = fanout::job::load(&args.job, &args.overrides())?;
            job.require_campaigns()?;
            let opts = RunOptions {
                quiet: args.quiet,
                skip_bad_lines: args.skip_bad_lines,
                retry_dead_letters: args.retry_dead_letters,
                cluster,
            };
            let summary = run::run(&job, &opts)?;
            if opts.cluster.process != 0 {
                // Process 0 writes the summary and the report for the whole cluster.
                if !args.quiet {
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
            if !args.quiet {
                eprint!("{}", run::report(&summary));
            }
            Ok(())
        }
        Command::Serve(args) => {
            if args.run.cluster()?.is_cluster() {
                return Err(Error::Usage(
                    "serve runs as one process (several may share a Redis store and streams): run it without --processes".into(),
                ));
            }
            let job = fanout::job::load(&args.run.job, &args.run.overrides())?;
            if job.inputs.campaigns.is_none() {
                job.require_campaigns()?;
            }
            let opts = fanout::serve::ServeOptions {
                listen: args.listen,
                consumer: args.consumer,
                run: RunOptions {
                    quiet: args.run.quiet,
                    skip_bad_lines: args.run.skip_bad_lines,
                    retry_dead_letters: args.run.retry_dead_letters,
                    ..RunOptions::default()
                },
            };
            fanout::serve::serve(&job, &opts)
        }
        Command::Plan(args) => {
            if args.cluster()?.is_cluster() {
                return Err(Error::Usage(
                    "plan reads every user in one process: run it without --processes".into(),
                ));
            }
            let job = fanout::job::load(&args.job, &args.overrides())?;
            job.require_campaigns()?;
            let opts = RunOptions {
                quiet: args.quiet,
                skip_bad_lines: args.skip_bad_lines,
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
    }
}
