//! The ceiling the engine benchmark is measured against: a plain single-threaded loop doing
//! the same per-user work as `fanout run` — generate or read the user, test the audience,
//! claim it, render the message — with no dataflow, no store file and no provider. The claim
//! is the engine's cheapest: id-ordered batches of the engine's task size on an in-memory
//! roaring bitmap, each a range when its ids are consecutive (as the embedded ledger claims
//! them), else one set operation.
//!
//! With lazy coupons and logins in the job, the loop is over logins instead (see
//! [`login_loop`]).
//!
//! `cargo bench --bench ceiling -- JOB.toml [--users SPEC]` prints one JSON object.

use std::time::Instant;

use fanout::audience::AudienceFilter;
use std::sync::Arc;

use fanout::job::{self, Job, Overrides};
use fanout::model::{Campaign, CouponDelivery, Target, UserRef};
use fanout::render::Renderer;
use fanout::sources::logins;
use fanout::sources::{LoadOptions, UserSource};
use fanout::store::file::{joined_runs, run_of};
use fanout::store::Store;
use fanout::template::UserVars;
use roaring::RoaringBitmap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    // Without arguments (as `cargo test --all-targets` runs it): the claim checked, then a
    // small smoke run.
    if args.is_empty() {
        check_claim_sorted();
    }
    let smoke = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/jobs/engine.toml").to_owned();
    let path = args.first().cloned().unwrap_or(smoke);
    let users = args
        .iter()
        .position(|a| a == "--users")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| args.is_empty().then(|| "synthetic:100000".to_owned()));
    let overrides = Overrides {
        users,
        ..Overrides::default()
    };
    let job = job::load(std::path::Path::new(&path), &overrides)?;
    let (source, _) = UserSource::open(&job.inputs.users, &LoadOptions::default())?;
    let lazy: Vec<_> = job
        .campaigns
        .iter()
        .filter(|c| c.coupon.as_ref().map(|k| k.delivery) == Some(CouponDelivery::OnLogin))
        .cloned()
        .collect();
    match (&job.inputs.logins, lazy.is_empty()) {
        (Some(logins), false) => login_loop(&job, &source, &lazy, logins),
        _ => fan_out_loop(&job, &source),
    }
}

/// Users per claim in the fan-out loop: the engine's push-task size for `job` (its
/// `TASK_BATCHES` provider batches of `batch_max_messages`, at most `MAX_TASK_USERS`; see
/// `src/run/mod.rs`), so the loop claims in the same sorted batches the engine does.
fn claim_batch(job: &Job) -> usize {
    let batch = job.engine.batch_max_messages.max(1);
    (batch * 32).min(4096 / batch * batch).max(batch)
}

