//! The status page of `serve` (SPEC "Campaign control and status"): `GET /` is one
//! self-contained HTML page (its CSS and script inline, nothing fetched from elsewhere), which
//! reads `GET /api/campaigns` every 2 s and whose buttons `POST
//! /api/campaigns/{id}/pause|resume|cancel`.
//!
//! **What is read.** Every campaign the store has a record of, with its outcome counts summed
//! over its ledgers and its state derived as `fanout campaigns list` does
//! ([`crate::control`]); each reading is kept for [`CACHE_FOR`] (longer when reading took
//! long, see [`ttl`]) and one reading serves every request that waits for it, so many open
//! pages cost one reading a second. On Redis the reading has a read-only connection of its own
//! (opening a ledger on `serve`'s own connection would adopt orphaned in-flight users); the
//! embedded store is read through `serve`'s handle, which sees what is not yet on disk. Rate,
//! progress and ETA are this process's ([`super::live`]).
//!
//! **Changes.** A `POST` is refused unless it comes from the page itself: its `Origin` must be
//! this listener's (`http://` or `https://` and the request's `Host`) and `Sec-Fetch-Site`,
//! when sent, `same-origin` — else 403, so no other site can make an operator's browser pause
//! or cancel anything. On a loopback listener (the default) the `Host` must name the loopback
//! too (`localhost`, `127.x.x.x`, `[::1]`), so a site whose DNS name is made to point at
//! 127.0.0.1 (DNS rebinding) is refused as well. Nothing here authenticates: whoever can reach
//! the listener can use the buttons (bind it to loopback or a private network). The id must be a campaign id (400), the store must know it (404); the
//! body, which nothing needs, may be at most [`MAX_BODY`] bytes (413). The answer comes once
//! [`Store::set_state`] returned, that is once the change is durable; cancelling is final, so
//! pausing or resuming a cancelled campaign is a 409.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HOST, ORIGIN};
use hyper::{Method, Request, StatusCode};
use serde::Serialize;
use tokio::sync::Mutex;

use super::http::{Reply, LATENCY_BOUNDS_S};
use super::live::{Live, View};
use crate::control::Status;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::store::campaigns::{rfc3339_text, State, Transition};
use crate::store::Store;

/// The page, built into the binary.
pub const PAGE: &str = include_str!("status.html");
/// The shortest time a reading of the store is kept.
pub const CACHE_FOR: Duration = Duration::from_secs(1);
/// The longest a reading is kept (when reading is slow).
const CACHE_AT_MOST: Duration = Duration::from_secs(30);
/// How long one reading may take before the request is answered 503.
const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// The most a control request's body may hold (the page sends none).
pub const MAX_BODY: usize = 1024;
/// How long a client has to send a control request's body.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// The page's data source and the operator's switch.
pub struct StatusApi {
    /// What the listing is read from and states are written to.
    store: Store,
    /// The store's URL without its password.
    shown: String,
    /// The listener is on a loopback address: changes must name it so ([`same_origin`]).
    loopback: bool,
    live: Arc<Live>,
    cache: Mutex<Option<Reading>>,
}

/// One reading of the store.
struct Reading {
    at: Instant,
    took: Duration,
    campaigns: Arc<Vec<Status>>,
}

/// How long a reading that took `took` is kept: [`CACHE_FOR`], or four times as long as it
/// took (so reading never takes more than a fifth of the store's time), at most
/// [`CACHE_AT_MOST`].
pub fn ttl(took: Duration) -> Duration {
    (took * 4).clamp(CACHE_FOR, CACHE_AT_MOST)
}

/// What `GET /api/campaigns` answers.
#[derive(Serialize)]
struct Api<'a> {
    /// When this answer was made, RFC 3339.
    now: String,
    /// The store, without its password.
    store: &'a str,
    /// Pushes in flight in this process now.
    in_flight: usize,
    /// Every campaign of the store, by id.
    campaigns: Vec<Campaign>,
    /// Seconds between the samples of `deliveries_per_s`.
    sample_every_s: f64,
    /// This process's deliveries per second, one value per sample, oldest first (ten minutes).
    deliveries_per_s: Vec<f64>,
    /// This process's push-latency histogram.
    push_latency: Latency,
}

