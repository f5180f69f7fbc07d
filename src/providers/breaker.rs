//! The systemic-failure breaker: tells a provider that is down (refused connections, a URL
//! that 404s, every call timing out) from users that cannot be reached, so that a dead provider
//! stops the run (exit 1, nobody dead-lettered, a re-run delivers) instead of dead-lettering
//! everyone and exiting 0.
//!
//! Two rules, over the attempts the provider answered with a failure that is not about one
//! user (not an invalid token, not a message unsendable as it is — over FCM's size limit —, not
//! a `Retry-After` asking us to slow down):
//! - **Start**: the first [`START_FAILURES`] attempts of the run all failed, and none was
//!   delivered: nothing suggests the provider works at all.
//! - **Window**: of the last [`WINDOW`] to 2 × [`WINDOW`] attempts, at least
//!   [`WINDOW_FAILURE_PCT`] % failed: it worked once and has gone down since.
//!
//! Until the provider has delivered once, a permanent failure is not trusted to be about its
//! user (a 404 may be the URL's): the dispatcher retries it instead of dead-lettering it
//! ([`Breaker::proven`]), so a dead provider caught by the start rule has dead-lettered nobody.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Failed attempts, with nothing delivered, that trip the start rule.
pub const START_FAILURES: u64 = 20;
/// Attempts per half of the sliding window.
pub const WINDOW: u64 = 1000;
/// The share of failed attempts in the window that trips it.
pub const WINDOW_FAILURE_PCT: u64 = 95;

/// Attempts and failures of one half of the window.
#[derive(Debug, Default, Clone, Copy)]
struct Half {
    attempts: u64,
    failed: u64,
}

#[derive(Debug, Default)]
struct State {
    failed_before_first: u64,
    previous: Half,
    current: Half,
}

/// Counts attempts' outcomes and says when the provider, not its users, is failing.
#[derive(Debug, Default)]
pub struct Breaker {
    delivered_ever: AtomicBool,
    state: Mutex<State>,
}

impl Breaker {
    /// Counts `delivered` successful and `failed` failed attempts (`cause`: the last failure's
    /// error). Returns why the provider counts as down, if it now does.
    pub fn observe(&self, delivered: u64, failed: u64, cause: &str) -> Option<String> {
        let Ok(mut st) = self.state.lock() else {
            return None;
        };
        let proven = delivered > 0 || self.proven();
        if delivered > 0 {
            self.saw_delivery();
        } else if !proven {
            st.failed_before_first += failed;
        }
        st.current.attempts += delivered + failed;
        st.current.failed += failed;
        if st.current.attempts >= WINDOW {
            st.previous = std::mem::take(&mut st.current);
        }
        if !proven && st.failed_before_first >= START_FAILURES {
            return Some(format!(
                "the provider failed the first {} attempts of the run and delivered none \
                 (last error: {cause})",
                st.failed_before_first
            ));
        }
        let attempts = st.previous.attempts + st.current.attempts;
        let failed_now = st.previous.failed + st.current.failed;
        if failed > 0
            && st.previous.attempts >= WINDOW
            && failed_now * 100 >= attempts * WINDOW_FAILURE_PCT
        {
            return Some(format!(
                "the provider failed {failed_now} of the last {attempts} attempts (last error: \
                 {cause})"
            ));
        }
        None
    }

    /// Notes that the provider has delivered (counted by [`Self::observe`] later).
    pub fn saw_delivery(&self) {
        // Read first: the workers' tasks note deliveries side by side, and a store on each
        // took the cache line from the other core.
        if !self.proven() {
            self.delivered_ever.store(true, Ordering::Release);
        }
    }

    /// Whether the provider has delivered at least once in this run: until then a permanent
    /// failure may be the provider's (a wrong URL), not the user's.
    pub fn proven(&self) -> bool {
        self.delivered_ever.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_that_never_delivers_trips_at_the_start() {
        let b = Breaker::default();
        for _ in 0..START_FAILURES - 1 {
            assert_eq!(b.observe(0, 1, "refused"), None);
        }
        assert!(!b.proven());
        let why = b.observe(0, 1, "connection refused").expect("tripped");
        assert!(
            why.contains("connection refused") && why.contains("first 20"),
            "{why}"
        );
    }

    #[test]
    fn one_delivery_first_keeps_the_start_rule_quiet() {
        let b = Breaker::default();
        assert_eq!(b.observe(1, 0, ""), None);
        assert!(b.proven());
        for _ in 0..WINDOW - 2 {
            assert_eq!(b.observe(0, 1, "503"), None, "the window is not full yet");
        }
    }

    #[test]
    fn a_provider_that_goes_down_trips_the_window() {
        let b = Breaker::default();
        // Healthy: 30% failures (a flaky provider) for three windows.
        for i in 0..3 * WINDOW {
            assert_eq!(
                b.observe(u64::from(i % 10 >= 3), u64::from(i % 10 < 3), "503"),
                None
            );
        }
        // Down: the window's failure share climbs past 95% within two windows.
        let tripped = (0..2 * WINDOW).find_map(|_| b.observe(0, 1, "connection refused"));
        let why = tripped.expect("tripped");
        assert!(why.contains("connection refused"), "{why}");
    }

    #[test]
    fn a_flaky_provider_never_trips() {
        let b = Breaker::default();
        for i in 0..20 * WINDOW {
            let failed = u64::from(i % 100 >= 10);
            assert_eq!(b.observe(1 - failed, failed, "503"), None, "at {i}");
        }
    }
}
