//! Commit shas: the only thing a deployment names a release by.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A git commit sha, abbreviated or full: 7 to 40 lowercase hex digits.
///
/// Images are tagged with the sha of the commit they were built from, so the
/// sha doubles as the image tag. Validation happens on both sides of the API
/// and before any Docker call, so a typo never reaches a registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommitSha(String);

/// Why a string is not a [`CommitSha`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSha {
    /// Shorter than 7 or longer than 40 characters.
    #[error("a commit sha has 7 to 40 hex digits, got {0}")]
    Length(usize),
    /// A character outside `0-9a-f`; uppercase is refused rather than folded
    /// because registries treat tags case-sensitively.
    #[error("a commit sha is lowercase hex (0-9, a-f), found {0:?}")]
    Character(char),
}

impl CommitSha {
    /// Shortest accepted length, as `git rev-parse --short` prints by default.
    pub const MIN_LEN: usize = 7;
    /// A full SHA-1 commit id.
    pub const MAX_LEN: usize = 40;

    /// The sha as a string, suitable as an image tag.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 digits, as messages and container names show a sha.
    pub fn short(&self) -> &str {
        short_sha(&self.0)
    }
}

/// The first 12 characters of a sha (or of whatever stands in for one, such
/// as `none`), as messages show it.
pub fn short_sha(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

impl FromStr for CommitSha {
    type Err = InvalidSha;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(c) = s.chars().find(|c| !matches!(c, '0'..='9' | 'a'..='f')) {
            return Err(InvalidSha::Character(c));
        }
        if !(Self::MIN_LEN..=Self::MAX_LEN).contains(&s.len()) {
            return Err(InvalidSha::Length(s.len()));
        }
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for CommitSha {
    type Error = InvalidSha;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<CommitSha> for String {
    fn from(sha: CommitSha) -> Self {
        sha.0
    }
}

impl fmt::Display for CommitSha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for CommitSha {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[0-9a-f]{7,40}$"))
            .min_length(Some(Self::MIN_LEN))
            .max_length(Some(Self::MAX_LEN))
            .description(Some("A git commit sha: 7 to 40 lowercase hex digits"))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for CommitSha {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_short_and_full_shas() {
        for s in ["abc1234", "0123456789abcdef0123456789abcdef01234567"] {
            assert_eq!(s.parse::<CommitSha>().unwrap().as_str(), s);
        }
    }

    #[test]
    fn refuses_wrong_lengths() {
        assert_eq!("abc123".parse::<CommitSha>(), Err(InvalidSha::Length(6)));
        let long = "a".repeat(41);
        assert_eq!(long.parse::<CommitSha>(), Err(InvalidSha::Length(41)));
        assert_eq!("".parse::<CommitSha>(), Err(InvalidSha::Length(0)));
    }

    #[test]
    fn refuses_non_hex_uppercase_and_tag_syntax() {
        assert_eq!(
            "ABC1234".parse::<CommitSha>(),
            Err(InvalidSha::Character('A'))
        );
        assert_eq!(
            "abc1234g".parse::<CommitSha>(),
            Err(InvalidSha::Character('g'))
        );
        // Anything that could smuggle a different image reference is refused.
        assert_eq!(
            "abc1234:latest".parse::<CommitSha>(),
            Err(InvalidSha::Character(':'))
        );
        assert_eq!(
            "../abc1234".parse::<CommitSha>(),
            Err(InvalidSha::Character('.'))
        );
    }
}
