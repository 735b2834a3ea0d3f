//! Tokens that verified, kept for a while: a client reading status many
//! times a second presents the same token each time, and a signature check
//! (Ed25519 or RSA) costs far more than the rest of the request.
//!
//! An entry lives at most [`REVERIFY_AFTER`], and never past the token's
//! `exp` or maximum age: a key withdrawn from an issuer's JWKS stops
//! working at the next refresh of the issuer's keys (`jwks_refresh`) plus
//! at most this minute; a key removed from `[auth.keys]` at the reload
//! (a new authenticator starts with no entries). Only tokens
//! that verified are kept, so failures never fill the table; what a token
//! may do is decided per request from the kept [`Principal`], and its
//! `jti` is still spent by its first change (in the store), so a replay
//! is refused as before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::Principal;

/// A token is checked again after this long.
pub(super) const REVERIFY_AFTER: Duration = Duration::from_secs(60);
/// Tokens kept at most; a full table is emptied of expired entries, then
/// of everything.
const MAX_ENTRIES: usize = 4096;

#[derive(Debug, Default)]
pub(super) struct Verified {
    entries: Mutex<HashMap<Box<str>, (Principal, Instant)>>,
}

impl Verified {
    /// The principal of `token`, if it verified less than a minute ago and
    /// is still usable.
    pub fn get(&self, token: &str) -> Option<Principal> {
        let entries = crate::sync::lock(&self.entries);
        let (principal, until) = entries.get(token)?;
        (Instant::now() < *until).then(|| principal.clone())
    }

    /// Keeps `token`'s principal until `usable_until` (Unix seconds), for
    /// at most [`REVERIFY_AFTER`].
    pub fn put(&self, token: &str, principal: &Principal, usable_until: i64) {
        let left = usable_until.saturating_sub(OffsetDateTime::now_utc().unix_timestamp());
        let Ok(left) = u64::try_from(left) else {
            return;
        };
        let now = Instant::now();
        let until = now + Duration::from_secs(left).min(REVERIFY_AFTER);
        let mut entries = crate::sync::lock(&self.entries);
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (_, until)| now < *until);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(token.into(), (principal.clone(), until));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal() -> Principal {
        Principal {
            subject: "ci".into(),
            issuer: "deployd".into(),
            grants: Vec::new(),
            expires_at: OffsetDateTime::now_utc(),
            jti: Some("j".into()),
            sha: None,
            audit_claims: Default::default(),
        }
    }

    #[test]
    fn a_token_is_kept_until_it_expires_and_the_table_stays_bounded() {
        let verified = Verified::default();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        verified.put("a", &principal(), now + 3600);
        assert_eq!(verified.get("a").unwrap().subject, "ci");
        assert!(verified.get("b").is_none());
        // Already past its usable time: not kept.
        verified.put("old", &principal(), now - 1);
        assert!(verified.get("old").is_none());
        for i in 0..(MAX_ENTRIES + 10) {
            verified.put(&format!("t{i}"), &principal(), now + 3600);
        }
        assert!(verified.entries.lock().unwrap().len() <= MAX_ENTRIES);
    }
}
