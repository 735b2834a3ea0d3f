//! Which hosts of a fleet deploy together, and when a fleet reverts.
//!
//! Hosts deploy in the fleet's order. The first wave holds `first_wave`
//! hosts (its first host runs the `once` release tasks, such as migrate);
//! every later wave holds at most `max_parallel` hosts, a number or a share
//! of the fleet rounded up. Pure arithmetic, so it is tested by itself.

use std::ops::Range;

use crate::exit::Exit;

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

/// The waves of the hosts in `todo` (indices into the fleet's host list,
/// in its order) where some host must have finished before another starts:
/// `after` holds such pairs `(first, then)`, a singleton service (beat) one
/// host stops and another starts. Such a `first` moves ahead of its `then`
/// in the order, and a `then` that would share a wave with its `first`
/// starts a wave of its own after it. `None` when the pairs form a cycle
/// (two hosts trading singletons): no order satisfies them.
pub fn ordered_waves(
    todo: &[usize],
    first_wave: usize,
    parallel: Parallel,
    after: &[(usize, usize)],
) -> Option<Vec<Vec<usize>>> {
    let edges: Vec<(usize, usize)> = after
        .iter()
        .copied()
        .filter(|(a, b)| todo.contains(a) && todo.contains(b))
        .collect();
    // The fleet's order, except that a host some other waits for goes
    // ahead, and a host waits for its firsts.
    let mut order: Vec<usize> = Vec::with_capacity(todo.len());
    while order.len() < todo.len() {
        let ready = |h: &usize| {
            !order.contains(h) && edges.iter().all(|(a, b)| b != h || order.contains(a))
        };
        let first = |h: &usize| edges.iter().any(|(a, _)| a == h);
        let next = todo
            .iter()
            .copied()
            .find(|h| ready(h) && first(h))
            .or_else(|| todo.iter().copied().find(ready))?;
        order.push(next);
    }
    let mut plan: Vec<Vec<usize>> = waves(order.len(), first_wave, parallel)
        .into_iter()
        .map(|r| order[r].to_vec())
        .collect();
    let mut n = 0;
    while n < plan.len() {
        let wave = &plan[n];
        let (now, later): (Vec<usize>, Vec<usize>) = wave
            .iter()
            .partition(|h| !edges.iter().any(|(a, b)| b == *h && wave.contains(a)));
        if !later.is_empty() {
            plan[n] = now;
            plan.insert(n + 1, later);
        }
        n += 1;
    }
    Some(plan)
}

/// Whether a fleet stops and reverts: more hosts failed than the budget
/// allows.
pub fn over_budget(failed: usize, budget: usize) -> bool {
    failed > budget
}

/// How one host's part of a fleet deployment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostEnd {
    /// Never started: the fleet stopped first.
    NotStarted,
    Succeeded,
    /// Failed before changing anything on the host.
    Failed,
    /// Failed, and the host put its previous release back itself.
    RolledBack,
    /// Failed, and so did putting its previous release back.
    RollbackFailed,
    /// Refused, interrupted, or its end could not be read.
    Unknown,
}

