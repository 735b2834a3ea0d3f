//! What every step of a deployment uses: the failure sentence and the short
//! ids in container names. A leaf: it depends on no other engine module.

/// Why a step failed, as one sentence for the user.
#[derive(Debug, Clone)]
pub(crate) struct Failure(pub String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self(e.to_string())
    }
}

/// The last characters of a deployment id: enough to keep names unique.
pub(crate) fn short_id(id: &str) -> &str {
    &id[id.len().saturating_sub(8)..]
}

/// What a rollback put back, service by service, in roll order.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    /// Services that run the earlier release again.
    pub back: Vec<String>,
    /// Services that ran nothing before and run nothing now.
    pub emptied: Vec<String>,
    /// `service: why` of those that could not be put back.
    pub failed: Vec<String>,
}

impl Restored {
    /// Puts the lists in roll order (they were filled last rolled first).
    pub fn in_roll_order(mut self) -> Self {
        self.back.reverse();
        self.emptied.reverse();
        self.failed.reverse();
        self
    }

    /// What runs again, and `of_emptied` said of the emptied ones; or,
    /// when any service failed, the failure naming what is back.
    pub fn account(&self, release: &str, of_emptied: &str) -> Result<Vec<String>, Failure> {
        if !self.failed.is_empty() {
            let back = match self.back.is_empty() {
                true => "none".to_owned(),
                false => self.back.join(", "),
            };
            return Err(Failure(format!(
                "{}; back on {release}: {back}",
                self.failed.join("; ")
            )));
        }
        let mut said = Vec::new();
        if !self.back.is_empty() {
            said.push(format!("{} run {release} again", self.back.join(", ")));
        }
        if !self.emptied.is_empty() {
            said.push(format!("{} {of_emptied}", self.emptied.join(", ")));
        }
        Ok(said)
    }
}
