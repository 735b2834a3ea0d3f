//! The audit log: every mutation and every refused request, appended with
//! a SHA-256 hash chain, and the token ids (`jti`) already spent.
//!
//! Each record's hash covers the previous record's hash and the record's
//! own text, so editing, inserting or removing a record breaks every link
//! after it; `verify` names the first broken one.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{Store, StoreError};

/// The hash a chain starts from.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audited event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Token subject; `deployd` for the agent's own records; absent when no
    /// token was verified.
    pub subject: Option<String>,
    pub issuer: Option<String>,
    /// Claims that say where a CI token came from (repository, ref,
    /// environment, pipeline, ...); an allow-list, never e-mail addresses.
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
    /// The client's address.
    pub source: Option<String>,
    /// `deploy`, `rollback`, `lock`, `unlock`, `deployment_finished`, or
    /// the method and path of a refused request.
    pub action: String,
    pub app: Option<String>,
    pub sha: Option<String>,
    pub digest: Option<String>,
    pub deployment: Option<String>,
    /// `requested`, `accepted`, `refused`, or a deployment's final state.
    pub outcome: String,
    /// The HTTP status and error code, or a reason.
    pub detail: Option<String>,
}

impl AuditRecord {
    /// A record of `action` now, with nothing else filled in.
    pub fn new(action: impl Into<String>, outcome: impl Into<String>) -> Self {
        Self {
            at: OffsetDateTime::now_utc(),
            subject: None,
            issuer: None,
            claims: BTreeMap::new(),
            source: None,
            action: action.into(),
            app: None,
            sha: None,
            digest: None,
            deployment: None,
            outcome: outcome.into(),
            detail: None,
        }
    }
}

/// A record as stored, with its place in the chain.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub seq: i64,
    pub record: AuditRecord,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainCheck {
    /// Every link holds; this many records.
    Intact(u64),
    /// The first record whose link does not hold, and why.
    Broken { seq: i64, reason: String },
}

fn link(previous: &str, body: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(previous.as_bytes());
    hasher.update(b"\n");
    hasher.update(body.as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Store {
    /// Appends a record to the chain; an error means it was not written.
    pub fn append_audit(&self, record: &AuditRecord) -> Result<i64, StoreError> {
        let body = serde_json::to_string(record)
            .map_err(|e| StoreError::Corrupt(format!("audit record: {e}")))?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let last: Option<(i64, String)> = tx
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let (seq, previous) = match last {
            Some((seq, hash)) => (seq + 1, hash),
            None => (1, GENESIS.to_owned()),
        };
        let hash = link(&previous, &format!("{seq}\n{body}"));
        tx.execute(
            "INSERT INTO audit (seq, body, prev_hash, hash) VALUES (?1, ?2, ?3, ?4)",
            params![seq, body, previous, hash],
        )?;
        tx.commit()?;
        Ok(seq)
    }

    /// The last `limit` records, oldest first.
    pub fn audit_tail(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, body FROM (SELECT seq, body FROM audit ORDER BY seq DESC LIMIT ?1)
             ORDER BY seq",
        )?;
        let rows = stmt
            .query_map(params![limit as i64], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(seq, body)| {
                let record = serde_json::from_str(&body)
                    .map_err(|e| StoreError::Corrupt(format!("audit record {seq}: {e}")))?;
                Ok(AuditEntry { seq, record })
            })
            .collect()
    }

    /// Walks the whole chain; reports the first link that does not hold.
    pub fn verify_audit(&self) -> Result<ChainCheck, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT seq, body, prev_hash, hash FROM audit ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        let mut previous = GENESIS.to_owned();
        let mut expected_seq = 1;
        let mut count = 0;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let body: String = row.get(1)?;
            let prev_hash: String = row.get(2)?;
            let hash: String = row.get(3)?;
            let broken = |reason: &str| ChainCheck::Broken {
                seq,
                reason: reason.to_owned(),
            };
            if seq != expected_seq {
                return Ok(broken(&format!(
                    "expected record {expected_seq} here: records were removed or renumbered"
                )));
            }
            if prev_hash != previous {
                return Ok(broken("its link to the previous record does not match"));
            }
            if link(&previous, &format!("{seq}\n{body}")) != hash {
                return Ok(broken("its content does not match its hash: it was edited"));
            }
            if serde_json::from_str::<AuditRecord>(&body).is_err() {
                return Ok(broken("its content is not a record"));
            }
            previous = hash;
            expected_seq += 1;
            count += 1;
        }
        Ok(ChainCheck::Intact(count))
    }

    /// Records that a token's `jti` was used for a change; false if it had
    /// been already (a replay). Expired entries are dropped on the way.
    pub fn spend_token(
        &self,
        issuer: &str,
        jti: &str,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let conn = self.conn();
        conn.execute(
            "DELETE FROM spent_tokens WHERE expires_at < ?1",
            params![now],
        )?;
        let inserted = conn.execute(
            "INSERT OR IGNORE INTO spent_tokens (issuer, jti, expires_at) VALUES (?1, ?2, ?3)",
            params![issuer, jti, expires_at],
        )?;
        Ok(inserted == 1)
    }

    /// Gives a token's `jti` back, when the change it was spent on was
    /// refused (a conflict, a lock): the same token may try again.
    pub fn unspend_token(&self, issuer: &str, jti: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM spent_tokens WHERE issuer = ?1 AND jti = ?2",
            params![issuer, jti],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_edited_byte_breaks_the_chain_at_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for action in ["deploy", "lock", "unlock"] {
            let mut record = AuditRecord::new(action, "accepted");
            record.subject = Some("ops".into());
            record.app = Some("shop".into());
            store.append_audit(&record).unwrap();
        }
        assert_eq!(store.verify_audit().unwrap(), ChainCheck::Intact(3));
        store
            .conn()
            .execute(
                "UPDATE audit SET body = replace(body, '\"lock\"', '\"lack\"') WHERE seq = 2",
                [],
            )
            .unwrap();
        let ChainCheck::Broken { seq, reason } = store.verify_audit().unwrap() else {
            panic!("edit not found");
        };
        assert_eq!(seq, 2);
        assert!(reason.contains("edited"), "{reason}");
    }

    #[test]
    fn a_token_is_spent_once_until_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let later = OffsetDateTime::now_utc().unix_timestamp() + 600;
        assert!(store.spend_token("deployd", "j1", later).unwrap());
        assert!(!store.spend_token("deployd", "j1", later).unwrap());
        assert!(store.spend_token("other", "j1", later).unwrap());
        store.unspend_token("deployd", "j1").unwrap();
        assert!(store.spend_token("deployd", "j1", later).unwrap());
    }
}