/// Fan-out: every user of the source against every campaign. Matching users are gathered in
/// id order and claimed a batch at a time on a roaring bitmap, as a range or one set
/// operation ([`claim_sorted`]) — the cheapest claim the embedded store has, minus the log
/// and the done/pending sets — then rendered.
fn fan_out_loop(job: &Job, source: &UserSource) -> Result<(), Box<dyn std::error::Error>> {
    let batch = claim_batch(job);
    let started = Instant::now();
    let mut delivered = 0u64;
    let mut bytes = 0u64;
    for campaign in &job.campaigns {
        let target = Target::new(campaign.clone(), None);
        let renderer = Renderer::new(&target);
        let filter = AudienceFilter::compile(&campaign.audience, source.tags());
        let mut claimed = RoaringBitmap::new();
        let mut pending: Vec<UserVars> = Vec::with_capacity(batch);
        let mut ids: Vec<u32> = Vec::with_capacity(batch);
        // One buffer reused for every message: the cheapest way to render.
        let mut json = String::with_capacity(renderer.typical_len());
        let mut flush = |pending: &mut Vec<UserVars>| {
            let fresh = claim_sorted(&mut claimed, pending, &mut ids);
            for u in pending
                .iter()
                .filter(|u| fresh.as_ref().is_none_or(|f| f.contains(u.id)))
            {
                json.clear();
                renderer.render_into(*u, &mut json);
                bytes += json.len() as u64;
                delivered += 1;
            }
            pending.clear();
        };
        // As the engine's scan: an audience of everyone is not tested user by user (and, its
        // loop compiled whole, no user's tags are worked out).
        if filter.is_everyone() {
            source.for_each_in(0, u64::MAX, |u| {
                if take(&mut pending, &u, batch) {
                    flush(&mut pending);
                }
            });
        } else {
            source.for_each_in(0, u64::MAX, |u| {
                if filter.matches(&u) && take(&mut pending, &u, batch) {
                    flush(&mut pending);
                }
            });
        }
        flush(&mut pending);
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{{\"users\": {}, \"delivered\": {delivered}, \"bytes\": {bytes}, \"claim_batch\": {batch}, \"elapsed_s\": {elapsed:.4}, \"users_per_s\": {:.0}}}",
        source.len(),
        source.len() as f64 / elapsed
    );
    Ok(())
}

/// Adds `u` to `pending`; whether that makes `batch` of them.
#[inline(always)]
fn take(pending: &mut Vec<UserVars>, u: &UserRef<'_>, batch: usize) -> bool {
    pending.push(UserVars {
        id: u.id,
        level: u.level,
        points: u.points,
    });
    pending.len() == batch
}

/// Claims `users` (ascending ids) in `claimed`: `None` when every one is new, else the new
/// ones. As the embedded ledger claims a batch (`store::file::shard`'s `Batch`): its ids
/// collected, and a batch that is one run of consecutive ids (every batch of a dense
/// population) judged by one walk of the claimed set over its range (`joined_runs`, as the
/// ledger's) and inserted as that range;
/// any other batch as one set operation of whole containers.
fn claim_sorted(
    claimed: &mut RoaringBitmap,
    users: &[UserVars],
    ids: &mut Vec<u32>,
) -> Option<RoaringBitmap> {
    ids.clear();
    ids.extend(users.iter().map(|u| u.id));
    if let Some(run) =
        run_of(ids).filter(|run| joined_runs(std::slice::from_ref(run), claimed).is_some())
    {
        claimed.insert_range(run);
        return None;
    }
    let Ok(batch) = RoaringBitmap::from_sorted_iter(ids.iter().copied()) else {
        unreachable!("a user source yields ascending ids");
    };
    if claimed.is_disjoint(&batch) {
        *claimed |= batch;
        return None;
    }
    let fresh = batch - &*claimed;
    *claimed |= &fresh;
    Some(fresh)
}

/// [`claim_sorted`] against sets built id by id: runs and scattered batches, new, repeated
/// and overlapping ones.
fn check_claim_sorted() {
    let vars = |ids: &[u32]| -> Vec<UserVars> {
        (ids.iter())
            .map(|&id| UserVars {
                id,
                level: 0,
                points: 0,
            })
            .collect()
    };
    let batches: [&[u32]; 6] = [
        &[10, 11, 12, 13],
        &[10, 11, 12, 13],
        &[12, 13, 14, 15],
        &[1, 5, 9, 70_000],
        &[5, 6, 7],
        &[100, 101, 102],
    ];
    let (mut claimed, mut ids, mut naive) = (RoaringBitmap::new(), Vec::new(), Vec::<u32>::new());
    for batch in batches {
        let fresh: Vec<u32> = batch
            .iter()
            .copied()
            .filter(|id| !naive.contains(id))
            .collect();
        naive.extend(&fresh);
        let got = match claim_sorted(&mut claimed, &vars(batch), &mut ids) {
            None => batch.to_vec(),
            Some(set) => set.iter().collect(),
        };
        assert_eq!(got, fresh, "claim of {batch:?}");
    }
    assert_eq!(claimed.len(), naive.len() as u64);
}

/// Lazy coupons: every login against every coupon — window, audience, the grant ledger (read
/// from the job's store beforehand, as bitmaps), claim a bit, render.
fn login_loop(
    job: &Job,
    source: &UserSource,
    coupons: &[Arc<Campaign>],
    logins_path: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let (logins, _) = logins::load(logins_path, false)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = runtime.block_on(Store::connect_read_only(&job.store))?;
    let mut state = Vec::new();
    for c in coupons {
        let target = Target::new(c.clone(), None);
        let granted: RoaringBitmap = runtime
            .block_on(store.granted(&target.ledger_key()))?
            .into_iter()
            .collect();
        let filter = AudienceFilter::compile(&c.audience, source.tags());
        let window = (c.start.timestamp_millis(), c.end.timestamp_millis());
        state.push((Renderer::new(&target), filter, window, granted));
    }
    let started = Instant::now();
    let mut grants = 0u64;
    let mut json = String::new();
    for login in &logins {
        source.for_each_in(u64::from(login.user), u64::from(login.user) + 1, |u| {
            for (renderer, filter, (start, end), granted) in state.iter_mut() {
                if (*start..*end).contains(&login.ts_ms)
                    && filter.matches(&u)
                    && granted.insert(u.id)
                {
                    json.clear();
                    renderer.render_into(
                        UserVars {
                            id: u.id,
                            level: u.level,
                            points: u.points,
                        },
                        &mut json,
                    );
                    grants += 1;
                }
            }
        });
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{{\"events\": {}, \"grants\": {grants}, \"elapsed_s\": {elapsed:.4}, \"events_per_s\": {:.0}}}",
        logins.len(),
        logins.len() as f64 / elapsed
    );
    Ok(())
}