/// One campaign: `fanout campaigns show --json`'s fields, with `rate_per_s` and `eta_s` of
/// this process, and its progress.
#[derive(Serialize)]
struct Campaign {
    #[serde(flatten)]
    status: Status,
    /// Share settled, `0.0 ..= 1.0`: 1 once done; else, for a fan-out this process scanned,
    /// its progress ([`super::live`]); else `null`.
    progress: Option<f64>,
}

/// The push-latency histogram as counts per bucket.
#[derive(Serialize)]
struct Latency {
    /// Upper bound of each bucket, seconds; the last is `null` (slower than every bound).
    le_s: Vec<Option<f64>>,
    /// Pushes in each bucket.
    count: Vec<u64>,
    /// Pushes.
    total: u64,
    /// Mean push time, seconds.
    mean_s: f64,
}

/// The answer to a control request.
#[derive(Serialize)]
struct Changed<'a> {
    id: &'a str,
    state: State,
    /// The state before; equal to `state` when nothing changed.
    from: State,
    changed: bool,
}

impl StatusApi {
    /// The API over `store` (at `url`) for the listener on `listen`; on Redis it opens a
    /// read-only connection of its own.
    pub async fn open(
        store: &Store,
        url: &str,
        listen: SocketAddr,
        live: Arc<Live>,
    ) -> Result<StatusApi> {
        let store = match store {
            Store::Redis(_) => Store::connect_read_only(url).await?,
            Store::File(_) => store.clone(),
        };
        Ok(StatusApi {
            store,
            shown: crate::store::redis::shown(url),
            loopback: listen.ip().is_loopback(),
            live,
            cache: Mutex::new(None),
        })
    }

    /// `GET /api/campaigns`; `in_flight` is the dispatcher's pushes in flight.
    pub async fn campaigns(&self, in_flight: usize) -> Reply {
        let statuses = match self.listing().await {
            Ok(s) => s,
            Err(e) => {
                return Reply::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("cannot read the store: {e}\n"),
                )
            }
        };
        let views = self.live.views();
        let campaigns = statuses
            .iter()
            .map(|s| campaign(s.clone(), views.get(&s.id).copied().unwrap_or_default()))
            .collect();
        let api = Api {
            now: rfc3339_text(&Utc::now()),
            store: &self.shown,
            in_flight,
            campaigns,
            sample_every_s: super::live::SAMPLE_EVERY.as_secs_f64(),
            deliveries_per_s: self.live.deliveries_per_s(),
            push_latency: latency(self.live.metrics()),
        };
        match serde_json::to_string(&api) {
            Ok(body) => Reply::json(StatusCode::OK, body),
            Err(e) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    }

    /// `POST /api/campaigns/{id}/{action}` (see the [module docs](self)).
    pub async fn control(&self, req: Request<Incoming>, id: &str, action: &str) -> Reply {
        if req.method() != Method::POST {
            return Reply::text(StatusCode::METHOD_NOT_ALLOWED, "POST only\n").allow("POST");
        }
        if let Err(why) = same_origin(req.headers(), self.loopback) {
            return Reply::text(StatusCode::FORBIDDEN, format!("refused: {why}\n"));
        }
        if !crate::job::is_valid_id(id) {
            return Reply::text(
                StatusCode::BAD_REQUEST,
                "not a campaign id: expected [A-Za-z0-9_-], 1 to 64 characters\n",
            );
        }
        let Some(state) = state_of(action) else {
            return Reply::text(
                StatusCode::NOT_FOUND,
                "no such action: pause, resume or cancel\n",
            );
        };
        if let Err(reply) = read_body(req).await {
            return reply;
        }
        match self.store.campaign(id).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Reply::text(
                    StatusCode::NOT_FOUND,
                    format!("no campaign {id:?} in store {}\n", self.shown),
                )
            }
            Err(e) => return store_error(e),
        }
        let result = self.store.set_state(id, state).await;
        // Whatever happened, the next reading shows the store as it is now.
        *self.cache.lock().await = None;
        let from = match result {
            Ok(Transition::Changed(from)) => from,
            Ok(Transition::Unchanged) => state,
            Err(Error::Usage(why)) => return Reply::text(StatusCode::CONFLICT, format!("{why}\n")),
            Err(e) => return store_error(e),
        };
        tracing::info!(campaign = id, %from, to = %state, "campaign state set from the status page");
        let changed = Changed {
            id,
            state,
            from,
            changed: from != state,
        };
        match serde_json::to_string(&changed) {
            Ok(body) => Reply::json(StatusCode::OK, body),
            Err(e) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    }

    /// The store's campaigns, read at most once per [`ttl`].
    async fn listing(&self) -> Result<Arc<Vec<Status>>> {
        let mut cache = self.cache.lock().await;
        if let Some(r) = cache.as_ref().filter(|r| r.at.elapsed() < ttl(r.took)) {
            return Ok(r.campaigns.clone());
        }
        let started = Instant::now();
        let campaigns = tokio::time::timeout(READ_TIMEOUT, crate::control::statuses(&self.store))
            .await
            .map_err(|_| Error::runtime(format!("no answer in {} s", READ_TIMEOUT.as_secs())))??;
        let campaigns = Arc::new(campaigns);
        *cache = Some(Reading {
            at: Instant::now(),
            took: started.elapsed(),
            campaigns: campaigns.clone(),
        });
        Ok(campaigns)
    }
}

