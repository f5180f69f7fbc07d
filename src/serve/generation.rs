//! One generation of `serve`: what it admits (the fan-outs not yet run, every lazy coupon,
//! the releases that are due, none that an operator paused), the dataflow over it, and what
//! its end tells the next one (fan-outs finished, held for quiet hours, or left for a resume).

use super::*;

impl Server<'_> {
    /// Runs one generation over what is active now (fan-outs not yet `ran` and not waiting
    /// for quiet hours to end, every lazy coupon). Returns whether its fan-outs completed, and
    /// their (ledger key, stream entry); a fan-out that held users for their quiet hours is
    /// not among them but in `waiting`, to run again when the first of them is sendable.
    pub(super) fn generation(
        &self,
        active: &[Active],
        ran: &HashSet<String>,
        waiting: &mut Waiting,
    ) -> Result<(bool, Vec<Finishing>)> {
        let now = Utc::now();
        // One reading of the control states for the admissions and the watcher, so that a
        // change after it (a resume of a campaign left out) is one the watcher reports.
        let control = self.runtime.block_on(self.store.control())?;
        let (admissions, mut finishing) =
            self.admissions(active, ran, waiting, &control.states, now)?;
        let targets = self.runtime.block_on(Targets::open(
            &self.store,
            admissions,
            &self.engine.placement,
            &self.job.policy,
            now,
        ))?;
        let first_release = waiting.values().filter(|at| **at > now).min().copied();
        let deadline =
            next_change(active, now).min(first_release.unwrap_or(DateTime::<Utc>::MAX_UTC));
        tracing::info!(
            fan_outs = targets.scan.len(),
            lazy = targets.lazy(),
            next_change_in_s = (deadline - now).num_seconds(),
            "generation starting"
        );
        let epochs = self.epochs(&targets);
        let scan_targets = targets.scan.clone();
        let ctx = self
            .engine
            .context(targets.run, targets.caps, OnPause::Drop);
        let generation = Arc::new(Generation {
            admit: (0..ctx.targets.len() as u32).collect(),
            granted: prepare::granted_pairs(&self.granted, &ctx.targets),
            scan_targets,
            epochs,
            logins: self.logins.clone(),
            should_end: self.flag(move |f| {
                f.replan.load(Relaxed) || f.shutdown.load(Relaxed) || Utc::now() >= deadline
            }),
            shutting_down: self.flag(|f| f.shutdown.load(Relaxed)),
            cut_short: self.flag(|f| f.urgent.load(Relaxed)),
            on_durable: self.on_durable(ctx.clone()),
            lost: {
                let fence = self.store.fence();
                Box::new(move || fence.lost())
            },
        });
        self.counters.generations.fetch_add(1, Relaxed);
        let replan = self.flags.clone();
        let watching = Watching::from(
            &self.store,
            &ctx,
            control,
            Box::new(move || replan.replan.store(true, Relaxed)),
        );
        self.live.begin(&ctx);
        let complete = execute(self.engine.sizing.workers, ctx.clone(), generation)?;
        self.live.end(&ctx);
        drop(watching);
        ctx.take_failure()?;
        let noted = prepare::note_activity(&self.store, &ctx, &self.worker);
        self.runtime.block_on(noted)?;
        log_generation(&ctx);
        note_held(&ctx, waiting, &mut finishing);
        note_paused(&ctx, &mut finishing);
        Ok((complete, finishing))
    }

    /// What a generation at `now` admits: the fan-outs not yet `ran` and not waiting for
    /// quiet hours to end (with their (ledger key, stream entry)), every lazy coupon, and the
    /// releases and expiries of users held in earlier occurrences that are due — of campaigns
    /// an operator has not paused (`states`). A cancelled fan-out is admitted, to settle its
    /// users not yet claimed as cancelled; a cancelled lazy coupon or hot product is not, and
    /// is forgotten where it was kept.
    fn admissions(
        &self,
        active: &[Active],
        ran: &HashSet<String>,
        waiting: &Waiting,
        states: &BTreeMap<String, State>,
        now: DateTime<Utc>,
    ) -> Result<(Vec<Admission>, Vec<Finishing>)> {
        let state = |id: &str| states.get(id).copied().unwrap_or(State::Running);
        let mut admissions = Vec::new();
        let mut finishing = Vec::new();
        let due = |key: &String| waiting.get(key).is_none_or(|at| *at <= now);
        for a in active {
            match state(&a.campaign.id) {
                State::Paused => continue,
                State::Cancelled if a.campaign.is_lazy() => {
                    self.forget_cancelled(&a.campaign)?;
                    continue;
                }
                State::Cancelled if a.campaign.kind == Kind::HotProduct => {
                    self.forget_cancelled(&a.campaign)?;
                    continue;
                }
                _ => {}
            }
            match targets::admit(&a.campaign, now) {
                Admission::Run(t) if !ran.contains(&t.ledger_key()) && due(&t.ledger_key()) => {
                    finishing.push((t.ledger_key(), a.entry.clone()));
                    admissions.push(Admission::Run(t));
                }
                lazy @ Admission::AtLogin(_) => admissions.push(lazy),
                _ => {}
            }
        }
        let campaigns: Vec<Arc<Campaign>> = active.iter().map(|a| a.campaign.clone()).collect();
        let held = self.runtime.block_on(prepare::held_admissions(
            &self.store,
            &campaigns,
            &self.job.policy,
            now,
            false,
        ))?;
        for admission in held {
            if let Admission::Release(t, _) | Admission::Expire(t, _) = &admission {
                if due(&t.ledger_key()) && state(&t.campaign.id) != State::Paused {
                    admissions.push(admission);
                }
            }
        }
        Ok((admissions, finishing))
    }

    /// Forgets cancelled campaign `c` where it was kept (a lazy coupon, a hot product), so a
    /// restarted `serve` does not load it again.
    fn forget_cancelled(&self, c: &Campaign) -> Result<()> {
        match &self.campaigns {
            Some(stream) => self.runtime.block_on(stream.registry.forget(c)),
            None => Ok(()),
        }
    }

    /// A test of the shared flags, for a generation to call.
    fn flag(
        &self,
        test: impl Fn(&Flags) -> bool + Send + Sync + 'static,
    ) -> Box<dyn Fn() -> bool + Send + Sync> {
        let flags = self.flags.clone();
        Box::new(move || test(&flags))
    }

    /// The fan-outs' bucket scans, cut into epochs (none without a fan-out).
    fn epochs(&self, targets: &Targets) -> Vec<Vec<u32>> {
        if targets.scan.is_empty() {
            return Vec::new();
        }
        let source = &self.engine.source;
        let buckets = self.engine.placement.buckets;
        run::driver::plan_epochs(
            source.buckets(buckets).into_iter().map(|b| {
                let (lo, hi) = buckets.bucket_range(b);
                (b, source.count_in(lo, hi))
            }),
            self.engine.sizing.users_per_epoch,
        )
    }

    /// What a generation calls as its epochs complete: make the store durable, then
    /// acknowledge the epochs' login entries.
    fn on_durable(&self, ctx: Arc<Context>) -> Box<dyn Fn(Vec<String>) + Send + Sync> {
        let (store, acker, handle) = (
            self.store.clone(),
            self.login_acker.clone(),
            self.runtime.handle().clone(),
        );
        Box::new(move |ids: Vec<String>| {
            let (store, acker, ctx) = (store.clone(), acker.clone(), ctx.clone());
            handle.spawn(async move {
                if let Err(e) = store.sync().await {
                    ctx.fail(e);
                    return;
                }
                if let (Some(acker), false) = (acker, ids.is_empty()) {
                    if let Err(e) = acker.ack(&ids).await {
                        // Left pending: read again after a restart, claimed as done.
                        tracing::warn!(error = %e, "cannot acknowledge logins");
                    }
                }
            });
        })
    }
}

