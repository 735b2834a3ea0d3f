//! `[apps.NAME.migrations]`: the migration plan each deployment makes
//! before it changes anything, and which migrations it refuses.

use std::time::Duration;

use serde::Deserialize;

pub use deployd_proto::UnsafeMigrations;

use super::Problems;

/// How the plan is made. Present, every deployment of the app makes one;
/// absent, none does (an app without Django migrations).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationsConfig {
    /// Default: refuse.
    #[serde(default, rename = "unsafe")]
    pub unsafe_migrations: UnsafeMigrations,
    /// How manage.py is run in the image. Default: `["python", "manage.py"]`.
    #[serde(default = "default_manage")]
    pub manage: Vec<String>,
    /// Whose environment the inspection gets: the release task of that
    /// name (its `env_file` and `env` over the app's). Default: `migrate`
    /// when there is such a task, else the app's.
    pub env_of_task: Option<String>,
    /// Longest an inspection may run. Default: 2 min.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_manage() -> Vec<String> {
    vec!["python".into(), "manage.py".into()]
}

fn default_timeout() -> Duration {
    Duration::from_secs(120)
}

impl MigrationsConfig {
    pub(super) fn validate(&self, at: &str, tasks: &[&String], problems: &mut Problems) {
        if self.manage.is_empty() {
            problems.add(format!("{at}.manage"), "must not be empty");
        }
        if let Some(task) = &self.env_of_task
            && !tasks.contains(&task)
        {
            problems.add(
                format!("{at}.env_of_task"),
                format!("names no release task ({task})"),
            );
        }
        if self.timeout.is_zero() {
            problems.add(format!("{at}.timeout"), "must be more than 0 s");
        }
    }
}