/// `status` with this process's `view` of it.
fn campaign(mut status: Status, view: View) -> Campaign {
    let progress = match status.state {
        State::Done => Some(1.0),
        // Its users not claimed yet were left out of the scan: it has no share to show.
        State::Paused => None,
        _ => view.progress,
    };
    // This process's rate over the last minute where it has one, else the store's average
    // over the recorded pushes.
    status.rate_per_s = view.rate_per_s.or(status.rate_per_s);
    // A paused or cancelled campaign is not on its way anywhere.
    status.eta_s = match status.state {
        State::Running => view.eta_s,
        State::Done => Some(0.0),
        _ => None,
    };
    Campaign { status, progress }
}

/// The push-latency histogram of `metrics`, per bucket of [`LATENCY_BOUNDS_S`].
fn latency(metrics: &Metrics) -> Latency {
    let (cumulative, total, sum_s) = metrics.latency_cumulative(&LATENCY_BOUNDS_S);
    let mut count = Vec::with_capacity(cumulative.len() + 1);
    let mut below = 0;
    for n in cumulative.into_iter().chain([total]) {
        count.push(n.saturating_sub(below));
        below = below.max(n);
    }
    Latency {
        le_s: LATENCY_BOUNDS_S
            .iter()
            .copied()
            .map(Some)
            .chain([None])
            .collect(),
        count,
        total,
        mean_s: if total > 0 { sum_s / total as f64 } else { 0.0 },
    }
}

/// The state an action sets.
fn state_of(action: &str) -> Option<State> {
    match action {
        "pause" => Some(State::Paused),
        "resume" => Some(State::Running),
        "cancel" => Some(State::Cancelled),
        _ => None,
    }
}

/// `Ok` when the request comes from a page of this listener (see the [module docs](self));
/// `loopback`: the listener is on a loopback address.
pub fn same_origin(headers: &HeaderMap, loopback: bool) -> std::result::Result<(), &'static str> {
    if let Some(site) = headers.get("sec-fetch-site") {
        if site.as_bytes() != b"same-origin" {
            return Err("the request comes from another site (Sec-Fetch-Site)");
        }
    }
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .ok_or("no Host header")?;
    if loopback && !names_loopback(host) {
        return Err("the Host does not name the loopback this listener is on");
    }
    let origin = headers
        .get(ORIGIN)
        .and_then(|o| o.to_str().ok())
        .ok_or("no Origin header: changes are only taken from the status page")?;
    let same = ["http://", "https://"]
        .iter()
        .any(|scheme| origin.strip_prefix(scheme) == Some(host));
    match same {
        true => Ok(()),
        false => Err("the Origin is not this listener"),
    }
}

/// Whether `host` (a `Host` header: a name or address, maybe a port) names the loopback.
fn names_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // `[::1]:9898`
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Reads a control request's body: at most [`MAX_BODY`] bytes within [`BODY_TIMEOUT`].
async fn read_body(req: Request<Incoming>) -> std::result::Result<(), Reply> {
    let too_large = || {
        Reply::text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a control request's body is at most {MAX_BODY} bytes (none is needed)\n"),
        )
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(BODY_TIMEOUT, body).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(too_large()),
        Err(_) => Err(Reply::text(
            StatusCode::REQUEST_TIMEOUT,
            "the body did not arrive in time\n",
        )),
    }
}

