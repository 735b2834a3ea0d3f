//! The audit log: every mutation and every refused request, appended with
//! a SHA-256 hash chain, and the token ids (`jti`) already spent.
//!
//! Each record's hash covers the previous record's hash and the record's
//! own text, so editing, inserting or removing a record breaks every link
//! after it; `verify` names the first broken one. Deleting the newest
//! records, or rewriting the chain from one record on, leaves a chain that
//! holds: so each record's hash is also anchored outside the database (the
//! log, a head file, `[audit] forward_url`), and `verify` checks the chain
//! against those anchors. Records older than the retention are removed
//! with a checkpoint record that carries the last removed hash, so what is
//! left still verifies from its first record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rusqlite::{OptionalExtension, Transaction, params};
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
    /// Set on the record that closes a compaction: where the removed
    /// records ended. Absent in every other record (and in records written
    /// before compaction existed, whose text stays as it was hashed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}

/// What a compaction removed: records up to `through`, the last of which
/// had `hash` (the first record left links to it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub through: i64,
    pub hash: String,
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
            checkpoint: None,
        }
    }
}

/// A record as stored, with its place in the chain.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub seq: i64,
    pub record: AuditRecord,
}

/// A record's place in the chain and its hash: what is anchored outside
/// the database, and what `verify` checks against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHead {
    pub seq: i64,
    pub hash: String,
}

impl AuditHead {
    /// `SEQ:HASH` or `SEQ HASH`, as the head file and the log write it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (seq, hash) = text
            .split_once([':', ' '])
            .ok_or_else(|| format!("{text:?} is not SEQ:HASH"))?;
        let seq = seq
            .trim()
            .parse()
            .map_err(|_| format!("{seq:?} is not a record number"))?;
        let hash = hash.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{hash:?} is not a SHA-256 hash"));
        }
        Ok(Self { seq, hash })
    }

    /// Every anchor found in log lines, text or JSON: each line naming an
    /// `audit_seq` and an `audit_hash` (what deployd logs per record).
    pub fn from_log(text: &str) -> Vec<Self> {
        text.lines()
            .filter_map(|line| {
                let seq = field_after(line, "audit_seq")?;
                let hash = field_after(line, "audit_hash")?;
                Self::parse(&format!("{seq}:{hash}")).ok()
            })
            .collect()
    }

    /// The head written to a head file: `SEQ HASH` and a newline.
    fn line(&self) -> String {
        format!("{} {}\n", self.seq, self.hash)
    }

    /// Reads a head file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The value of `name` in a log line: `name=value` in text, or
/// `"name":value` / `"name":"value"` in JSON.
fn field_after<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(name)? + name.len();
    let rest = line[at..].trim_start_matches(['"', ':', '=', ' ']);
    let end = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    Some(&rest[..end]).filter(|v| !v.is_empty())
}

/// A record as the store holds it: parsed, and as the text its hash covers.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub entry: AuditEntry,
    pub body: String,
    pub prev_hash: String,
    pub hash: String,
}

/// Where new records are anchored besides the database.
#[derive(Debug, Default)]
pub(crate) struct Anchors {
    head_file: OnceLock<PathBuf>,
    /// The newest head written to the file: writes are one at a time and
    /// never go back (two appends may finish in either order).
    written: std::sync::Mutex<i64>,
    /// Woken on every new record (the forwarder waits on it).
    appended: tokio::sync::Notify,
}

