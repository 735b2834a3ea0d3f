//! What every step of a deployment uses: the failure sentence, short shas
//! in messages and the short ids in container names. A leaf: it depends on no other engine module.

/// Why a step failed, as one sentence for the user.
#[derive(Debug, Clone)]
pub(crate) struct Failure(pub String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self(e.to_string())
    }
}

/// The first 12 characters of a commit sha, as messages show it.
pub(crate) fn short_sha(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// The last characters of a deployment id: enough to keep names unique.
pub(crate) fn short_id(id: &str) -> &str {
    &id[id.len().saturating_sub(8)..]
}
