//! What `/healthz` checks: that every Redis server `serve` depends on — the store's, the login
//! stream's, the campaign stream's — answers a `PING` within [`PING_TIMEOUT`]. Each server is
//! pinged on a connection of its own, so a blocked stream read never delays the answer.

use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::error::Result;
use crate::run::is_redis;
use crate::store::redis::{connect, shown};

/// How long a server may take to answer a `PING` before `/healthz` calls it unreachable.
pub const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// One Redis server to ping, and what `serve` uses it for.
struct Probe {
    uses: Vec<&'static str>,
    url: String,
    con: ConnectionManager,
}

/// The servers `/healthz` pings.
#[derive(Default)]
pub struct Health {
    probes: Vec<Probe>,
}

impl Health {
    /// Connects to each distinct Redis server among `uses` (`(use, url)`; URLs that are not
    /// Redis are left out: an embedded store is always reachable).
    pub async fn connect(uses: &[(&'static str, Option<&str>)]) -> Result<Health> {
        let mut probes: Vec<Probe> = Vec::new();
        for &(what, url) in uses {
            let Some(url) = url.filter(|u| is_redis(u)) else {
                continue;
            };
            let shown_url = shown(url);
            match probes.iter_mut().find(|p| p.url == shown_url) {
                Some(p) => p.uses.push(what),
                None => probes.push(Probe {
                    uses: vec![what],
                    url: shown_url,
                    con: connect("redis", url).await?,
                }),
            }
        }
        Ok(Health { probes })
    }

    /// `Ok` if every server answered; else which did not, and why (one line each).
    pub async fn check(&self) -> std::result::Result<(), String> {
        let pings = self.probes.iter().map(|p| async move {
            let mut con = p.con.clone();
            let cmd = redis::cmd("PING");
            let ping = cmd.query_async::<String>(&mut con);
            match tokio::time::timeout(PING_TIMEOUT, ping).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(format!("{} {}: {e}", p.uses.join(", "), p.url)),
                Err(_) => Some(format!(
                    "{} {}: no answer to PING in {} ms",
                    p.uses.join(", "),
                    p.url,
                    PING_TIMEOUT.as_millis()
                )),
            }
        });
        let down: Vec<String> = futures::future::join_all(pings)
            .await
            .into_iter()
            .flatten()
            .collect();
        match down.is_empty() {
            true => Ok(()),
            false => Err(down.join("\n")),
        }
    }
}