/// A fleet deployment's exit code, from each host's end and, for a host
/// the fleet reverted, whether the revert succeeded (`None`: not reverted).
/// Within the budget the fleet succeeded; past it (or when a host was left
/// unstarted), it rolled back, unless a host could not be put back.
pub fn fleet_exit(ends: &[(HostEnd, Option<bool>)], budget: usize) -> Exit {
    let failed = ends
        .iter()
        .filter(|(end, _)| !matches!(end, HostEnd::Succeeded | HostEnd::NotStarted))
        .count();
    let stopped = ends.iter().any(|(end, _)| *end == HostEnd::NotStarted);
    // A host that could not put its previous release back is broken,
    // within the budget or not.
    if ends.iter().any(|(end, _)| *end == HostEnd::RollbackFailed) {
        return Exit::RollbackFailed;
    }
    if !over_budget(failed, budget) && !stopped {
        return Exit::Success;
    }
    let left_changed = ends.iter().any(|&(end, reverted)| {
        end == HostEnd::RollbackFailed
            || reverted == Some(false)
            || (end == HostEnd::Succeeded && reverted.is_none())
    });
    if left_changed {
        return Exit::RollbackFailed;
    }
    if ends.iter().any(|(end, _)| *end == HostEnd::Unknown) {
        return Exit::Other;
    }
    let changed = ends
        .iter()
        .any(|(end, _)| matches!(end, HostEnd::Succeeded | HostEnd::RolledBack));
    if changed {
        Exit::RolledBack
    } else {
        Exit::Failed
    }
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
    fn a_host_stopping_a_singleton_goes_before_the_host_starting_it() {
        let all = [0, 1, 2];
        // No pairs: the fleet's order and waves.
        assert_eq!(
            ordered_waves(&all, 1, Parallel::Hosts(1), &[]),
            Some(vec![vec![0], vec![1], vec![2]])
        );
        // Beat moves from the last host to the first: the last goes first.
        assert_eq!(
            ordered_waves(&all, 1, Parallel::Hosts(1), &[(2, 0)]),
            Some(vec![vec![2], vec![0], vec![1]])
        );
        // One wave for all: the host starting beat waits in a wave of its
        // own after the one stopping it.
        assert_eq!(
            ordered_waves(&all, 3, Parallel::Hosts(3), &[(0, 2)]),
            Some(vec![vec![0, 1], vec![2]])
        );
        assert_eq!(
            ordered_waves(&all, 1, Parallel::Hosts(3), &[(2, 0)]),
            Some(vec![vec![2], vec![0, 1]])
        );
        // Pairs with a host not to do (done before) are moot.
        assert_eq!(
            ordered_waves(&[1, 2], 1, Parallel::Hosts(2), &[(0, 2)]),
            Some(vec![vec![1], vec![2]])
        );
        // A chain splits a wave twice.
        assert_eq!(
            ordered_waves(&all, 3, Parallel::Hosts(3), &[(0, 1), (1, 2)]),
            Some(vec![vec![0], vec![1], vec![2]])
        );
        // Two hosts trading singletons: no order.
        assert_eq!(
            ordered_waves(&all, 1, Parallel::Hosts(1), &[(0, 1), (1, 0)]),
            None
        );
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
    fn a_fleet_reverts_only_past_its_budget() {
        use HostEnd::*;
        assert!(!over_budget(0, 0));
        assert!(over_budget(1, 0));
        assert!(!over_budget(1, 1));
        assert!(over_budget(2, 1));
        // Every host succeeded.
        assert_eq!(fleet_exit(&[(Succeeded, None); 3], 0), Exit::Success);
        // One host failed within a budget of one: the fleet goes on.
        let within = [(Succeeded, None), (RolledBack, None), (Succeeded, None)];
        assert_eq!(fleet_exit(&within, 1), Exit::Success);
        // Within the budget too, a host left broken is said.
        let broken = [(Succeeded, None), (RollbackFailed, None), (Succeeded, None)];
        assert_eq!(fleet_exit(&broken, 1), Exit::RollbackFailed);
        // Past the budget: the first host reverted, the second put itself
        // back, the third never touched.
        let reverted = [
            (Succeeded, Some(true)),
            (RolledBack, None),
            (NotStarted, None),
        ];
        assert_eq!(fleet_exit(&reverted, 0), Exit::RolledBack);
        // The host with the once tasks failed before changing anything:
        // no other host started, nothing changed.
        let first = [(Failed, None), (NotStarted, None), (NotStarted, None)];
        assert_eq!(fleet_exit(&first, 0), Exit::Failed);
        assert_eq!(fleet_exit(&first, 2), Exit::Failed);
        // A revert that failed, a host that could not put itself back, a
        // host left on the release unreverted: rollback failed.
        let revert_failed = [(Succeeded, Some(false)), (RolledBack, None)];
        assert_eq!(fleet_exit(&revert_failed, 0), Exit::RollbackFailed);
        let broken = [(Succeeded, Some(true)), (RollbackFailed, None)];
        assert_eq!(fleet_exit(&broken, 0), Exit::RollbackFailed);
        let left = [(Succeeded, None), (Failed, None)];
        assert_eq!(fleet_exit(&left, 0), Exit::RollbackFailed);
        // A host whose end is unknown.
        let unknown = [(Succeeded, Some(true)), (Unknown, None)];
        assert_eq!(fleet_exit(&unknown, 0), Exit::Other);
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
