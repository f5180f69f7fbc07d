//! A fault schedule as a pure function of its seed: the workload (job file, users, logins,
//! granted pairs), where it runs (store, provider, processes, workers) and the faults.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::check::{Pair, StoreOutcomes};
use crate::common::{naive_users_jsonl, TUser};
use crate::naive;
use crate::redis_server::Persist;

/// splitmix64: the schedule's only source of choices.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5eed_fa17_0000_0000)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with `pct` percent probability.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PromoAll,
    PromoPersona,
    SegmentCoupon,
    LazyCoupon,
    HotProduct,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::PromoAll => "promo-all",
            Kind::PromoPersona => "promo-persona",
            Kind::SegmentCoupon => "segment-coupon",
            Kind::LazyCoupon => "lazy-coupon",
            Kind::HotProduct => "hot-product",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    File,
    Redis,
}

/// The provider the runs push to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// `log:` files, one per run and process.
    Log,
    /// The in-process HTTP receiver: a share of first and second attempts answered 503 or
    /// 429 + Retry-After, and a few first attempts answered slower than the client's timeout.
    Http {
        pct_5xx: u64,
        pct_429: u64,
        slow: u64,
    },
}

/// When a fault lands in the run it interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// After this many per mille of the deliveries still to do are out.
    Lines(u64),
    /// After this many milliseconds.
    Delay(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 of process `victim` (the others of a cluster stop on their own); the next run
    /// starts at once or after the lease.
    Kill {
        at: Trigger,
        victim: usize,
        delayed_rerun: bool,
    },
    /// SIGSTOP past the lease, a second run that must take over and finish, then SIGCONT.
    Stall { at: Trigger },
    /// The operator stops the run: SIGINT to every process of it. Each stops claiming, lets
    /// its pushes in flight finish and records them, and exits 130 (or 0, done already): no
    /// message may go out twice for it. `again_ms`: a second SIGINT that much later exits
    /// without the drain (then what was in flight may go out again, as after a crash).
    Interrupt { at: Trigger, again_ms: Option<u64> },
    /// The Redis server killed and restarted (with or without persistence: the schedule's).
    RedisRestart { at: Trigger, down_ms: u64 },
    /// The Redis server stopped (SIGSTOP) for `stall_ms`, then resumed: past the run lease
    /// the run must notice it lost the lease and end with exit 1; within it, go on.
    RedisStall { at: Trigger, stall_ms: u64 },
    /// The HTTP provider answers 401 from some point on: the run stops with exit 1.
    CredStop { at: Trigger },
    /// The embedded store's filesystem (a tmpfs of its own) is full from some point on: the
    /// run stops with exit 1, or finishes if it writes nothing more; then it grows again.
    DiskFull { at: Trigger },
    /// The Redis server's filesystem (a tmpfs of its own) is full for `full_ms`, then grows
    /// again. Persisting at every write, the server exits at its next write and is started
    /// again once there is room; once a second, it refuses writes (`MISCONF`) meanwhile. The
    /// run waits that out, or ends with exit 1 (its lease lost, or its retries spent).
    RedisDiskFull { at: Trigger, full_ms: u64 },
    /// No fault: a run that must end well, drawn only to carry a [`Control`] in a schedule
    /// that drew no fault.
    Calm,
}

/// An operator's command on one campaign of the job (`fanout campaigns pause|resume|cancel`),
/// in fault run `step`: at `at` (counted as a fault's trigger) the act begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub campaign: String,
    pub step: usize,
    pub at: Trigger,
    pub act: Act,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Pause, `hold_ms` while the run goes on with the job's other campaigns, resume; then
    /// the run's own fault.
    PauseResume { hold_ms: u64 },
    /// Pause; `hold_ms` later the step's kill -9 lands while paused (instead of at its own
    /// trigger); resumed `resume_ms` after the next run started (a fault run, which waits
    /// for it), or, when `None`, before the next run starts.
    PauseKill {
        hold_ms: u64,
        resume_ms: Option<u64>,
    },
    /// Pause, `hold_ms`, cancel: the parked users settle as cancelled.
    PauseCancel { hold_ms: u64 },
    /// Cancel; then the run's own fault.
    Cancel,
    /// Cancel, and `kill_ms` after the command returned the step's kill -9 (before the run's
    /// next poll or epoch, for the small ones); the step's rerun follows.
    CancelKill { kill_ms: u64 },
    /// Cancel once the step's processes ended (after its kill, before the restart).
    CancelBetween,
}

