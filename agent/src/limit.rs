//! How many connections deployd holds open, for the switch and the API
//! alike: caps in all and per client address, past which a new connection
//! is closed at once, and the open-file limit they must fit under.
//!
//! Without caps a flood of idle connections to the public port takes every
//! file descriptor the process has, and then nothing works: not the site,
//! not the API, not Docker. So the process raises its soft open-file limit
//! to the hard one at start, each listener gets a cap, and the switch's
//! caps are lowered to what the limit leaves once the API's and deployd's
//! own needs are set aside.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// File descriptors kept for deployd itself: the Docker socket, the store,
/// log and spool files, health checks, the registry.
pub const RESERVED_FDS: u64 = 256;

/// The key an address counts under: itself, or its /64 for IPv6 (one host
/// usually holds all of one).
pub fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

/// Raises the soft open-file limit to the hard limit (systemd starts
/// services at 1024 soft) and returns the soft limit now in force.
pub fn raise_open_files() -> u64 {
    let (before, hard) = match rlimit::Resource::NOFILE.get() {
        Ok((soft, hard)) => (Some(soft), hard),
        Err(_) => (None, u64::MAX),
    };
    // Under the packaged unit the limit is set (LimitNOFILE=) and may not
    // be changed (its system call filter refuses setrlimit): nothing to do.
    if let Some(soft) = before.filter(|soft| *soft >= hard) {
        return soft;
    }
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) => {
            if before.is_some_and(|b| b < now) {
                tracing::info!(from = before, to = now, "open-file limit raised");
            }
            now
        }
        Err(e) => {
            let soft = before.unwrap_or(1024);
            tracing::warn!(error = %e, limit = soft, "cannot raise the open-file limit");
            soft
        }
    }
}

/// The soft open-file limit in force.
pub fn open_files() -> u64 {
    rlimit::Resource::NOFILE
        .get()
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The cap in all.
    Total,
    /// The cap for the connection's address.
    Address,
}

/// Things open at once per key (an address, a token), each key capped.
#[derive(Debug)]
pub struct Tally<K: Hash + Eq> {
    cap: usize,
    open: Mutex<HashMap<K, usize>>,
}

impl<K: Hash + Eq + Clone> Tally<K> {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            open: Mutex::default(),
        })
    }

    /// Counts one more for `key`, until the guard drops; `None` past the cap.
    pub fn take(self: &Arc<Self>, key: K) -> Option<Counted<K>> {
        let mut open = crate::sync::lock(&self.open);
        let count = open.entry(key.clone()).or_insert(0);
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(Counted {
            tally: self.clone(),
            key,
        })
    }

    /// Keys with something open.
    pub fn keys(&self) -> usize {
        crate::sync::lock(&self.open).len()
    }
}

/// One counted in a [`Tally`]; dropping it frees its place.
#[derive(Debug)]
pub struct Counted<K: Hash + Eq> {
    tally: Arc<Tally<K>>,
    key: K,
}

impl<K: Hash + Eq> Drop for Counted<K> {
    fn drop(&mut self) {
        let mut open = crate::sync::lock(&self.tally.open);
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Connections open at once on one listener, counted in all and by address.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    open: AtomicUsize,
    by_address: Option<Arc<Tally<IpAddr>>>,
}

impl Admission {
    pub fn new(max: usize, per_address: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            open: AtomicUsize::new(0),
            by_address: per_address.map(Tally::new),
        })
    }

    /// The cap in all.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a new connection from `ip`, or says which cap it is past.
    /// The connection is counted until the returned guard drops.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Full> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Total);
        }
        let address = match &self.by_address {
            None => None,
            Some(tally) => match tally.take(bucket(ip)) {
                Some(counted) => Some(counted),
                None => {
                    self.open.fetch_sub(1, Ordering::AcqRel);
                    return Err(Full::Address);
                }
            },
        };
        Ok(Admitted {
            admission: self.clone(),
            _address: address,
        })
    }
}

/// An admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    _address: Option<Counted<IpAddr>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_in_all_and_per_address_until_they_close() {
        let admission = Admission::new(3, Some(2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = admission.admit(a).unwrap();
        let _second = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).unwrap_err(), Full::Address);
        let _third = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).unwrap_err(), Full::Total);
        assert_eq!(admission.open(), 3);
        drop(first);
        assert_eq!(admission.open(), 2);
        let _again = admission.admit(a).unwrap();
        assert_eq!(admission.by_address.as_ref().unwrap().keys(), 2);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let admission = Admission::new(100, Some(1));
        let _one = admission.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert_eq!(
            admission
                .admit("2001:db8:1:2:ffff::9".parse().unwrap())
                .unwrap_err(),
            Full::Address
        );
        assert!(admission.admit("2001:db8:1:3::1".parse().unwrap()).is_ok());
        let _v4 = admission.admit("192.0.2.7".parse().unwrap()).unwrap();
        assert_eq!(
            admission
                .admit("::ffff:192.0.2.7".parse().unwrap())
                .unwrap_err(),
            Full::Address
        );
    }

    #[test]
    fn without_a_per_address_cap_only_the_total_counts() {
        let admission = Admission::new(2, None);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let _a = admission.admit(ip).unwrap();
        let _b = admission.admit(ip).unwrap();
        assert_eq!(admission.admit(ip).unwrap_err(), Full::Total);
    }

    #[test]
    fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
        let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
        let now = raise_open_files();
        assert_eq!(now, open_files());
        // Linux caps the soft limit at nr_open even when hard says more.
        assert!(now <= hard);
    }
}
