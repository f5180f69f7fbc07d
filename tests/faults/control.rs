//! The operators' commands of a schedule (`fanout campaigns pause|resume|cancel`) as the
//! fault runs issue them, and their checks: each cancelled campaign against the store and the
//! provider ([`check::cancelled`]), and the silences — no provider attempt of a paused or
//! cancelled campaign begins later than a grace after the command returned.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{code, Ctx, Proc};
use crate::check::{self, Delivery};
use crate::plan::{Act, Control, Fault};

/// Where a campaign must start no provider attempt: from `grace` after a pause or cancel
/// command returned until a resume was issued (a cancel's: for good).
pub(super) struct Silence {
    campaign: String,
    /// The command(s), for the message.
    why: String,
    /// When the command returned.
    returned: Instant,
    /// `returned` + the grace (see [`Ctx::grace`]).
    from: Instant,
    /// When the resume was issued; `None`: never (cancelled).
    until: Option<Instant>,
    /// With `log:` files: every file's length at `from` (a timer thread takes it)…
    from_len: Option<std::thread::JoinHandle<BTreeMap<String, u64>>>,
    /// … and at `until`.
    until_len: Option<BTreeMap<String, u64>>,
}

/// The length of every run's `log:` file in `dir` now (a file not there yet: none).
fn log_lengths(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("run") && name.ends_with(".jsonl") {
            out.insert(name, e.metadata().map_or(0, |m| m.len()));
        }
    }
    out
}