impl Act {
    /// Whether the act ends in a cancel.
    pub fn cancels(self) -> bool {
        matches!(
            self,
            Act::PauseCancel { .. } | Act::Cancel | Act::CancelKill { .. } | Act::CancelBetween
        )
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Lines(pm) => write!(f, "{}.{}%", pm / 10, pm % 10),
            Trigger::Delay(ms) => write!(f, "{ms}ms"),
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Kill {
                at,
                victim,
                delayed_rerun,
            } => write!(
                f,
                "kill9(p{victim}@{at},{})",
                if *delayed_rerun {
                    "delayed-rerun"
                } else {
                    "immediate-rerun"
                }
            ),
            Fault::Stall { at } => write!(f, "sigstop-past-lease(@{at})"),
            Fault::Interrupt { at, again_ms } => match again_ms {
                Some(ms) => write!(f, "sigint-twice(@{at},then@+{ms}ms)"),
                None => write!(f, "sigint(@{at})"),
            },
            Fault::RedisRestart { at, down_ms } => {
                write!(f, "redis-restart(@{at},down={down_ms}ms)")
            }
            Fault::RedisStall { at, stall_ms } => {
                write!(f, "redis-sigstop(@{at},for={stall_ms}ms)")
            }
            Fault::CredStop { at } => write!(f, "http-401(@{at})"),
            Fault::DiskFull { at } => write!(f, "disk-full(@{at})"),
            Fault::RedisDiskFull { at, full_ms } => {
                write!(f, "redis-disk-full(@{at},for={full_ms}ms)")
            }
            Fault::Calm => write!(f, "calm-run"),
        }
    }
}

impl std::fmt::Display for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (c, at, step) = (&self.campaign, self.at, self.step);
        match self.act {
            Act::PauseResume { hold_ms } => {
                write!(
                    f,
                    "pause({c}@{at},hold={hold_ms}ms)+resume in fault run {step}"
                )
            }
            Act::PauseKill { hold_ms, resume_ms } => write!(
                f,
                "pause({c}@{at},hold={hold_ms}ms)+kill9 in fault run {step}, resume {}",
                match resume_ms {
                    Some(ms) => format!("{ms}ms into the next run"),
                    None => "before the next run".into(),
                }
            ),
            Act::PauseCancel { hold_ms } => {
                write!(
                    f,
                    "pause({c}@{at},hold={hold_ms}ms)+cancel in fault run {step}"
                )
            }
            Act::Cancel => write!(f, "cancel({c}@{at}) in fault run {step}"),
            Act::CancelKill { kill_ms } => {
                write!(
                    f,
                    "cancel({c}@{at})+kill9 {kill_ms}ms later in fault run {step}"
                )
            }
            Act::CancelBetween => write!(f, "cancel({c}) after fault run {step} ended"),
        }
    }
}

/// One schedule, with the texts of its inputs.
pub struct Schedule {
    pub seed: u64,
    pub store: StoreKind,
    /// How a Redis store persists (`No` for the file store).
    pub redis: Persist,
    pub provider: ProviderKind,
    pub processes: usize,
    pub concurrency: u64,
    /// `-w` of each run, fault runs first, then the final run(s).
    pub workers: Vec<usize>,
    /// `--now` of the runs; the final phase is one clean run per tick.
    pub ticks: Vec<String>,
    pub faults: Vec<Fault>,
    /// Operators' commands, in step order (see [`controls`]).
    pub controls: Vec<Control>,
    /// Frequency caps drawn (`[policy] frequency_caps`): every run's `--now` then stays
    /// non-decreasing (the fault runs all at the first tick).
    pub capped: bool,
    /// The fault runs run on one CPU ([`one_cpu`]); the clean runs anywhere.
    pub one_cpu: bool,
    pub job: String,
    pub users_text: String,
    pub logins_text: Option<String>,
    pub granted_text: Option<String>,
    pub users: BTreeMap<u64, TUser>,
    summary: String,
}

