//! `GET /metrics` (Prometheus text format) and `GET /healthz` on `--listen`.
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
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::health::Health;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::providers::dispatch::Dispatcher;

/// How long a client may take to send a request's headers (or, on a kept-alive connection,
/// to start the next request) before its connection is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 256;

/// Upper bounds (seconds) of the push-latency histogram's buckets.
const LATENCY_BOUNDS_S: [f64; 12] = [
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
        out
    }
}

/// Binds `addr` (a taken port is a runtime error, exit 1).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::runtime(format!("cannot listen on {addr}: {e}")))
}

/// Serves `/metrics` and `/healthz` on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, exposition: Arc<Exposition>) {
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
    let (status, content_type, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            exposition.render(),
        ),
        ("GET", "/healthz") => match exposition.health.check().await {
            Ok(()) => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("unavailable\n{why}\n"),
            ),
        },
        ("GET", _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    Ok(response)
}