/// Logs each campaign that did something in a generation.
fn log_generation(ctx: &Context) {
    for rt in &ctx.targets {
        let n = rt.stats.snapshot();
        if n.eligible + n.already_granted > 0 {
            let t = &rt.target;
            tracing::info!(
                campaign = %display_name(&t.campaign.id, t.occurrence.as_deref()),
                eligible = n.eligible,
                delivered = n.delivered,
                already_granted = n.already_granted,
                "generation done"
            );
        }
    }
}

/// After a generation: a fan-out that held users for their quiet hours waits (with its
/// stream entry unacknowledged) until the first of them is sendable; the others wait no more.
fn note_held(ctx: &Context, waiting: &mut Waiting, finishing: &mut Vec<Finishing>) {
    for rt in &ctx.targets {
        let key = rt.target.ledger_key();
        match rt.quiet.as_ref().and_then(|q| q.release()) {
            Some(at) => {
                waiting.insert(key.clone(), at);
                finishing.retain(|(k, _)| *k != key);
            }
            None => drop(waiting.remove(&key)),
        }
    }
}

/// Keeps from `finishing` every fan-out the generation dropped candidates of because it was
/// paused, or that is paused now: it runs again once resumed.
fn note_paused(ctx: &Context, finishing: &mut Vec<Finishing>) {
    for (t, rt) in ctx.targets.iter().enumerate() {
        let t = t as u32;
        if ctx.halts.dropped(t) || ctx.halts.of(t) == Halt::Paused {
            let key = rt.target.ledger_key();
            finishing.retain(|(k, _)| *k != key);
        }
    }
}

/// Runs one generation on `workers` threads; true if its fan-outs completed.
fn execute(workers: usize, ctx: Arc<Context>, generation: Arc<Generation>) -> Result<bool> {
    let config = run::cluster::Cluster::default().config(workers);
    let guards = timely::execute(config, move |worker| {
        worker::drive(worker, ctx.clone(), generation.clone())
    })
    .map_err(|e| Error::runtime(format!("cannot start timely workers: {e}")))?;
    let mut complete = true;
    for (i, result) in guards.join().into_iter().enumerate() {
        let fed = result.map_err(|e| Error::runtime(format!("a worker failed: {e}")))?;
        if i == 0 {
            complete = fed.scans_complete;
        }
    }
    Ok(complete)
}

/// When the active set next changes by itself: a window opens or a schedule ticks (at most
/// [`MAX_GENERATION`] from now).
fn next_change(active: &[Active], now: DateTime<Utc>) -> DateTime<Utc> {
    let cap = now + chrono::Duration::from_std(MAX_GENERATION).unwrap_or(chrono::Duration::zero());
    let mut next = cap;
    for a in active {
        let c = &a.campaign;
        if c.start > now {
            next = next.min(c.start);
        } else if c.kind == Kind::HotProduct && c.is_live_at(now) {
            if let Some(tick) = targets::next_tick(c, now) {
                next = next.min(tick);
            }
        }
    }
    next
}