const TAGS: [&str; 6] = ["sports", "mom", "tech", "gamer", "travel", "运动"];

fn audience(r: &mut Rng, out: &mut String) {
    let mut lines = Vec::new();
    if r.chance(60) {
        lines.push(format!("min_level = {}", r.range(1, 5)));
    }
    if r.chance(20) {
        lines.push(format!("max_level = {}", r.range(5, 9)));
    }
    if r.chance(30) {
        lines.push(format!("min_points = {}", r.range(0, 20_000)));
    }
    if r.chance(15) {
        lines.push(format!("max_points = {}", r.range(20_000, 50_000)));
    }
    if r.chance(60) || lines.is_empty() {
        let a = r.pick(&TAGS);
        let b = r.pick(&TAGS);
        lines.push(format!("tags_any = [\"{a}\", \"{b}\"]"));
    }
    if r.chance(15) {
        lines.push(format!("tags_all = [\"{}\"]", r.pick(&TAGS)));
    }
    out.push_str("[campaign.audience]\n");
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
}

fn campaign(r: &mut Rng, kind: Kind, id: &str) -> String {
    let mut c = String::new();
    let (k, start, end) = match kind {
        Kind::PromoAll | Kind::PromoPersona => {
            ("promotion", "2026-03-01T00:00:00Z", "2026-03-08T00:00:00Z")
        }
        Kind::SegmentCoupon | Kind::LazyCoupon => {
            ("coupon", "2026-03-01T00:00:00Z", "2026-03-04T00:00:00Z")
        }
        Kind::HotProduct => (
            "hot_product",
            "2026-03-02T00:00:00Z",
            "2026-03-03T00:00:00Z",
        ),
    };
    let extra = match kind {
        Kind::SegmentCoupon | Kind::LazyCoupon => " {coupon.id} {coupon.amount}",
        Kind::HotProduct => " {goods.name} at {occurrence}",
        _ => "",
    };
    // Titles name the id, so no two campaigns have the same content (the repeated-campaign
    // guard would refuse the second).
    let _ = write!(
        c,
        "[[campaign]]\nid = \"{id}\"\nkind = \"{k}\"\nstart = \"{start}\"\nend = \"{end}\"\n\
         title = \"{} {id}\"\nbody = \"Hi {{user.id}} L{{user.level}} P{{user.points}} {{campaign.id}}{extra}\"\n",
        kind.name()
    );
    if r.chance(40) {
        // A holdout: the held-out users must never be sent, whatever crashes.
        let _ = writeln!(c, "holdout = {}", [0.1, 0.25, 0.5][r.below(3) as usize]);
    }
    if kind != Kind::PromoAll && (kind == Kind::PromoPersona || r.chance(60)) {
        audience(r, &mut c);
    }
    match kind {
        Kind::SegmentCoupon | Kind::LazyCoupon => {
            let delivery = if kind == Kind::LazyCoupon {
                "on_login"
            } else {
                "push"
            };
            let _ = write!(
                c,
                "[campaign.coupon]\ncoupon_id = \"C-{id}\"\namount = {}\ndelivery = \"{delivery}\"\n",
                r.range(1, 50)
            );
        }
        Kind::HotProduct => {
            let _ = write!(
                c,
                "[campaign.goods]\nname = \"Goods {id}\"\ndesc = \"d{}\"\nkeywords = \"k\"\n\
                 [campaign.schedule]\nevery = \"1h\"\n",
                r.range(1, 99)
            );
        }
        _ => {}
    }
    c.push('\n');
    c
}

/// Zones users are drawn in: on 2026-03-02 between 09:00 and 14:00 UTC (the ticks), night
/// quiet hours hold some of them and release others from tick to tick.
const ZONES: [&str; 6] = [
    "America/New_York",
    "America/Los_Angeles",
    "Asia/Shanghai",
    "Pacific/Auckland",
    "Asia/Kolkata",
    "Europe/Berlin",
];

