//! Failed authentications (and requests refused before authentication),
//! rate limited per client address: past the limit, an address's
//! unauthenticated requests get 429 until its failures age out of the
//! window. A token that verifies is not refused by the block: anyone
//! behind the same NAT as an attacker still gets through with one. IPv6 addresses count per /64 (one
//! host usually holds all of one), and the table is bounded.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::limit::bucket;

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
        let ip = bucket(ip);
        let mut failures = crate::sync::lock(&self.failures);
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
        let ip = bucket(ip);
        let mut failures = crate::sync::lock(&self.failures);
        if failures.len() >= MAX_ADDRESSES && !failures.contains_key(&ip) {
            failures.retain(|_, times| {
                expire(times, now);
                !times.is_empty()
            });
            // Still full: forget the address whose last failure is oldest.
            if failures.len() >= MAX_ADDRESSES {
                let quietest = failures
                    .iter()
                    .min_by_key(|(_, times)| times.back().copied())
                    .map(|(ip, _)| *ip);
                if let Some(quietest) = quietest {
                    failures.remove(&quietest);
                }
            }
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

    #[test]
    fn ipv6_addresses_count_per_64_and_the_table_stays_bounded() {
        let gate = FailureGate::new(2);
        let now = Instant::now();
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let other_host: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        gate.failed_at(one, now);
        gate.failed_at(other_host, now);
        assert!(gate.is_blocked_at("2001:db8:1:2::77".parse().unwrap(), now));
        assert!(!gate.is_blocked_at("2001:db8:1:3::1".parse().unwrap(), now));
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            gate.failed_at(IpAddr::V4(i.into()), now);
        }
        assert!(gate.failures.lock().unwrap().len() <= MAX_ADDRESSES);
    }
}
