//! What `serve` answers on `--listen`: `GET /` the status page and `GET /api/campaigns` its
//! JSON, `POST /api/campaigns/{id}/pause|resume|cancel` its buttons (all in [`status`]),
//! `GET /metrics` (Prometheus text format, per campaign too: [`live`](super::live)) and `GET /healthz`.
//! A known path asked with another method is a 405, any other path a 404.
//!
//! The listener is exposed to whatever can reach it, so it holds nothing for long: a client
//! has [`HEADER_TIMEOUT`] to send each request's headers (an idle keep-alive connection is
//! closed after as long), and at most [`MAX_CONNECTIONS`] connections are served at once —
//! one more is closed as soon as it is accepted.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::health::Health;
use super::live::Live;
use super::status::{self, StatusApi};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::providers::dispatch::Dispatcher;

/// How long a client may take to send a request's headers (or, on a kept-alive connection,
/// to start the next request) before its connection is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 256;

/// Upper bounds (seconds) of the push-latency histogram's buckets (`/metrics` and the status
/// page).
pub const LATENCY_BOUNDS_S: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

crate::metrics::counters! {
    /// Counters of `serve` itself, beside the engine's [`Metrics`].
    pub struct ServeCounters / ServeCounts {
        /// Login stream entries that were not a login (logged, acknowledged, skipped).
        logins_bad => "fanout_logins_bad_total",
        /// Campaigns admitted from the job file and the stream.
        campaigns_admitted => "fanout_campaigns_admitted_total",
        /// Submitted campaigns refused: bad TOML, over the size limits, or a duplicate of a
        /// recent one.
        campaigns_rejected => "fanout_campaigns_rejected_total",
        /// Submitted campaigns set aside in the dead-letter stream after processes died
        /// working on them.
        campaigns_dead_lettered => "fanout_campaigns_dead_lettered_total",
        /// Dataflow generations run (a generation ends when campaigns or schedules change).
        generations => "fanout_generations_total",
        /// Times a stream's consumer group was found gone (Redis lost its data, or the stream
        /// was deleted) and re-created.
        stream_groups_recreated => "fanout_stream_groups_recreated_total",
    }
}

/// What `/metrics` reports.
pub struct Exposition {
    /// The engine's counters and latency histogram.
    pub metrics: Arc<Metrics>,
    /// The dispatcher, for pushes in flight.
    pub dispatcher: Arc<Dispatcher>,
    /// `serve`'s own counters.
    pub counters: Arc<ServeCounters>,
    /// What `/healthz` checks.
    pub health: Health,
    /// Per-campaign counters, rates and progress of this process.
    pub live: Arc<Live>,
    /// The status page's data and its buttons.
    pub status: StatusApi,
}

impl Exposition {
    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let m = &self.metrics;
        let mut out = String::new();
        m.count.expose(&mut out);
        self.counters.expose(&mut out);
        let _ = writeln!(
            out,
            "# HELP fanout_in_flight Pushes in flight.\n# TYPE fanout_in_flight gauge\nfanout_in_flight {}",
            self.dispatcher.in_flight()
        );
        let (cumulative, count, sum) = m.latency_cumulative(&LATENCY_BOUNDS_S);
        let name = "fanout_push_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time one push took.\n# TYPE {name} histogram"
        );
        for (bound, n) in LATENCY_BOUNDS_S.iter().zip(cumulative) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
        self.live.expose(&mut out);
        out
    }
}

/// Binds `addr` (a taken port is a runtime error, exit 1).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::runtime(format!("cannot listen on {addr}: {e}")))
}

/// Serves the status page, `/metrics` and `/healthz` on `listener` until the runtime stops
/// (and samples the counters the page draws, once a second).
pub async fn serve(listener: TcpListener, exposition: Arc<Exposition>) {
    tokio::spawn(exposition.live.clone().sample_every_second());
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to be given back.
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Dropping the stream closes it: the caller is told at once, nothing is held.
            continue;
        };
        let exposition = exposition.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| respond(exposition.clone(), req));
            // A client that hangs up mid-request or runs out of time ends here, as it should.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    exposition: Arc<Exposition>,
    req: Request<Incoming>,
) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    // HEAD is a GET whose body hyper leaves out.
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    let reply = match path.as_str() {
        "/" if get => Reply::page(status::PAGE),
        "/api/campaigns" if get => {
            let in_flight = exposition.dispatcher.in_flight();
            exposition.status.campaigns(in_flight).await
        }
        "/metrics" if get => Reply {
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            ..Reply::text(StatusCode::OK, exposition.render())
        },
        "/healthz" if get => match exposition.health.check().await {
            Ok(()) => Reply::text(StatusCode::OK, "ok\n"),
            Err(why) => Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unavailable\n{why}\n"),
            ),
        },
        "/" | "/api/campaigns" | "/metrics" | "/healthz" => {
            Reply::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n").allow("GET, HEAD")
        }
        p => match control_path(p) {
            Some((id, action)) => exposition.status.control(req, id, action).await,
            None => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
        },
    };
    Ok(reply.into_response())
}

/// `(id, action)` of a control path, `/api/campaigns/{id}/{action}`.
fn control_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/api/campaigns/")?;
    let (id, action) = rest.split_once('/')?;
    (!action.contains('/')).then_some((id, action))
}

/// An answer: status, content type, body, and the methods allowed where that is the point.
pub struct Reply {
    /// The status code.
    pub status: StatusCode,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Bytes,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
    /// Served as the status page (with its content security policy).
    pub page: bool,
}

impl Reply {
    /// A plain-text answer.
    pub fn text(status: StatusCode, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from(body.into()),
            allow: None,
            page: false,
        }
    }

    /// A JSON answer.
    pub fn json(status: StatusCode, body: String) -> Reply {
        Reply {
            content_type: "application/json",
            ..Reply::text(status, body)
        }
    }

    /// The status page.
    fn page(html: &'static str) -> Reply {
        Reply {
            content_type: "text/html; charset=utf-8",
            body: Bytes::from_static(html.as_bytes()),
            page: true,
            ..Reply::text(StatusCode::OK, "")
        }
    }

    /// With `Allow: methods`.
    pub fn allow(self, methods: &'static str) -> Reply {
        Reply {
            allow: Some(methods),
            ..self
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        let mut set = |name: HeaderName, value: &'static str| {
            headers.insert(name, HeaderValue::from_static(value));
        };
        set(header::CONTENT_TYPE, self.content_type);
        set(header::CACHE_CONTROL, "no-store");
        set(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
        if let Some(methods) = self.allow {
            set(header::ALLOW, methods);
        }
        if self.page {
            // Nothing but this page's own inline script and style, and requests to this
            // listener; no framing (the buttons cannot be clicked through another site).
            set(header::CONTENT_SECURITY_POLICY, PAGE_POLICY);
            set(header::X_FRAME_OPTIONS, "DENY");
        }
        response
    }
}

/// The status page's content security policy.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_paths_name_one_id_and_one_action() {
        assert_eq!(
            control_path("/api/campaigns/spring-1/pause"),
            Some(("spring-1", "pause"))
        );
        assert_eq!(control_path("/api/campaigns/spring-1"), None);
        assert_eq!(control_path("/api/campaigns/a/b/c"), None);
        assert_eq!(control_path("/api/other/a/pause"), None);
    }
}