fn users_text(r: &mut Rng, n: u64, spread: u64) -> String {
    let mut out = String::new();
    for _ in 0..n {
        let id = 1 + r.below(n * spread);
        let tz = match r.below(ZONES.len() as u64 + 1) as usize {
            z if z < ZONES.len() => format!(", \"tz\": \"{}\"", ZONES[z]),
            _ => String::new(),
        };
        let tags: Vec<String> = TAGS
            .iter()
            .filter(|_| r.chance(25))
            .map(|t| format!("\"{t}\""))
            .collect();
        let _ = writeln!(
            out,
            "{{\"id\": {id}, \"level\": {}, \"points\": {}, \"tags\": [{}], \"token\": \"t-{id}\"{tz}}}",
            r.below(10),
            r.below(50_000),
            tags.join(",")
        );
    }
    out
}

fn ts(r: &mut Rng) -> String {
    // Feb 27 … Mar 6: some before, some after every coupon window.
    let day = r.range(0, 7);
    let (m, d) = if day < 2 { (2, 27 + day) } else { (3, day - 1) };
    format!(
        "2026-{m:02}-{d:02}T{:02}:{:02}:00Z",
        r.below(24),
        r.below(60)
    )
}

fn logins_text(r: &mut Rng, users: &BTreeMap<u64, TUser>, max_id: u64) -> String {
    let ids: Vec<u64> = users.keys().copied().collect();
    let mut events = Vec::new();
    let people = (ids.len() as u64 / r.range(1, 4)).max(10);
    for _ in 0..people {
        // Mostly known users, a few unknown ids; each logs in one to four times.
        let user = if r.chance(95) {
            ids[r.below(ids.len() as u64) as usize]
        } else {
            max_id + 1 + r.below(1000)
        };
        for _ in 0..r.range(1, 4) {
            events.push((r.next(), user, ts(r)));
        }
    }
    // Logins of one user spread over the file (and so over several epochs).
    events.sort();
    let mut out = String::new();
    for (_, user, t) in events {
        let _ = writeln!(out, "{{\"user\": {user}, \"ts\": \"{t}\"}}");
    }
    out
}

/// Whether a schedule's fault runs run on one CPU (`taskset`), every process of them, beside
/// a busy loop pinned there too (`common::cpu::OneCpu`): the threads of a run, and both
/// processes of a cluster, then take turns in time slices, preempted at arbitrary points,
/// instead of racing on two cores — as in a container given one CPU on a busy host. A race
/// between a run's main thread and its workers (the cluster hang of CI seed 171) showed only
/// under load. From a sequence of its own: a schedule that draws it is otherwise the one its
/// seed drew before.
fn one_cpu(seed: u64) -> bool {
    Rng::new(seed ^ 0x0c90).chance(25)
}

/// The `frequency_caps` line of schedule `seed` (None for 40% of the schedules that offer a
/// user two capped sends, and for the others), and some of its capped campaigns at bulk priority: a short cap (an hour
/// or two lets a later tick send again) and often a long one. From a sequence of its own.
fn frequency_caps(
    seed: u64,
    ids: &[(String, Kind)],
    ticks: usize,
    campaigns: &mut String,
) -> Option<String> {
    let mut r = Rng::new(seed ^ 0xca95);
    let capped: Vec<&String> = ids
        .iter()
        .filter(|(_, k)| *k != Kind::LazyCoupon)
        .map(|(id, _)| id)
        .collect();
    // A cap binds only where a user is offered two capped sends: two campaigns or two ticks.
    if (capped.len() < 2 && ticks < 2) || capped.is_empty() || !r.chance(60) {
        return None;
    }
    let mut caps = vec![format!(
        "{{ max = {}, per = \"{}\" }}",
        r.pick(&[1, 1, 2]),
        r.pick(&["1h", "2h", "6h", "24h"])
    )];
    if r.chance(60) {
        caps.push(format!(
            "{{ max = {}, per = \"{}\" }}",
            r.range(2, 5),
            r.pick(&["24h", "7d"])
        ));
    }
    for id in capped {
        if r.chance(35) {
            let line = format!("id = \"{id}\"\n");
            *campaigns = campaigns.replace(&line, &format!("{line}priority = \"bulk\"\n"));
        }
    }
    Some(format!("frequency_caps = [{}]\n", caps.join(", ")))
}