impl Ctx<'_> {
    /// How late after a pause or cancel command returned a provider attempt of its campaign
    /// may still start: the run reads the control version every 50 ms, and no attempt starts
    /// once it has (one waiting for its slot or for its rate token sends nothing more). The
    /// grace (`--grace`, 1 s) covers the poll and a process descheduled for most of a second on
    /// a loaded 2-core machine (the CI set also passes with `--grace 150`: no attempt came
    /// later than that). Before the rate gate checked the hold, the queue at the gate
    /// (`concurrency` ÷ `rate_per_s`) was added to it.
    fn grace(&self) -> Duration {
        self.env.grace
    }

    /// `fanout campaigns VERB CAMPAIGN` on the schedule's store; when it returned, or `None`
    /// when it was refused. A campaign no run admitted yet is refused (exit 2), as is a file
    /// store no run made yet: the command is tried again for a few seconds while `alive` (a
    /// run that has not admitted it yet).
    fn command(&mut self, verb: &str, campaign: &str, alive: bool) -> Option<Instant> {
        let store = match &self.redis {
            Some(r) => r.url(0),
            None => "file:store".to_owned(),
        };
        let started = Instant::now();
        loop {
            let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
                .args(["campaigns", verb, campaign, "--store", &store])
                .current_dir(self.dir.path())
                .env_remove("RUST_LOG")
                .output()
                .expect("start fanout campaigns");
            let returned = Instant::now();
            let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if out.status.success() {
                self.note(format!(
                    "fanout campaigns {verb} {campaign}: {} ({} ms)",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    (returned - started).as_millis()
                ));
                return Some(returned);
            }
            // Not admitted yet: the store has no such campaign, or (a file store) no run has
            // made the store yet — a run on one CPU may take longer than the trigger to start.
            let unknown = out.status.code() == Some(2)
                && (err.contains("has no campaign") || err.contains("no run has used this store"));
            if unknown && alive && started.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            if unknown {
                // No run admitted it (the first was killed early): refused, as documented;
                // nothing changed, and the campaign is checked as any other.
                self.note(format!(
                    "fanout campaigns {verb} {campaign}: refused, not admitted yet: {err}"
                ));
            } else {
                self.violations.push(format!(
                    "fanout campaigns {verb} {campaign}: {}: {err}",
                    code(out.status)
                ));
            }
            return None;
        }
    }

    /// Opens a silence of `campaign` from the grace after `returned`.
    fn silence(&mut self, campaign: &str, why: &str, returned: Instant) -> usize {
        let from = returned + self.grace();
        let from_len = (self.http.is_none()).then(|| {
            let dir = self.dir.path().to_owned();
            std::thread::spawn(move || {
                std::thread::sleep(from.saturating_duration_since(Instant::now()));
                log_lengths(&dir)
            })
        });
        self.silences.push(Silence {
            campaign: campaign.to_owned(),
            why: why.to_owned(),
            returned,
            from,
            until: None,
            from_len,
            until_len: None,
        });
        self.silences.len() - 1
    }

    /// Pauses `campaign`; its silence, or `None` if the command was refused.
    fn pause(&mut self, campaign: &str, alive: bool) -> Option<usize> {
        let returned = self.command("pause", campaign, alive)?;
        Some(self.silence(campaign, "pause", returned))
    }

    /// Resumes the campaign of silence `i`, which ends as the command is issued.
    pub(super) fn resume(&mut self, i: usize) {
        let until = Instant::now();
        let lengths = self.http.is_none().then(|| log_lengths(self.dir.path()));
        let campaign = self.silences[i].campaign.clone();
        self.silences[i].until = Some(until);
        self.silences[i].until_len = lengths;
        self.silences[i].why.push_str(" until resumed");
        self.command("resume", &campaign, false);
    }

    /// Cancels `campaign` (paused with silence `paused`, which then lasts for good).
    pub(super) fn cancel(&mut self, campaign: &str, paused: Option<usize>) {
        let alive = paused.is_some();
        let Some(returned) = self.command("cancel", campaign, alive) else {
            if let Some(i) = paused {
                // Still paused: resume it, or the next run waits for ever.
                self.resume(i);
            }
            return;
        };
        self.cancelled.insert(campaign.to_owned());
        match paused {
            Some(i) => self.silences[i].why.push_str(", then cancel"),
            None => {
                self.silence(campaign, "cancel", returned);
            }
        }
    }

    /// Sleeps `ms` while the run goes on.
    fn hold(&self, ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
    }

    /// Operator's command `c` in the run of fault `fault`, before that fault's own trigger;
    /// returns the fault still to come (`None`: the command's act took the run's kill). A
    /// run that ended before the command's moment gets it between runs.
    pub(super) fn control(
        &mut self,
        c: &Control,
        fault: Fault,
        procs: &mut [Proc],
        run: usize,
    ) -> Option<Fault> {
        let victim = match fault {
            Fault::Kill { victim, .. } => victim,
            _ => 0,
        };
        let during = self.wait_trigger(procs, run, victim, c.at);
        let id = &c.campaign;
        self.note(format!(
            "control: {c} ({})",
            if during {
                "run under way"
            } else {
                "between runs"
            }
        ));
        match c.act {
            Act::PauseResume { hold_ms } => {
                if let Some(i) = self.pause(id, during) {
                    self.hold(hold_ms);
                    self.resume(i);
                }
                Some(fault)
            }
            Act::PauseCancel { hold_ms } => {
                if let Some(i) = self.pause(id, during) {
                    self.hold(hold_ms);
                    self.cancel(id, Some(i));
                }
                Some(fault)
            }
            Act::Cancel => {
                self.cancel(id, None);
                Some(fault)
            }
            Act::CancelBetween => Some(fault),
            Act::PauseKill { hold_ms, resume_ms } => {
                let Fault::Kill { delayed_rerun, .. } = fault else {
                    return Some(fault);
                };
                let paused = self.pause(id, during);
                self.hold(hold_ms);
                self.kill(procs, run, victim, delayed_rerun);
                if let Some(i) = paused {
                    match resume_ms {
                        Some(ms) => self.resume_next = Some((i, ms)),
                        None => self.resume(i),
                    }
                }
                None
            }
            Act::CancelKill { kill_ms } => {
                let Fault::Kill { delayed_rerun, .. } = fault else {
                    return Some(fault);
                };
                self.cancel(id, None);
                self.hold(kill_ms);
                self.kill(procs, run, victim, delayed_rerun);
                None
            }
        }
    }

    /// The store's URL as the harness reads it.
    fn store_url(&self) -> String {
        match &self.redis {
            Some(r) => r.url(0),
            None => format!("file:{}", self.path("store").display()),
        }
    }

    /// What the store holds of `campaign`, by outcome, over its ledgers and parts.
    fn store_outcomes(&self, campaign: &str) -> Result<check::StoreOutcomes, String> {
        use fanout::store::Store;
        let url = self.store_url();
        let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let mut out = check::StoreOutcomes::new();
            let parts = fanout::run::cluster::store_parts(&url).map_err(|e| e.to_string())?;
            for part in parts {
                let store = Store::connect_read_only(&part)
                    .await
                    .map_err(|e| e.to_string())?;
                for key in store
                    .ledger_keys(campaign)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    let occurrence = key
                        .strip_prefix(campaign)
                        .and_then(|o| o.strip_prefix(':'))
                        .map(str::to_owned);
                    let o = store.outcomes(&key).await.map_err(|e| e.to_string())?;
                    for (name, set) in [
                        ("delivered", &o.delivered),
                        ("dead_lettered", &o.dead_lettered),
                        ("unreachable", &o.unreachable),
                        ("held_out", &o.held_out),
                        ("in_flight", &o.in_flight),
                        ("quiet_held", &o.quiet_held),
                        ("capped", &o.capped),
                        ("cancelled", &o.cancelled),
                    ] {
                        let pairs = set
                            .iter()
                            .map(|u| (campaign.to_owned(), occurrence.clone(), u64::from(u)));
                        out.entry(name).or_default().extend(pairs);
                    }
                }
            }
            Ok(out)
        })
    }

    /// The operators' commands, checked: each cancelled campaign against the store and the
    /// provider ([`check::cancelled`]), the clean runs sent none of it, and no provider
    /// attempt of a paused or cancelled campaign started in its silence.
    pub(super) fn check_control(
        &mut self,
        deliveries: &[Delivery],
        eligible: &BTreeSet<check::Pair>,
        bound: u64,
        clean_from: usize,
    ) {
        for campaign in self.cancelled.clone() {
            self.against_store(&campaign, |store, violations| {
                check::cancelled(&campaign, store, eligible, deliveries, bound, violations)
            });
            let late: Vec<&Delivery> = deliveries
                .iter()
                .filter(|d| d.campaign == campaign && d.run >= clean_from)
                .collect();
            if let Some(d) = late.first() {
                self.violations.push(format!(
                    "{} deliveries of cancelled {campaign} by the clean runs (e.g. {} in {})",
                    late.len(),
                    d.key,
                    d.source
                ));
            }
        }
        self.check_silences();
    }

    /// Each campaign not cancelled against the store ([`check::settled`]): every eligible pair
    /// settled exactly once, nothing left in flight, every pair recorded delivered sent; and
    /// where the naive reading is exact, the outcomes of those never sent (`unsent`).
    pub(super) fn check_settled(
        &mut self,
        deliveries: &[Delivery],
        eligible: &BTreeSet<check::Pair>,
        unsent: Option<&check::StoreOutcomes>,
        bound: u64,
    ) {
        let campaigns = crate::naive::campaigns(&self.s.job).0;
        let ids: Vec<String> = (campaigns.into_iter())
            .map(|c| c.id)
            .filter(|c| !self.cancelled.contains(c))
            .collect();
        for campaign in ids {
            self.against_store(&campaign, |store, violations| {
                check::settled(
                    &campaign, store, eligible, unsent, deliveries, bound, violations,
                )
            });
        }
    }

    /// [`check::capped_justified`] over what the store holds of every capped campaign; `ticks`
    /// are the runs' `--now`s.
    pub(super) fn check_capped(&mut self, deliveries: &[Delivery], ticks: &[String]) {
        let (caps, capped) = self.s.caps();
        let mut all = check::StoreOutcomes::new();
        for campaign in &capped {
            match self.store_outcomes(campaign) {
                Ok(store) => {
                    (store.into_iter()).for_each(|(k, v)| all.entry(k).or_default().extend(v))
                }
                Err(e) => {
                    let e = format!("cannot read the store for {campaign}: {e}");
                    return self.violations.push(e);
                }
            }
        }
        check::capped_justified(&all, deliveries, ticks, &caps, &mut self.violations);
    }

    /// Reads what the store holds of `campaign` and runs `check` on it, noting its account.
    fn against_store(
        &mut self,
        campaign: &str,
        check: impl FnOnce(&check::StoreOutcomes, &mut Vec<String>) -> String,
    ) {
        match self.store_outcomes(campaign) {
            Ok(store) => {
                let stats = check(&store, &mut self.violations);
                self.note(stats);
            }
            Err(e) => self
                .violations
                .push(format!("cannot read the store for {campaign}: {e}")),
        }
    }

    /// No provider attempt of a campaign starts inside one of its silences: an HTTP request
    /// arriving then (any answer), or a `log:` line that begins past a file's length at the
    /// silence's start (and before its length at the end).
    fn check_silences(&mut self) {
        let mut silences = std::mem::take(&mut self.silences);
        let http = self.http.as_ref().map(|h| h.server.hits());
        for s in &mut silences {
            let from_len = s.from_len.take().map(|t| t.join().unwrap_or_default());
            let mut inside: Vec<String> = Vec::new();
            let mut latest: Option<Duration> = None;
            match &http {
                Some(hits) => {
                    for hit in hits {
                        let Some(d) = check::parse(&hit.req.body) else {
                            continue;
                        };
                        if d.campaign != s.campaign || hit.at < s.returned {
                            continue;
                        }
                        let after = hit.at - s.returned;
                        if s.until.is_none_or(|u| hit.at < u) {
                            latest = latest.max(Some(after));
                        }
                        if hit.at > s.from && s.until.is_none_or(|u| hit.at < u) {
                            inside.push(format!(
                                "{} (attempt {}) {} ms after the command returned",
                                d.key,
                                hit.attempt,
                                after.as_millis()
                            ));
                        }
                    }
                }
                None => {
                    let from_len = from_len.unwrap_or_default();
                    for name in log_lengths(self.dir.path()).keys() {
                        let text = std::fs::read(self.path(name)).unwrap_or_default();
                        let start = from_len.get(name).copied().unwrap_or(0) as usize;
                        let end = match &s.until_len {
                            Some(l) => l.get(name).copied().unwrap_or(0) as usize,
                            None => text.len(),
                        };
                        let mut at = 0;
                        for line in text.split(|&c| c == b'\n') {
                            let begins = at;
                            at += line.len() + 1;
                            if begins < start || begins >= end {
                                continue;
                            }
                            if let Some(d) = check::parse(line) {
                                if d.campaign == s.campaign {
                                    inside.push(format!("{} in {name}", d.key));
                                }
                            }
                        }
                    }
                }
            }
            if let Some(l) = latest {
                self.note(format!(
                    "{} of {}: its last attempt began {} ms after the command returned",
                    s.why,
                    s.campaign,
                    l.as_millis()
                ));
            }
            if !inside.is_empty() {
                self.violations.push(format!(
                    "{} attempts of {} after its {} returned (+{} ms grace): {}",
                    inside.len(),
                    s.campaign,
                    s.why,
                    (s.from - s.returned).as_millis(),
                    inside
                        .iter()
                        .take(3)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
}
