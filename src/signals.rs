//! SIGINT and SIGTERM: the two ways an operator (a terminal's Ctrl-C, Kubernetes, systemd)
//! asks `run` or `serve` to stop. Both commands wait for them the same way.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Listens for SIGINT and SIGTERM from creation on.
pub struct StopSignals {
    term: Signal,
}

impl StopSignals {
    /// Starts listening (inside a tokio runtime); logs and returns `None` if it cannot.
    pub fn listen() -> Option<StopSignals> {
        match signal(SignalKind::terminate()) {
            Ok(term) => Some(StopSignals { term }),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                None
            }
        }
    }

    /// Waits for the next SIGINT or SIGTERM.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = self.term.recv() => {}
        }
    }
}
