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
