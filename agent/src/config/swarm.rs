//! `backend` and `[apps.NAME.swarm]`: where an app's services run. On this
//! engine's own containers (`docker`, the default), or as services of the
//! Docker Swarm cluster this engine manages (`swarm`).

use serde::Deserialize;

use super::Problems;

/// Where an app's services run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Containers on this host's engine, rolled by deployd itself.
    #[default]
    Docker,
    /// Services of the Swarm cluster this host manages: Swarm places and
    /// restarts the tasks, deployd decides what runs and when to go back.
    Swarm,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Swarm => "swarm",
        }
    }
}

/// How an app's services run on a Swarm cluster.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmConfig {
    /// The port the web service is published on through the routing mesh
    /// (every node of the cluster answers on it). Absent: not published.
    pub publish: Option<u16>,
    /// Web tasks replaced at once during an update. Default: 1.
    #[serde(default = "default_parallelism")]
    pub parallelism: u32,
}

fn default_parallelism() -> u32 {
    1
}

impl Default for SwarmConfig {
    fn default() -> Self {
        Self {
            publish: None,
            parallelism: default_parallelism(),
        }
    }
}

impl SwarmConfig {
    pub(super) fn validate(&self, at: &str, problems: &mut Problems) {
        if self.publish == Some(0) {
            problems.add(format!("{at}.publish"), "must be a port, 1-65535");
        }
        if self.parallelism == 0 {
            problems.add(format!("{at}.parallelism"), "must be at least 1");
        }
    }
}
