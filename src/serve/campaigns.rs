//! The campaign stream as `serve` uses it: the task that reads it, the admission of each
//! submitted campaign, and the acknowledgement of entries once done with.
//!
//! An entry is refused — logged, counted, acknowledged — when it is not a campaign, is over
//! the size limits ([`super::submitted`]) or repeats a recent campaign's content. One that
//! died with [`MAX_ATTEMPTS`] earlier processes is set aside in the dead-letter stream
//! ([`super::attempts`]). Otherwise it is kept (lazy coupons, hot products: acknowledged now)
//! or its fan-out is queued (acknowledged when done).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::attempts::{Attempts, DEAD, MAX_ATTEMPTS};
use super::http::ServeCounters;
use super::submitted::{self, Registry, Submitted};
use super::{Flags, READ_BLOCK};
use crate::error::{Error, Result};
use crate::job::content_hash;
use crate::model::Campaign;
use crate::store::{Fence, Store};
use crate::streams::{StreamReader, CAMPAIGNS};

/// Entries asked for per read: each may be up to the entry size limit.
const PER_READ: usize = 100;

/// What admitting a submitted campaign came to.
#[derive(Debug)]
pub enum Admitted {
    /// Refused or set aside (acknowledged): nothing to run.
    Refused,
    /// Kept in its hash (acknowledged): active from now on.
    Kept(Arc<Campaign>),
    /// A fan-out to run; its entry is acknowledged once the fan-out is done.
    FanOut(Arc<Campaign>, String),
}

/// The campaign stream, the hashes its kept campaigns live in, and its entries' attempts.
pub struct CampaignStream {
    /// The stream's reader; reading runs in [`read`].
    pub reader: Arc<StreamReader>,
    /// Where lazy coupons and hot products are kept.
    pub registry: Registry,
    attempts: Attempts,
}

impl CampaignStream {
    /// Opens the stream at `url` as `consumer`, read while `fence` holds; a lost group is
    /// counted in `counters`.
    pub async fn open(
        url: &str,
        consumer: &str,
        fence: Fence,
        counters: &Arc<ServeCounters>,
    ) -> Result<CampaignStream> {
        let reader = StreamReader::open(url, CAMPAIGNS, consumer)
            .await?
            .on_group_lost(super::count_group_lost(counters))
            .fenced_by(fence);
        Ok(CampaignStream {
            reader: Arc::new(reader),
            registry: Registry::open(url).await?,
            attempts: Attempts::open(url).await?,
        })
    }

    /// Acknowledges `entries`: done with, never read again.
    pub async fn ack(&self, entries: &[String]) -> Result<()> {
        self.reader.ack(entries).await?;
        self.attempts.forget(entries).await
    }

    /// Gives back this process's attempts at `entries`, still pending at an orderly stop.
    pub async fn give_back(&self, entries: &[String]) -> Result<()> {
        self.attempts.give_back(entries).await
    }

    /// Admits `s` (see the module docs).
    pub async fn admit(
        &self,
        s: Submitted,
        store: &Store,
        counters: &ServeCounters,
    ) -> Result<Admitted> {
        let campaign = match s.campaign {
            Ok(c) => c,
            Err(why) => return self.refuse(&s.entry, &why, counters).await,
        };
        let died = self.attempts.begin(&s.entry).await?;
        if died >= MAX_ATTEMPTS {
            return self.set_aside(&s.entry, &s.job, died, counters).await;
        }
        match store
            .admit(&[(content_hash(&campaign), campaign.id.clone())])
            .await
        {
            Ok(()) => {}
            Err(e @ Error::Duplicate { .. }) => {
                return self.refuse(&s.entry, &e.to_string(), counters).await
            }
            Err(e) => return Err(e),
        }
        store.save_campaigns(&[&campaign]).await?;
        counters.campaigns_admitted.fetch_add(1, Relaxed);
        tracing::info!(campaign = %campaign.id, entry = %s.entry, "campaign admitted");
        if self.registry.keep(&campaign, &s.job).await? {
            self.ack(std::slice::from_ref(&s.entry)).await?;
            return Ok(Admitted::Kept(campaign));
        }
        Ok(Admitted::FanOut(campaign, s.entry))
    }

    /// Refuses `entry`: logged, counted, acknowledged (sending it again would not change it).
    async fn refuse(&self, entry: &str, why: &str, counters: &ServeCounters) -> Result<Admitted> {
        tracing::error!(error = %why, entry, "submitted campaign refused");
        counters.campaigns_rejected.fetch_add(1, Relaxed);
        self.ack(&[entry.to_owned()]).await?;
        Ok(Admitted::Refused)
    }

    /// Moves `entry` to the dead-letter stream and acknowledges it: `died` processes died
    /// working on it.
    async fn set_aside(
        &self,
        entry: &str,
        job: &str,
        died: i64,
        counters: &ServeCounters,
    ) -> Result<Admitted> {
        let why = format!("{died} processes died working on it");
        tracing::error!(
            entry,
            dead_letters = DEAD,
            "submitted campaign set aside: {why}"
        );
        self.attempts.bury(entry, job, &why, died).await?;
        counters.campaigns_dead_lettered.fetch_add(1, Relaxed);
        self.ack(&[entry.to_owned()]).await?;
        Ok(Admitted::Refused)
    }
}

/// Reads submitted campaigns (first those left pending) into `tx` and asks for a new
/// generation, until shutdown.
pub(super) async fn read(
    reader: Arc<StreamReader>,
    tx: mpsc::UnboundedSender<Submitted>,
    flags: Arc<Flags>,
) {
    let mut first = match reader.reclaim().await {
        Ok(entries) => entries,
        Err(e) => {
            tracing::error!(error = %e, "cannot reclaim pending campaigns");
            Vec::new()
        }
    };
    while !flags.shutdown.load(Relaxed) {
        let entries = if first.is_empty() {
            match reader.read(PER_READ, READ_BLOCK).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "reading campaigns failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        } else {
            std::mem::take(&mut first)
        };
        for entry in &entries {
            let submitted = submitted::submitted(entry);
            let transactional = submitted
                .campaign
                .as_ref()
                .is_ok_and(|c| c.priority == crate::model::Priority::Transactional);
            if tx.send(submitted).is_err() {
                return;
            }
            if transactional {
                // After the send: the generation cut short finds it waiting.
                flags.urgent.store(true, Relaxed);
            }
        }
        if !entries.is_empty() {
            flags.replan.store(true, Relaxed);
        }
    }
}
