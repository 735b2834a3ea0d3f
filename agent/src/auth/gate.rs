//! Failed authentications, rate limited per client address: past the
//! limit, an address gets 429 without its token being looked at, until
//! its failures age out of the window.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a failure counts.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most; the quietest are forgotten first.
const MAX_ADDRESSES: usize = 10_000;

/// Recent failures by address.
#[derive(Debug)]
pub struct FailureGate {
    limit: usize,
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl FailureGate {
    /// Allows `limit` failures per address within [`WINDOW`].
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            failures: Mutex::default(),
        }
    }

    /// Whether `ip` is past the limit now.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        self.is_blocked_at(ip, Instant::now())
    }

    /// Counts a failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        self.failed_at(ip, Instant::now());
    }

    fn is_blocked_at(&self, ip: IpAddr, now: Instant) -> bool {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let Some(times) = failures.get_mut(&ip) else {
            return false;
        };
        expire(times, now);
        if times.is_empty() {
            failures.remove(&ip);
            return false;
        }
        times.len() >= self.limit
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_ADDRESSES && !failures.contains_key(&ip) {
            failures.retain(|_, times| {
                expire(times, now);
                !times.is_empty()
            });
        }
        let times = failures.entry(ip).or_default();
        expire(times, now);
        times.push_back(now);
        if times.len() > self.limit {
            times.pop_front();
        }
    }
}

fn expire(times: &mut VecDeque<Instant>, now: Instant) {
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW)
    {
        times.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_blocked_past_the_limit_until_its_failures_age_out() {
        const MAX_FAILURES: usize = 20;
        let gate = FailureGate::new(MAX_FAILURES);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let start = Instant::now();
        for i in 0..MAX_FAILURES {
            assert!(!gate.is_blocked_at(a, start), "blocked after {i}");
            gate.failed_at(a, start);
        }
        assert!(gate.is_blocked_at(a, start));
        assert!(!gate.is_blocked_at(b, start), "others are not");
        assert!(gate.is_blocked_at(a, start + WINDOW - Duration::from_secs(1)));
        assert!(!gate.is_blocked_at(a, start + WINDOW));
    }
}