/// The operators' commands of schedule `seed`, from a sequence of their own (a schedule that
/// draws none is the one its seed drew before campaign control existed): about 28% of the
/// schedules, one command in one fault run, sometimes a second one in a later run. A schedule
/// that drew no fault gets a calm run to carry it. Under caps, the naive reading no longer
/// says who is sent (a paused campaign's parked offers are decided after the other
/// campaigns', which the engine lets go on, and a cancelled one frees cap room): such a
/// schedule is checked against who is eligible, the store's account of each, and the caps
/// on what was sent (`exec::run`). Never a cancel in a stalled run: its process, stopped past
/// the lease, sends what it had in flight when continued, seconds after any cancel.
fn controls(seed: u64, ids: &[(String, Kind)], faults: &mut Vec<Fault>) -> Vec<Control> {
    let mut r = Rng::new(seed ^ 0xc0_4701);
    if !r.chance(28) {
        return Vec::new();
    }
    if faults.is_empty() {
        faults.push(Fault::Calm);
    }
    let mut out: Vec<Control> = Vec::new();
    let mut step = r.below(faults.len() as u64) as usize;
    while step < faults.len() {
        let open: Vec<&String> = ids
            .iter()
            .map(|(id, _)| id)
            .filter(|id| !out.iter().any(|c| c.act.cancels() && c.campaign == **id))
            .collect();
        if open.is_empty() {
            break;
        }
        let campaign = open[r.below(open.len() as u64) as usize].clone();
        let kill = matches!(faults[step], Fault::Kill { .. });
        let stall = matches!(faults[step], Fault::Stall { .. });
        let mut options = vec![0, 0];
        if !stall {
            options.extend([1, 2]);
        }
        // After a run that finished its work a cancel has little left to settle.
        if faults[step] != Fault::Calm {
            options.push(3);
        }
        if kill {
            options.extend([4, 4, 5, 5]);
        }
        let at = if r.chance(25) {
            Trigger::Delay(r.range(30, 400))
        } else {
            Trigger::Lines(r.range(50, 700))
        };
        let act = match r.pick(&options) {
            0 => Act::PauseResume {
                hold_ms: r.range(100, 1500),
            },
            1 => Act::PauseCancel {
                hold_ms: r.range(100, 1000),
            },
            2 => Act::Cancel,
            3 => Act::CancelBetween,
            4 => Act::PauseKill {
                hold_ms: r.range(50, 700),
                resume_ms: (step + 1 < faults.len() && r.chance(60)).then(|| r.range(100, 900)),
            },
            _ => Act::CancelKill {
                kill_ms: r.pick(&[0, 5, 20, 40]),
            },
        };
        out.push(Control {
            campaign,
            step,
            at,
            act,
        });
        // A resume in the next run leaves that run to it.
        let next = match act {
            Act::PauseKill {
                resume_ms: Some(_), ..
            } => step + 2,
            _ => step + 1,
        };
        if next >= faults.len() || !r.chance(30) {
            break;
        }
        step = r.range(next as u64, faults.len() as u64 - 1) as usize;
    }
    out
}