/// A store that could not be read or written.
fn store_error(e: Error) -> Reply {
    tracing::warn!(error = %e, "status page: store");
    Reply::text(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n"))
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_the_pages_own_origin_may_change_a_state() {
        let host = ("host", "127.0.0.1:9898");
        let ok = |h: &[(&'static str, &'static str)]| same_origin(&headers(h), true).is_ok();
        assert!(ok(&[host, ("origin", "http://127.0.0.1:9898")]));
        assert!(ok(&[
            host,
            ("origin", "https://127.0.0.1:9898"),
            ("sec-fetch-site", "same-origin")
        ]));
        assert!(ok(&[
            ("host", "localhost:80"),
            ("origin", "http://localhost:80")
        ]));
        assert!(ok(&[
            ("host", "[::1]:9898"),
            ("origin", "http://[::1]:9898")
        ]));
        // A name pointed at the loopback by another site's DNS (rebinding): refused on a
        // loopback listener, taken on one bound elsewhere.
        let rebound = [
            ("host", "evil.example:9898"),
            ("origin", "http://evil.example:9898"),
        ];
        assert!(!ok(&rebound));
        assert!(same_origin(&headers(&rebound), false).is_ok());
        for refused in [
            vec![host],
            vec![host, ("origin", "null")],
            vec![host, ("origin", "http://evil.example")],
            vec![host, ("origin", "http://127.0.0.1:9899")],
            vec![host, ("origin", "http://127.0.0.1:9898.evil.example")],
            vec![
                host,
                ("origin", "http://127.0.0.1:9898"),
                ("sec-fetch-site", "cross-site"),
            ],
            vec![("origin", "http://127.0.0.1:9898")],
        ] {
            assert!(!ok(&refused), "{refused:?}");
        }
    }

    #[test]
    fn readings_are_kept_longer_when_slow_within_bounds() {
        assert_eq!(ttl(Duration::from_millis(10)), CACHE_FOR);
        assert_eq!(ttl(Duration::from_secs(2)), Duration::from_secs(8));
        assert_eq!(ttl(Duration::from_secs(60)), CACHE_AT_MOST);
    }

    #[test]
    fn latency_buckets_are_counts_per_bucket_with_an_overflow() {
        let m = Metrics::new();
        m.record_latency(Duration::from_micros(500), 3);
        m.record_latency(Duration::from_millis(30), 2);
        m.record_latency(Duration::from_secs(20), 1);
        let l = latency(&m);
        assert_eq!(l.total, 6);
        assert_eq!(l.count.len(), LATENCY_BOUNDS_S.len() + 1);
        assert_eq!(l.count[0], 3);
        assert_eq!(l.count[4], 2, "30 ms is in the ≤ 50 ms bucket");
        assert_eq!(*l.count.last().unwrap(), 1);
        assert_eq!(l.le_s.last(), Some(&None));
    }

    #[test]
    fn a_done_campaign_is_all_settled_and_a_paused_one_has_no_eta() {
        let view = View {
            rate_per_s: Some(2.0),
            progress: Some(0.5),
            eta_s: Some(10.0),
        };
        let status = |state| Status {
            id: "a".into(),
            kind: crate::model::Kind::Promotion,
            priority: crate::model::Priority::Normal,
            state,
            stored_state: State::Running,
            start: String::new(),
            end: String::new(),
            admitted_at: String::new(),
            holdout: 0.0,
            ledgers: vec![],
            outcomes: crate::report::OutcomeCounts::default(),
            settled: 0,
            first_send: None,
            last_send: None,
            rate_per_s: None,
            eta_s: None,
            workers: Vec::new(),
        };
        let c = campaign(status(State::Running), view);
        assert_eq!((c.progress, c.status.eta_s), (Some(0.5), Some(10.0)));
        let c = campaign(status(State::Done), view);
        assert_eq!((c.progress, c.status.eta_s), (Some(1.0), Some(0.0)));
        let c = campaign(status(State::Paused), view);
        assert_eq!((c.status.rate_per_s, c.status.eta_s), (Some(2.0), None));
        assert_eq!(c.progress, None, "a paused fan-out has no share to show");
    }
}
