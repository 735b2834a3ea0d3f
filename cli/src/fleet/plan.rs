//! Which hosts of a fleet deploy together, and when a fleet reverts.
//!
//! Hosts deploy in the fleet's order. The first wave holds `first_wave`
//! hosts (its first host runs the `once` release tasks, such as migrate);
//! every later wave holds at most `max_parallel` hosts, a number or a share
//! of the fleet rounded up. Pure arithmetic, so it is tested by itself.

use std::ops::Range;

/// How many hosts deploy at once after the first wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parallel {
    /// At most this many (at least 1).
    Hosts(usize),
    /// At most this share of the fleet, 1 to 100 percent, rounded up.
    Percent(u8),
}

impl Parallel {
    /// `"50%"` (spaces allowed) as a share; `None` unless 1% to 100%.
    pub fn parse_share(text: &str) -> Option<Self> {
        let number = text.trim().strip_suffix('%')?.trim();
        let percent: u8 = number.parse().ok()?;
        (1..=100)
            .contains(&percent)
            .then_some(Self::Percent(percent))
    }

    /// Hosts at once in a fleet of `hosts`: at least 1, at most all.
    pub fn of(self, hosts: usize) -> usize {
        let n = match self {
            Self::Hosts(n) => n,
            Self::Percent(p) => (hosts * usize::from(p)).div_ceil(100),
        };
        n.clamp(1, hosts.max(1))
    }
}

/// The waves of a fleet of `hosts`, as index ranges into its host list.
pub fn waves(hosts: usize, first_wave: usize, parallel: Parallel) -> Vec<Range<usize>> {
    if hosts == 0 {
        return Vec::new();
    }
    let first = first_wave.clamp(1, hosts);
    let step = parallel.of(hosts);
    let mut waves = Vec::new();
    waves.push(0..first);
    let mut start = first;
    while start < hosts {
        let end = (start + step).min(hosts);
        waves.push(start..end);
        start = end;
    }
    waves
}

#[cfg(test)]
// A wave is a range of hosts; a one-wave plan is a list of one range.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn counts_cap_the_later_waves() {
        assert_eq!(waves(3, 1, Parallel::Hosts(1)), [0..1, 1..2, 2..3]);
        assert_eq!(waves(3, 1, Parallel::Hosts(3)), [0..1, 1..3]);
        assert_eq!(waves(5, 2, Parallel::Hosts(2)), [0..2, 2..4, 4..5]);
        // More than the fleet has: the rest at once.
        assert_eq!(waves(4, 1, Parallel::Hosts(10)), [0..1, 1..4]);
        // The first wave may be the whole fleet.
        assert_eq!(waves(3, 3, Parallel::Hosts(1)), [0..3]);
        assert_eq!(waves(3, 9, Parallel::Hosts(1)), [0..3]);
        assert_eq!(waves(1, 1, Parallel::Hosts(1)), [0..1]);
        assert!(waves(0, 1, Parallel::Hosts(1)).is_empty());
    }

    #[test]
    fn shares_round_up_and_never_reach_zero() {
        assert_eq!(Parallel::Percent(50).of(3), 2);
        assert_eq!(Parallel::Percent(34).of(3), 2);
        assert_eq!(Parallel::Percent(33).of(3), 1);
        assert_eq!(Parallel::Percent(1).of(3), 1);
        assert_eq!(Parallel::Percent(100).of(7), 7);
        assert_eq!(Parallel::Percent(25).of(10), 3);
        assert_eq!(
            waves(10, 1, Parallel::Percent(25)),
            [0..1, 1..4, 4..7, 7..10]
        );
        assert_eq!(Parallel::Hosts(0).of(3), 1);
    }

    #[test]
    fn shares_are_parsed_strictly() {
        assert_eq!(Parallel::parse_share("50%"), Some(Parallel::Percent(50)));
        assert_eq!(Parallel::parse_share(" 5 % "), Some(Parallel::Percent(5)));
        for bad in ["0%", "101%", "50", "%", "half", "-5%", "2.5%"] {
            assert_eq!(Parallel::parse_share(bad), None, "{bad}");
        }
    }
}