/// What a compaction removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Events of deployments that ended before the cut.
    pub events: usize,
    /// Plans made before the cut by `deployctl plan` (a deployment's own
    /// plan stays: it records the migration state its release left).
    pub plans: usize,
    /// Audit records up to this one, and the checkpoint's own number.
    pub audit: Option<(i64, i64)>,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainCheck {
    /// Every link holds, and so does every anchor given; this many records.
    Intact(u64),
    /// The first record whose link (or anchor) does not hold, and why.
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

/// Appends `record` to the chain inside `tx`.
fn append_in(tx: &Transaction<'_>, record: &AuditRecord) -> Result<AuditHead, StoreError> {
    let body = serde_json::to_string(record)
        .map_err(|e| StoreError::Corrupt(format!("audit record: {e}")))?;
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
    Ok(AuditHead { seq, hash })
}

impl Store {
    /// From now on, every new record's head is also written to `path`
    /// (replaced whole, never half-written).
    pub fn anchor_head_to(&self, path: PathBuf) {
        let _ = self.anchors.head_file.set(path);
    }

    /// Resolves once a record was appended after the last call.
    pub async fn audit_appended(&self) {
        self.anchors.appended.notified().await;
    }

    /// Appends a record to the chain; an error means it was not written.
    /// Its head then goes to the log and the head file.
    pub fn append_audit(&self, record: &AuditRecord) -> Result<AuditHead, StoreError> {
        let head = {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let head = append_in(&tx, record)?;
            tx.commit()?;
            head
        };
        self.anchor(&head, &record.action);
        Ok(head)
    }

    /// Writes the head file for a record already in the store (at start).
    pub fn anchor_existing(&self, head: &AuditHead) {
        self.anchor(head, "anchored at start");
    }

    /// Anchors a new head outside the database.
    fn anchor(&self, head: &AuditHead, action: &str) {
        tracing::info!(
            target: "deployd::audit",
            audit_seq = head.seq,
            audit_hash = %head.hash,
            audit_action = %action,
            "audit record"
        );
        if let Some(path) = self.anchors.head_file.get() {
            let mut written = crate::sync::lock(&self.anchors.written);
            if head.seq > *written {
                match write_replacing(path, head.line().as_bytes()) {
                    Ok(()) => *written = head.seq,
                    Err(e) => tracing::error!(path = %path.display(), error = %e,
                        "cannot write the audit head file"),
                }
            }
        }
        self.anchors.appended.notify_one();
    }

    /// The newest record's head, if any.
    pub fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |row| {
                    Ok(AuditHead {
                        seq: row.get(0)?,
                        hash: row.get(1)?,
                    })
                },
            )
            .optional()?)
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
            .map(|(seq, body)| entry(seq, &body))
            .collect()
    }

    /// Up to `limit` records after `seq`, oldest first, each with its text
    /// exactly as hashed, its link and its hash: what a remote sink needs
    /// to check the chain itself (`hash = sha256(prev_hash "\n" seq "\n"
    /// body)`, hex).
    pub fn audit_after(&self, seq: i64, limit: usize) -> Result<Vec<StoredRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, body, prev_hash, hash FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![seq, limit as i64], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(seq, body, prev_hash, hash)| {
                Ok(StoredRecord {
                    entry: entry(seq, &body)?,
                    body,
                    prev_hash,
                    hash,
                })
            })
            .collect()
    }

    /// How far records were forwarded (0: none yet).
    pub fn forwarded_seq(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT seq FROM audit_forwarded WHERE id = 1", [], |row| {
                row.get(0)
            })
            .optional()?
            .unwrap_or(0))
    }

    /// Records that every record up to `seq` was forwarded.
    pub fn set_forwarded_seq(&self, seq: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO audit_forwarded (id, seq) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq",
            params![seq],
        )?;
        Ok(())
    }

    /// Removes what is older than `cut`: the events of deployments that
    /// ended before it (their records stay), plans no deployment made, and
    /// the audit records written
    /// before it, which a checkpoint record then closes. The newest audit
    /// record always stays. One transaction: all of it or nothing.
    /// `keep_from`: no audit record from this one on is removed (those a
    /// remote sink has not acknowledged yet).
    pub fn compact(
        &self,
        cut: OffsetDateTime,
        keep_from: Option<i64>,
    ) -> Result<Compacted, StoreError> {
        let cut_text = super::rfc3339(cut);
        let (compacted, head) = {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let events = tx.execute(
                "DELETE FROM events WHERE deployment_id IN
                 (SELECT id FROM deployments WHERE finished_at IS NOT NULL AND finished_at < ?1)",
                params![cut_text],
            )?;
            tx.execute(
                "DELETE FROM deliveries WHERE deployment IN
                 (SELECT id FROM deployments WHERE finished_at IS NOT NULL AND finished_at < ?1)",
                params![cut_text],
            )?;
            let plans = tx.execute(
                "DELETE FROM plans WHERE deployment IS NULL AND created_at < ?1",
                params![cut_text],
            )?;
            let mut compacted = Compacted {
                events,
                plans,
                audit: None,
            };
            let through = old_prefix(&tx, cut, keep_from)?;
            let mut head = None;
            if let Some((through, hash)) = through {
                tx.execute("DELETE FROM audit WHERE seq <= ?1", params![through])?;
                let mut record = AuditRecord::new("audit_compacted", "removed");
                record.subject = Some("deployd".into());
                record.detail = Some(format!(
                    "records up to {through}, written before {cut_text}, were removed \
                     (store.retain_days); the chain goes on from record {through}'s hash"
                ));
                record.checkpoint = Some(Checkpoint { through, hash });
                let appended = append_in(&tx, &record)?;
                compacted.audit = Some((through, appended.seq));
                head = Some(appended);
            }
            tx.commit()?;
            (compacted, head)
        };
        if let Some(head) = head {
            self.anchor(&head, "audit_compacted");
        }
        Ok(compacted)
    }

    /// Walks the whole chain; reports the first link that does not hold.
    pub fn verify_audit(&self) -> Result<ChainCheck, StoreError> {
        self.verify_audit_against(&[])
    }

    /// Walks the whole chain, then checks it against `anchors` (heads kept
    /// outside the database): a record whose hash differs was rewritten,
    /// an anchor past the last record means the newest were removed.
    pub fn verify_audit_against(&self, anchors: &[AuditHead]) -> Result<ChainCheck, StoreError> {
        let conn = self.conn();
        let first: Option<(i64, String)> = conn
            .query_row(
                "SELECT seq, prev_hash FROM audit ORDER BY seq LIMIT 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let mut previous = GENESIS.to_owned();
        let mut expected_seq = 1;
        if let Some((first, prev_hash)) = first.filter(|(seq, _)| *seq > 1) {
            match latest_checkpoint(&conn, first - 1)? {
                // Anyone who can write the database can also forge a
                // checkpoint after deleting old records: one newer than
                // every anchor cannot be told from a forgery.
                Some((at, _)) if !anchors.is_empty() && anchors.iter().all(|a| a.seq < at) => {
                    return Ok(ChainCheck::Broken {
                        seq: at,
                        reason: format!(
                            "records before {first} were removed by a checkpoint no anchor \
                             outside the database covers: it may be forged"
                        ),
                    });
                }
                Some((_, hash)) if anchors.iter().any(|a| a.seq == first - 1 && a.hash != hash) => {
                    return Ok(ChainCheck::Broken {
                        seq: first,
                        reason: "the checkpoint's hash of the removed records is not the one \
                                 anchored outside the database"
                            .into(),
                    });
                }
                Some((_, hash)) if hash == prev_hash => {}
                Some(_) => {
                    return Ok(ChainCheck::Broken {
                        seq: first,
                        reason: "its link to the removed records does not match the checkpoint"
                            .into(),
                    });
                }
                None => {
                    return Ok(ChainCheck::Broken {
                        seq: first,
                        reason: format!(
                            "records before {first} were removed without a checkpoint record"
                        ),
                    });
                }
            }
            previous = prev_hash;
            expected_seq = first;
        }
        let mut stmt = conn.prepare("SELECT seq, body, prev_hash, hash FROM audit ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        let mut count = 0;
        let mut hashes = BTreeMap::new();
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
            if !anchors.is_empty() {
                hashes.insert(seq, hash.clone());
            }
            previous = hash;
            expected_seq += 1;
            count += 1;
        }
        Ok(check_anchors(&hashes, expected_seq - 1, anchors).unwrap_or(ChainCheck::Intact(count)))
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

fn entry(seq: i64, body: &str) -> Result<AuditEntry, StoreError> {
    let record = serde_json::from_str(body)
        .map_err(|e| StoreError::Corrupt(format!("audit record {seq}: {e}")))?;
    Ok(AuditEntry { seq, record })
}

/// The oldest records written before `cut`, as the last one's number and
/// hash; never the newest record, nor any from `keep_from` on.
fn old_prefix(
    tx: &Transaction<'_>,
    cut: OffsetDateTime,
    keep_from: Option<i64>,
) -> Result<Option<(i64, String)>, StoreError> {
    let newest: Option<i64> = tx.query_row("SELECT max(seq) FROM audit", [], |row| row.get(0))?;
    let Some(newest) = newest.map(|n| keep_from.map_or(n, |k| n.min(k))) else {
        return Ok(None);
    };
    let mut stmt = tx.prepare("SELECT seq, body, hash FROM audit WHERE seq < ?1 ORDER BY seq")?;
    let mut rows = stmt.query(params![newest])?;
    let mut through = None;
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        let body: String = row.get(1)?;
        let record = entry(seq, &body)?.record;
        if record.at >= cut {
            break;
        }
        through = Some((seq, row.get(2)?));
    }
    Ok(through)
}

/// The latest checkpoint record that says record `through` was removed:
/// its own number, and the hash it gives `through`.
fn latest_checkpoint(
    conn: &rusqlite::Connection,
    through: i64,
) -> Result<Option<(i64, String)>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT seq, body FROM audit WHERE body LIKE '%\"checkpoint\"%' ORDER BY seq DESC",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        let body: String = row.get(1)?;
        if let Some(checkpoint) = entry(seq, &body)?.record.checkpoint
            && checkpoint.through == through
        {
            return Ok(Some((seq, checkpoint.hash)));
        }
    }
    Ok(None)
}