pub fn plan(seed: u64) -> Schedule {
    let mut r = Rng::new(seed);
    let all = [
        Kind::PromoAll,
        Kind::PromoPersona,
        Kind::SegmentCoupon,
        Kind::LazyCoupon,
        Kind::HotProduct,
    ];
    let mut kinds = vec![r.pick(&all)];
    if r.chance(35) {
        for _ in 0..r.range(1, 2) {
            kinds.push(r.pick(&all));
        }
    }
    let store = if r.chance(50) {
        StoreKind::Redis
    } else {
        StoreKind::File
    };
    let processes = if r.chance(20) { 2 } else { 1 };
    let provider = if processes == 1 && r.chance(35) {
        ProviderKind::Http {
            pct_5xx: r.pick(&[0, 5, 15]),
            pct_429: r.pick(&[0, 3, 8]),
            slow: r.pick(&[0, 0, 2, 5]),
        }
    } else {
        ProviderKind::Log
    };
    let mut redis_persist = r.chance(50);
    let n = r.range(1000, 20_000);
    let spread = r.range(1, 4);
    let bucket = r.range(50, 500);
    let batch = r.range(5, 50);
    let concurrency = r.range(4, 64);
    let logins_per_epoch = r.range(20, 400);
    let ticks: Vec<String> = if kinds.contains(&Kind::HotProduct) {
        let mut t: Vec<String> = (0..r.range(1, 3))
            .map(|_| format!("2026-03-02T{:02}:{:02}:00Z", r.range(9, 13), r.below(60)))
            .collect();
        t.sort();
        t
    } else {
        vec!["2026-03-02T10:00:00Z".to_owned()]
    };

    let users_text = users_text(&mut r, n, spread);
    let users = naive_users_jsonl(&users_text);
    let lazy = kinds.contains(&Kind::LazyCoupon);
    let logins_text = lazy.then(|| logins_text(&mut r, &users, n * spread));
    // Behind a provider that answers 429 + Retry-After or times out, at most ~12 login
    // epochs: an epoch waits for its slowest push, and the schedule must stay short.
    let n_logins = logins_text
        .as_deref()
        .map_or(0, |t| t.lines().count() as u64);
    let slow_provider =
        matches!(provider, ProviderKind::Http { pct_429, slow, .. } if pct_429 + slow > 0);
    let logins_per_epoch = if slow_provider {
        logins_per_epoch.max(n_logins / 12)
    } else {
        logins_per_epoch
    };
    let control_group = [0.0, 0.0, 0.05, 0.2][r.below(4) as usize];
    // Night quiet hours in each user's zone: held now, released at a later tick (or not).
    // Not in a cluster, which releases held users of the current occurrence only (README).
    let quiet = match processes == 1 && r.chance(50) {
        true => {
            "quiet_hours = { start = \"21:00\", end = \"08:00\" }\ndefault_tz = \"Asia/Shanghai\"\n"
        }
        false => "",
    };
    let mut campaigns = String::new();
    let mut ids = Vec::new();
    for (i, &k) in kinds.iter().enumerate() {
        let id = format!("{}{i}", k.name());
        campaigns.push_str(&campaign(&mut r, k, &id));
        ids.push((id, k));
    }
    // Caps come from a sequence of their own: a schedule that draws none is the one its seed
    // drew before caps existed.
    let caps = frequency_caps(seed, &ids, ticks.len(), &mut campaigns);
    if caps.is_some() {
        // A Redis that forgets (no persistence) forgets the send history too, and no cap can
        // hold across that: capped schedules restart a persistent Redis only.
        redis_persist = true;
    }
    let granted_text = r.chance(30).then(|| {
        let mut out = String::new();
        for (id, k) in &ids {
            if *k == Kind::HotProduct {
                continue;
            }
            for u in users.keys().filter(|_| r.chance(10)) {
                let _ = writeln!(out, "{{\"campaign\": \"{id}\", \"user\": {u}}}");
            }
        }
        out
    });

    // The job without its rate, to count what one run delivers.
    let head = |rate: u64| {
        let mut j = String::from("[inputs]\nusers = \"users.jsonl\"\n");
        if logins_text.is_some() {
            j.push_str("logins = \"logins.jsonl\"\n");
        }
        if granted_text.is_some() {
            j.push_str("granted = \"granted.jsonl\"\n");
        }
        let _ = write!(
            j,
            "\n[engine]\nbucket_size = {bucket}\nbatch_max_messages = {batch}\nnow = \"{}\"\n\
             logins_per_epoch = {logins_per_epoch}\n\n[store]\nurl = \"file:store\"\n\n\
             [provider]\nurl = \"log:deliveries.jsonl\"\nconcurrency = {concurrency}\n\
             rate_per_s = {rate}\nmax_attempts = 6\ndead_letter = \"dead-letters.jsonl\"\n\n\
             [policy]\ncontrol_group = {control_group}\n{quiet}{}\n",
            ticks[0],
            caps.as_deref().unwrap_or_default(),
        );
        j.push_str(&campaigns);
        j
    };
    let draft = head(0);
    let granted = granted_text
        .as_deref()
        .map(naive::granted_jsonl)
        .unwrap_or_default();
    let logins = logins_text
        .as_deref()
        .map(naive::logins_jsonl)
        .unwrap_or_default();
    // Each user in their own zone: with quiet hours, a count in `default_tz` alone can be
    // near zero at a tick where most users are awake, and the floor rate then makes runs
    // last minutes.
    let zones = naive::zones_jsonl(&users_text);
    let tick0 = chrono::DateTime::parse_from_rfc3339(&ticks[0])
        .expect("a tick is RFC 3339")
        .to_utc();
    let per_run = naive::runs(&draft, &users, &zones, &logins, &granted, &[tick0])
        .pop()
        .map_or(0, |run| run.delivered.len() as u64);
    // A run lasts ~0.3–1 s, so a fault lands mid-run.
    let dur_ms = r.range(300, 800);
    let rate = (per_run * 1000 / dur_ms / processes as u64).max(50);
    let job = head(rate);

    let mut faults = Vec::new();
    // A flaky HTTP provider is a fault of its own: such a schedule may draw no other. A few
    // schedules draw none (controls: no duplicate at all is allowed there).
    let flaky = matches!(provider, ProviderKind::Http { pct_5xx, pct_429, slow } if pct_5xx + pct_429 + slow > 0);
    let control = r.chance(12);
    for _ in 0..r.range(if flaky || control { 0 } else { 1 }, 3) {
        let at = if r.chance(25) {
            Trigger::Delay(r.range(20, 600))
        } else {
            Trigger::Lines(r.range(50, 800))
        };
        let mut options = vec![0, 0, 6];
        if store == StoreKind::Redis {
            options.extend([2, 5, 7]);
            if processes == 1 {
                options.push(1);
            }
        }
        if matches!(provider, ProviderKind::Http { .. }) {
            options.push(3);
        }
        if store == StoreKind::File {
            options.push(4);
        }
        faults.push(match r.pick(&options) {
            0 => Fault::Kill {
                at,
                victim: r.below(processes as u64) as usize,
                delayed_rerun: r.chance(40),
            },
            1 => Fault::Stall { at },
            2 => Fault::RedisRestart {
                at,
                down_ms: r.range(200, 900),
            },
            3 => Fault::CredStop { at },
            7 => Fault::RedisStall {
                at,
                stall_ms: r.range(100, 3000),
            },
            4 => Fault::DiskFull { at },
            6 => {
                // Both drawn either way, so the schedules after stay as they were.
                let (twice, after_ms) = (r.chance(25), r.range(0, 150));
                Fault::Interrupt {
                    at,
                    again_ms: twice.then_some(after_ms),
                }
            }
            _ => Fault::RedisDiskFull {
                at,
                full_ms: r.range(100, 1500),
            },
        });
    }
    // A stalled run is taken over by a second run: one more `-w` to draw.
    let runs = faults.len()
        + faults
            .iter()
            .filter(|f| matches!(f, Fault::Stall { .. }))
            .count()
        + ticks.len();
    // Any run may use another `-w`: which process owns a bucket depends only on the process
    // count, so a split file store and a Redis re-run find their users where they left them.
    let workers: Vec<usize> = (0..runs).map(|_| r.range(1, 4) as usize).collect();
    let controls = controls(seed, &ids, &mut faults);
    if !controls.is_empty() {
        // A Redis that forgets also forgets the control state (and the ledgers): no cancel
        // holds across that.
        redis_persist = true;
    }
    let has = |pick: fn(&Fault) -> bool| faults.iter().any(pick);
    let redis_full = has(|f| matches!(f, Fault::RedisDiskFull { .. }));
    let redis_restart = has(|f| matches!(f, Fault::RedisRestart { .. }));
    // A full disk matters to a server that writes one; fsyncing once a second, it refuses
    // writes rather than exiting, and may lose acknowledged writes if killed: not beside a
    // restart.
    let redis = match (
        redis_persist || redis_full,
        redis_full && !redis_restart && r.chance(50),
    ) {
        (false, _) => Persist::No,
        (true, false) => Persist::Always,
        (true, true) => Persist::EverySec,
    };

    let mut summary = format!(
        "workload [{}] users={} ids<={} bucket={bucket} batch={batch} conc={concurrency} rate={rate}/s \
         granted={} logins={} epoch={logins_per_epoch} ticks=[{}]{} | store={}{} procs={processes} w={workers:?} provider={}",
        kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(","),
        users.len(),
        n * spread,
        granted_text.is_some(),
        logins_text.as_deref().map(|t| t.lines().count()).unwrap_or(0),
        ticks.join(","),
        match &caps {
            Some(c) => format!(" {}", c.trim_end().replace(' ', "")),
            None => String::new(),
        },
        match store {
            StoreKind::File => "file",
            StoreKind::Redis => "redis",
        },
        match (store, redis) {
            (StoreKind::Redis, Persist::Always) => "(aof)",
            (StoreKind::Redis, Persist::EverySec) => "(aof-everysec)",
            (StoreKind::Redis, Persist::No) => "(no-persist)",
            _ => "",
        },
        match provider {
            ProviderKind::Log => "log".to_owned(),
            ProviderKind::Http {
                pct_5xx,
                pct_429,
                slow,
            } => format!("http(5xx={pct_5xx}%,429={pct_429}%,slow={slow})"),
        }
    );
    let _ = write!(
        summary,
        " | faults: {}",
        faults
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let one_cpu = one_cpu(seed);
    if one_cpu {
        summary.push_str(" | one cpu");
    }
    if !controls.is_empty() {
        let _ = write!(
            summary,
            " | control: {}",
            controls
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    Schedule {
        seed,
        store,
        redis,
        provider,
        processes,
        concurrency,
        workers,
        ticks,
        faults,
        controls,
        capped: caps.is_some(),
        one_cpu,
        job,
        users_text,
        logins_text,
        granted_text,
        users,
        summary,
    }
}

/// What the naive reading of a schedule says ([`Schedule::reading`]).
pub struct Reading {
    /// The pairs sent.
    pub expected: BTreeSet<Pair>,
    /// Every pair settled in the store (sent, held out, quiet-held, dead-lettered, capped): a
    /// campaign's eligible pairs.
    pub eligible: BTreeSet<Pair>,
    /// The pairs settled without a send, by the store's name for the outcome: held out and
    /// capped.
    pub unsent: StoreOutcomes,
}

impl Schedule {
    pub fn describe(&self) -> &str {
        &self.summary
    }

    /// The naive reading over a run at every tick in turn (holdouts, quiet hours across the
    /// users' zones, caps: [`naive::runs`]), as the checks use it.
    pub fn reading(&self) -> Reading {
        let mut out = Reading {
            expected: BTreeSet::new(),
            eligible: BTreeSet::new(),
            unsent: StoreOutcomes::new(),
        };
        for r in self.runs() {
            out.expected.extend(r.delivered.iter().cloned());
            let unsent = [("held_out", &r.held_out), ("capped", &r.capped)];
            for (outcome, pairs) in unsent {
                out.unsent
                    .entry(outcome)
                    .or_default()
                    .extend(pairs.iter().cloned());
            }
            let settled = [r.delivered, r.held_out, r.quiet_held, r.expired, r.capped];
            out.eligible.extend(settled.into_iter().flatten());
        }
        out
    }

    /// The naive reading of one run at each tick.
    fn runs(&self) -> Vec<naive::NRun> {
        let granted = self
            .granted_text
            .as_deref()
            .map(naive::granted_jsonl)
            .unwrap_or_default();
        let logins = self
            .logins_text
            .as_deref()
            .map(naive::logins_jsonl)
            .unwrap_or_default();
        let nows: Vec<_> = self
            .ticks
            .iter()
            .map(|t| chrono::DateTime::parse_from_rfc3339(t).unwrap().to_utc())
            .collect();
        let zones = naive::zones_jsonl(&self.users_text);
        naive::runs(&self.job, &self.users, &zones, &logins, &granted, &nows)
    }

    /// Of the job's caps, (caps, the campaigns they limit): what [`crate::check::caps`] checks.
    pub fn caps(&self) -> (Vec<naive::NCap>, BTreeSet<String>) {
        let capped = naive::campaigns(&self.job)
            .0
            .into_iter()
            .filter(|c| c.capped())
            .map(|c| c.id)
            .collect();
        (naive::frequency_caps(&self.job), capped)
    }
}