/// The first anchor the chain does not match, if any: one past the last
/// record means records were removed from the end; a different hash
/// means the chain was rewritten from that record (or an earlier one).
fn check_anchors(
    hashes: &BTreeMap<i64, String>,
    last: i64,
    anchors: &[AuditHead],
) -> Option<ChainCheck> {
    let mut sorted: Vec<&AuditHead> = anchors.iter().collect();
    sorted.sort_by_key(|a| a.seq);
    for anchor in &sorted {
        match hashes.get(&anchor.seq) {
            Some(hash) if *hash == anchor.hash => {}
            Some(_) => {
                return Some(ChainCheck::Broken {
                    seq: anchor.seq,
                    reason: "its hash is not the one anchored outside the database: the chain \
                             was rewritten from this record on (or from an earlier one)"
                        .into(),
                });
            }
            // Removed by a compaction, or past the end.
            None if anchor.seq <= last => {}
            None => {
                let newest = sorted.last().map_or(anchor.seq, |a| a.seq);
                return Some(ChainCheck::Broken {
                    seq: last + 1,
                    reason: format!(
                        "records {}..{newest} are missing: the newest records were deleted \
                         (an anchor outside the database names record {newest})",
                        last + 1
                    ),
                });
            }
        }
    }
    None
}

/// Writes `path` whole or not at all, and durably: a temporary file beside
/// it, synced, renamed over it, and the directory synced (a power cut
/// leaves the old head or the new one, never an empty file).
fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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

    fn store_with(actions: &[&str]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for action in actions {
            store
                .append_audit(&AuditRecord::new(*action, "accepted"))
                .unwrap();
        }
        (dir, store)
    }

    #[test]
    fn deleting_the_newest_records_is_found_by_the_anchored_head() {
        let (dir, store) = store_with(&["deploy", "lock", "unlock", "deploy", "rollback"]);
        let head_file = dir.path().join("audit-head");
        store.anchor_head_to(head_file.clone());
        store
            .append_audit(&AuditRecord::new("lock", "accepted"))
            .unwrap();
        let head = AuditHead::read(&head_file).unwrap();
        assert_eq!(head.seq, 6);
        assert_eq!(
            store
                .verify_audit_against(std::slice::from_ref(&head))
                .unwrap(),
            ChainCheck::Intact(6)
        );
        store
            .conn()
            .execute("DELETE FROM audit WHERE seq > 3", [])
            .unwrap();
        // The chain alone still holds...
        assert_eq!(store.verify_audit().unwrap(), ChainCheck::Intact(3));
        // ...the anchor does not.
        let ChainCheck::Broken { seq, reason } = store.verify_audit_against(&[head]).unwrap()
        else {
            panic!("truncation not found");
        };
        assert_eq!(seq, 4);
        assert!(reason.contains("records 4..6 are missing"), "{reason}");
    }

    #[test]
    fn a_chain_rewritten_from_one_record_on_is_found_by_the_log_anchors() {
        let (_dir, store) = store_with(&["deploy", "lock", "unlock", "deploy"]);
        let anchors: Vec<AuditHead> = (1..=4)
            .map(|seq| {
                let hash: String = store
                    .conn()
                    .query_row("SELECT hash FROM audit WHERE seq = ?1", [seq], |r| r.get(0))
                    .unwrap();
                AuditHead { seq, hash }
            })
            .collect();
        // The log, as deployd writes it (text and JSON lines).
        let log = format!(
            "2026-11-30T12:00:00Z INFO deployd::audit: audit record audit_seq={} audit_hash={} audit_action=deploy\n\
             {{\"fields\":{{\"message\":\"audit record\",\"audit_seq\":{},\"audit_hash\":\"{}\"}}}}\n\
             unrelated line\n",
            anchors[1].seq, anchors[1].hash, anchors[3].seq, anchors[3].hash
        );
        let from_log = AuditHead::from_log(&log);
        assert_eq!(from_log, [anchors[1].clone(), anchors[3].clone()]);
        // Rewrite records 3 and 4 with their hashes recomputed: the chain
        // holds, the anchors of 4 (and of every later record) do not.
        let rows: Vec<(i64, String)> = {
            let conn = store.conn();
            let mut stmt = conn
                .prepare("SELECT seq, body FROM audit WHERE seq >= 3 ORDER BY seq")
                .unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let mut previous = anchors[1].hash.clone();
        for (seq, body) in rows {
            let body = body.replace("accepted", "refused");
            let hash = link(&previous, &format!("{seq}\n{body}"));
            store
                .conn()
                .execute(
                    "UPDATE audit SET body = ?2, prev_hash = ?3, hash = ?4 WHERE seq = ?1",
                    params![seq, body, previous, hash],
                )
                .unwrap();
            previous = hash;
        }
        assert_eq!(store.verify_audit().unwrap(), ChainCheck::Intact(4));
        let ChainCheck::Broken { seq, reason } = store.verify_audit_against(&from_log).unwrap()
        else {
            panic!("rewrite not found");
        };
        assert_eq!(seq, 4);
        assert!(reason.contains("rewritten"), "{reason}");
        // With every record anchored, the first rewritten one is named.
        let ChainCheck::Broken { seq, .. } = store.verify_audit_against(&anchors).unwrap() else {
            panic!("rewrite not found");
        };
        assert_eq!(seq, 3);
    }

    #[test]
    fn compaction_leaves_a_chain_that_verifies_from_its_checkpoint() {
        let (_dir, store) = store_with(&["deploy", "lock", "unlock"]);
        let cut = OffsetDateTime::now_utc() + time::Duration::seconds(1);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        store
            .append_audit(&AuditRecord::new("deploy", "accepted"))
            .unwrap();
        let compacted = store.compact(cut, None).unwrap();
        assert_eq!(compacted.audit, Some((3, 5)));
        assert_eq!(store.verify_audit().unwrap(), ChainCheck::Intact(2));
        let tail = store.audit_tail(10).unwrap();
        assert_eq!(tail[0].seq, 4);
        let checkpoint = tail[1].record.checkpoint.clone().unwrap();
        assert_eq!(checkpoint.through, 3);
        // Removing records before the checkpoint's, or the checkpoint
        // itself, is found.
        store
            .conn()
            .execute("DELETE FROM audit WHERE seq = 4", [])
            .unwrap();
        let ChainCheck::Broken { seq, .. } = store.verify_audit().unwrap() else {
            panic!("removal not found");
        };
        assert_eq!(seq, 5);
        // Nothing older than the cut: nothing removed, the newest record
        // always stays.
        let (_dir, store) = store_with(&["deploy"]);
        let far = OffsetDateTime::now_utc() + time::Duration::days(1);
        assert_eq!(store.compact(far, None).unwrap().audit, None);
        assert_eq!(store.verify_audit().unwrap(), ChainCheck::Intact(1));
    }

    #[test]
    fn a_full_store_refuses_the_write_and_stays_intact() {
        let (_dir, store) = store_with(&["deploy", "lock"]);
        let pages: i64 = store
            .conn()
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        store
            .conn()
            .execute_batch(&format!("PRAGMA max_page_count = {pages};"))
            .unwrap();
        let mut big = AuditRecord::new("deploy", "accepted");
        big.detail = Some("x".repeat(64 * 1024));
        assert!(matches!(store.append_audit(&big), Err(StoreError::Full)));
        assert_eq!(store.verify_audit().unwrap(), ChainCheck::Intact(2));
    }
}
