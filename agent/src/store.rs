//! The deployment store: history, events and locks in SQLite.
//!
//! SQLite in WAL mode with `synchronous=FULL`: a committed write survives a
//! crash of deployd or of the host, and ops can read the file with `sqlite3`.
//! Every call is a short synchronous transaction behind a mutex that is never
//! held across an `.await`.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use deployd_proto::{
    CommitSha, Deployment, DeploymentEvent, DeploymentId, DeploymentKind, DeploymentState,
    EventKind, Step, StepState,
};
use rusqlite::{Connection, OptionalExtension, params};

mod audit;
mod deliveries;
mod plans;

pub use audit::{
    AuditEntry, AuditHead, AuditRecord, ChainCheck, Checkpoint, Compacted, StoredRecord,
};
use time::OffsetDateTime;

/// Why the store failed. Its messages never carry env values or tokens:
/// nothing secret is stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("deployment store: {0}")]
    Sqlite(rusqlite::Error),
    /// SQLite could not grow its files: the disk (or the database's size
    /// limit) is full. The write was rolled back; nothing is corrupt.
    #[error("the disk holding the deployment store is full: nothing was written")]
    Full,
    #[error("deployment store holds a record it cannot read: {0}")]
    Corrupt(String),
    #[error("no deployment store at {}", .0.display())]
    Missing(std::path::PathBuf),
    #[error(
        "deployment store has schema version {found}, newer than this deployd knows ({known}); \
         run the deployd that wrote it, or restore a backup"
    )]
    TooNew { found: i64, known: i64 },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => Self::Full,
            _ => Self::Sqlite(e),
        }
    }
}

/// A cloneable handle to the store.
#[derive(Debug, Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    /// Where each new audit record's hash also goes.
    anchors: Arc<audit::Anchors>,
    /// Bumped by every write to deployments and locks: a reader that
    /// cached what it read knows whether it still holds.
    generation: Arc<std::sync::atomic::AtomicU64>,
}

/// How taking a fleet lock went.
#[derive(Debug)]
pub enum FleetLocking {
    Taken,
    /// Another lock holds the app.
    Held(Box<Lock>),
    /// A deployment outside the fleet deployment is queued or running.
    Running(DeploymentId),
}

/// An app's lock, refusing deployments until lifted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    pub reason: String,
    pub locked_by: String,
    pub locked_at: OffsetDateTime,
    /// The fleet deployment it is held for, if any.
    pub fleet: Option<deployd_proto::FleetLock>,
    /// The token that took a fleet lock: its issuer and id. Changes that
    /// name the fleet and carry this token do not spend it again.
    pub holder: Option<(String, String)>,
}

impl From<Lock> for deployd_proto::AppLock {
    fn from(l: Lock) -> Self {
        Self {
            reason: l.reason,
            locked_by: l.locked_by,
            locked_at: l.locked_at,
            fleet: l.fleet,
        }
    }
}

impl Lock {
    /// Whether a change naming `fleet` passes this lock.
    pub fn lets_in(&self, fleet: Option<&str>) -> bool {
        self.fleet
            .as_ref()
            .is_some_and(|held| Some(held.id.as_str()) == fleet)
    }
}

/// One release of an app: the commit it was built from and the manifest
/// digest its image was pinned to when pulled. Every container or Swarm
/// service of it runs `pinned`, and is labelled with both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub sha: CommitSha,
    /// `sha256:<64 hex>`.
    pub digest: String,
}

impl Release {
    /// The reference this release's containers are created from:
    /// `<repository>@<digest>`, which no tag moved since can change.
    pub fn pinned(&self, repository: &str) -> String {
        format!("{repository}@{}", self.digest)
    }
}

/// Schema migrations, in order: the store's `user_version` says how many
/// have been applied. Never edit one that shipped; append a new one.
const MIGRATIONS: &[&str] = &[
    SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6, SCHEMA_V7, SCHEMA_V8,
    SCHEMA_V9, SCHEMA_V10,
];

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha TEXT NOT NULL,
    digest TEXT,
    previous_sha TEXT,
    requested_by TEXT NOT NULL,
    reason TEXT,
    force INTEGER NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    migrations TEXT NOT NULL DEFAULT '[]',
    -- 1 once this deployment's release ran on every service: on success,
    -- or when crash recovery kept a release that had passed verification.
    live INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS deployments_by_app ON deployments (app, id);
CREATE TABLE IF NOT EXISTS events (
    deployment_id TEXT NOT NULL REFERENCES deployments (id),
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (deployment_id, seq)
);
CREATE TABLE IF NOT EXISTS locks (
    app TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    locked_by TEXT NOT NULL,
    locked_at TEXT NOT NULL
);
";

/// The audit log and spent token ids.
const SCHEMA_V2: &str = "
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE spent_tokens (
    issuer TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (issuer, jti)
);
";

/// How far the audit records were forwarded to `[audit] forward_url`.
const SCHEMA_V3: &str = "
CREATE TABLE audit_forwarded (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
";

/// Rollbacks record the migrations that stay applied, and whether release
/// tasks were skipped.
const SCHEMA_V4: &str = "
ALTER TABLE deployments ADD COLUMN migrations_kept TEXT NOT NULL DEFAULT '[]';
ALTER TABLE deployments ADD COLUMN skip_tasks INTEGER NOT NULL DEFAULT 0;
";

/// A deployment that is one host's part of a fleet deployment says so
/// (JSON of `FleetPart`, or NULL).
const SCHEMA_V5: &str = "
ALTER TABLE deployments ADD COLUMN fleet TEXT;
";

/// A lock may be a fleet deployment's (JSON of `FleetLock`), held by the
/// token that took it (its issuer and id).
const SCHEMA_V6: &str = "
ALTER TABLE locks ADD COLUMN fleet TEXT;
ALTER TABLE locks ADD COLUMN holder_issuer TEXT;
ALTER TABLE locks ADD COLUMN holder_jti TEXT;
";

/// Images a prepare pulled, deployed or not: what pruning may remove once
/// they are not among the releases it keeps.
const SCHEMA_V7: &str = "
CREATE TABLE prepared (
    app TEXT NOT NULL,
    sha TEXT NOT NULL,
    digest TEXT NOT NULL,
    prepared_at TEXT NOT NULL,
    PRIMARY KEY (app, sha, digest)
);
";

/// Migration plans (JSON of `Plan`), and what a deployment did with one:
/// the plan its `plan` step made, the plan it held to, whether unsafe
/// migrations were allowed, and a rollback's choice about the schema.
const SCHEMA_V8: &str = "
CREATE TABLE plans (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    deployment TEXT,
    created_at TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX plans_by_deployment ON plans (deployment);
ALTER TABLE deployments ADD COLUMN plan TEXT;
ALTER TABLE deployments ADD COLUMN reviewed_plan TEXT;
ALTER TABLE deployments ADD COLUMN allow_unsafe_migrations INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deployments ADD COLUMN schema TEXT NOT NULL DEFAULT 'check';
";

/// A deployment says whether it is a canary.
const SCHEMA_V9: &str = "
ALTER TABLE deployments ADD COLUMN canary INTEGER NOT NULL DEFAULT 0;
";

const SCHEMA_V10: &str = "
CREATE TABLE IF NOT EXISTS deliveries (
    deployment TEXT NOT NULL,
    hook TEXT NOT NULL,
    event TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    detail TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (deployment, hook, event)
);
";

/// Inserts a deployment's record.
fn insert_in(conn: &Connection, d: &Deployment) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO deployments (id, app, kind, sha, digest, previous_sha, requested_by,
            reason, force, state, error, migrations, created_at, finished_at,
            migrations_kept, skip_tasks, fleet, plan, reviewed_plan, allow_unsafe_migrations,
            schema, canary)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
            ?18, ?19, ?20, ?21, ?22)",
        params![
            d.id.0,
            d.app,
            enum_text(d.kind),
            d.sha.as_str(),
            d.digest,
            d.previous_sha.as_ref().map(CommitSha::as_str),
            d.requested_by,
            d.reason,
            d.force,
            enum_text(d.state),
            d.error,
            serde_json::to_string(&d.migrations).unwrap_or_else(|_| "[]".into()),
            rfc3339(d.created_at),
            d.finished_at.map(rfc3339),
            serde_json::to_string(&d.migrations_kept).unwrap_or_else(|_| "[]".into()),
            d.skip_tasks,
            d.fleet.as_ref().and_then(|f| serde_json::to_string(f).ok()),
            d.plan,
            d.reviewed_plan,
            d.allow_unsafe_migrations,
            enum_text(d.schema),
            d.canary,
        ],
    )?;
    Ok(())
}

/// An app's lock, read on `conn`.
fn lock_in(conn: &Connection, app: &str) -> Result<Option<Lock>, StoreError> {
    type LockRow = (
        String,
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let row: Option<LockRow> = conn
        .query_row(
            "SELECT reason, locked_by, locked_at, fleet, holder_issuer, holder_jti
             FROM locks WHERE app = ?1",
            params![app],
            |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                ))
            },
        )
        .optional()?;
    row.map(|(reason, locked_by, at, fleet, issuer, jti)| {
        let fleet = fleet
            .map(|f| {
                serde_json::from_str(&f)
                    .map_err(|_| StoreError::Corrupt(format!("bad fleet lock {f:?}")))
            })
            .transpose()?;
        Ok(Lock {
            reason,
            locked_by,
            locked_at: parse_time(&at)?,
            fleet,
            holder: issuer.zip(jti),
        })
    })
    .transpose()
}

fn enum_text<T: serde::Serialize>(value: T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn enum_parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| StoreError::Corrupt(format!("unknown value {text:?}")))
}

/// A release as a row holds it; a sha that does not parse is corruption.
fn release(sha: String, digest: String) -> Result<Release, StoreError> {
    let sha = sha
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("bad sha {sha:?}")))?;
    Ok(Release { sha, digest })
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn parse_time(text: &str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| StoreError::Corrupt(format!("bad timestamp {text:?}")))
}

/// Brings the schema up to date, one transaction per migration.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(dir.join("deployd.sqlite3"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            anchors: Arc::default(),
            generation: Arc::default(),
        })
    }

    /// Opens the store in `dir` only if it exists (for tools that read it).
    pub fn open_existing(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("deployd.sqlite3");
        if !path.exists() {
            return Err(StoreError::Missing(path));
        }
        Self::open(dir)
    }

    /// Changes with every write to deployments and locks.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The connection, for a write to deployments or locks.
    fn conn_changing(&self) -> MutexGuard<'_, Connection> {
        let conn = self.conn();
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        conn
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (each call is one transaction), so a poisoned lock is still usable.
        crate::sync::lock(&self.conn)
    }

    /// Records a new deployment.
    pub fn insert(&self, d: &Deployment) -> Result<(), StoreError> {
        insert_in(&self.conn_changing(), d)
    }

    /// Records a new deployment unless the app's lock refuses it (a fleet
    /// deployment's lock lets in its own parts, `fleet`): the look and the
    /// insert in one transaction, so no lock is taken between them.
    pub fn insert_unless_locked(
        &self,
        d: &Deployment,
        fleet: Option<&str>,
    ) -> Result<Result<(), Box<Lock>>, StoreError> {
        let mut conn = self.conn_changing();
        let tx = conn.transaction()?;
        if let Some(lock) = lock_in(&tx, &d.app)?
            && !lock.lets_in(fleet)
        {
            return Ok(Err(Box::new(lock)));
        }
        insert_in(&tx, d)?;
        tx.commit()?;
        Ok(Ok(()))
    }

    /// Sets the state (and error); terminal states also set `finished_at`.
    pub fn set_state(
        &self,
        id: &DeploymentId,
        state: DeploymentState,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let finished = state
            .is_terminal()
            .then(|| rfc3339(OffsetDateTime::now_utc()));
        let live = state == DeploymentState::Succeeded;
        self.conn_changing().execute(
            "UPDATE deployments SET state = ?2, error = ?3, finished_at = ?4, live = live OR ?5
             WHERE id = ?1",
            params![id.0, enum_text(state), error, finished, live],
        )?;
        Ok(())
    }

    /// Records that a deployment's release runs on every service although
    /// the deployment did not finish (crash recovery kept it).
    pub fn mark_live(&self, id: &DeploymentId) -> Result<(), StoreError> {
        self.conn_changing().execute(
            "UPDATE deployments SET live = 1 WHERE id = ?1",
            params![id.0],
        )?;
        Ok(())
    }

    /// Records the digest a pull pinned.
    pub fn set_digest(&self, id: &DeploymentId, digest: &str) -> Result<(), StoreError> {
        self.conn_changing().execute(
            "UPDATE deployments SET digest = ?2 WHERE id = ?1",
            params![id.0, digest],
        )?;
        Ok(())
    }

    /// Records the migrations the release applied.
    pub fn set_migrations(
        &self,
        id: &DeploymentId,
        migrations: &[String],
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(migrations).unwrap_or_else(|_| "[]".into());
        self.conn_changing().execute(
            "UPDATE deployments SET migrations = ?2 WHERE id = ?1",
            params![id.0, json],
        )?;
        Ok(())
    }

    /// Records the migrations a rollback leaves applied (after it reversed
    /// some, fewer than it found).
    pub fn set_migrations_kept(
        &self,
        id: &DeploymentId,
        kept: &[String],
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(kept).unwrap_or_else(|_| "[]".into());
        self.conn_changing().execute(
            "UPDATE deployments SET migrations_kept = ?2 WHERE id = ?1",
            params![id.0, json],
        )?;
        Ok(())
    }

    /// Appends an event, numbering it after the deployment's last one.
    pub fn append_event(
        &self,
        id: &DeploymentId,
        kind: EventKind,
    ) -> Result<DeploymentEvent, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let last: i64 = tx.query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE deployment_id = ?1",
            params![id.0],
            |row| row.get(0),
        )?;
        let event = DeploymentEvent {
            seq: u64::try_from(last + 1).unwrap_or_default(),
            at: OffsetDateTime::now_utc(),
            kind,
        };
        let body = serde_json::to_string(&event)
            .map_err(|e| StoreError::Corrupt(format!("event does not serialize: {e}")))?;
        tx.execute(
            "INSERT INTO events (deployment_id, seq, body) VALUES (?1, ?2, ?3)",
            params![id.0, last + 1, body],
        )?;
        tx.commit()?;
        Ok(event)
    }

    /// Events of a deployment after `after` (0 for all), in order.
    pub fn events(
        &self,
        id: &DeploymentId,
        after: u64,
    ) -> Result<Vec<DeploymentEvent>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT body FROM events WHERE deployment_id = ?1 AND seq > ?2 ORDER BY seq",
        )?;
        let bodies = stmt
            .query_map(
                params![id.0, i64::try_from(after).unwrap_or(i64::MAX)],
                |row| row.get::<_, String>(0),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        bodies
            .iter()
            .map(|b| serde_json::from_str(b).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect()
    }

    /// Whether the store takes writes now: takes the write lock and lets
    /// it go.
    pub fn check_writable(&self) -> Result<(), StoreError> {
        self.conn().execute_batch("BEGIN IMMEDIATE; ROLLBACK;")?;
        Ok(())
    }

    /// A deployment's state alone, if it exists: cheaper than [`Store::get`].
    pub fn state(&self, id: &DeploymentId) -> Result<Option<DeploymentState>, StoreError> {
        let text = self
            .conn()
            .query_row(
                "SELECT state FROM deployments WHERE id = ?1",
                params![id.0],
                |row| row.get::<_, String>(0),
            )
            .optional()?;
        text.map(|t| enum_parse(&t)).transpose()
    }

    /// One deployment with its steps, if it exists.
    pub fn get(&self, id: &DeploymentId) -> Result<Option<Deployment>, StoreError> {
        let row = {
            let conn = self.conn();
            conn.query_row(
                &format!("SELECT {COLUMNS} FROM deployments WHERE id = ?1"),
                params![id.0],
                Row::read,
            )
            .optional()?
        };
        row.map(|r| self.complete(r)).transpose()
    }

    /// An app's deployments, newest first, `limit` of them before `before`.
    pub fn history(
        &self,
        app: &str,
        limit: usize,
        before: Option<&DeploymentId>,
    ) -> Result<Vec<Deployment>, StoreError> {
        let rows = {
            let conn = self.conn();
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM deployments WHERE app = ?1 AND id < ?2
                 ORDER BY id DESC LIMIT ?3"
            ))?;
            let before = before.map_or("~", |b| b.0.as_str());
            stmt.query_map(params![app, before, limit as i64], Row::read)?
                .collect::<Result<Vec<_>, _>>()?
        };
        rows.into_iter().map(|r| self.complete(r)).collect()
    }

    /// The newest deployment of `app` that is its part of fleet deployment
    /// `fleet` and of `kind`, if any.
    pub fn fleet_part(
        &self,
        app: &str,
        fleet: &str,
        kind: DeploymentKind,
    ) -> Result<Option<Deployment>, StoreError> {
        let rows = {
            let conn = self.conn();
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM deployments
                 WHERE app = ?1 AND kind = ?2 AND fleet IS NOT NULL
                 ORDER BY id DESC LIMIT 100"
            ))?;
            stmt.query_map(params![app, enum_text(kind)], Row::read)?
                .collect::<Result<Vec<_>, _>>()?
        };
        for row in rows {
            let d = row.into_deployment()?;
            if d.fleet.as_ref().is_some_and(|f| f.id == fleet) {
                return Ok(Some(d));
            }
        }
        Ok(None)
    }

    /// Hands a fleet deployment's lock to a newer token of its holder (a
    /// CI job token fetched again): changes it makes are then not spent.
    pub fn pass_fleet_lock(
        &self,
        app: &str,
        fleet: &str,
        holder: (&str, &str),
    ) -> Result<(), StoreError> {
        if self.lock_of(app)?.is_some_and(|l| l.lets_in(Some(fleet))) {
            self.conn_changing().execute(
                "UPDATE locks SET holder_issuer = ?2, holder_jti = ?3 WHERE app = ?1",
                params![app, holder.0, holder.1],
            )?;
        }
        Ok(())
    }

    /// Deployments that had not finished: what a crash interrupted.
    pub fn unfinished(&self) -> Result<Vec<Deployment>, StoreError> {
        let rows = {
            let conn = self.conn();
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM deployments WHERE state IN ('queued', 'running') ORDER BY id"
            ))?;
            stmt.query_map([], Row::read)?
                .collect::<Result<Vec<_>, _>>()?
        };
        rows.into_iter().map(|r| self.complete(r)).collect()
    }

    /// The app's deployment in flight, if any: its id and sha only (no
    /// events read), for status.
    pub fn in_flight(&self, app: &str) -> Result<Option<(DeploymentId, CommitSha)>, StoreError> {
        let row: Option<(String, String)> = self
            .conn()
            .prepare_cached(
                "SELECT id, sha FROM deployments WHERE app = ?1 AND state IN ('queued', 'running')
                 ORDER BY id LIMIT 1",
            )?
            .query_row(params![app], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        row.map(|(id, sha)| {
            let sha = sha
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("deployment {id} has sha {sha:?}")))?;
            Ok((DeploymentId(id), sha))
        })
        .transpose()
    }

    /// The release an app last deployed (or rolled back to) successfully:
    /// what runs when no deployment is in flight.
    pub fn live_release(&self, app: &str) -> Result<Option<Release>, StoreError> {
        Ok(self.live_since(app)?.map(|(release, _)| release))
    }

    /// The live release, and the last deployment that made it live.
    pub fn live_since(&self, app: &str) -> Result<Option<(Release, DeploymentId)>, StoreError> {
        self.live_releases(app, 1).map(|mut r| r.pop())
    }

    /// Distinct releases that were live, each with the last deployment that
    /// made it live, newest first, at most `limit`.
    pub fn live_releases(
        &self,
        app: &str,
        limit: usize,
    ) -> Result<Vec<(Release, DeploymentId)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT sha, digest, MAX(id) FROM deployments
             WHERE app = ?1 AND live = 1 AND digest IS NOT NULL
             GROUP BY sha, digest ORDER BY MAX(id) DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![app, limit as i64], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(sha, digest, id)| Ok((release(sha, digest)?, DeploymentId(id))))
            .collect()
    }

    /// Migrations the app's deployments after `after` applied, in order.
    pub fn migrations_after(
        &self,
        app: &str,
        after: &DeploymentId,
    ) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT migrations FROM deployments WHERE app = ?1 AND id > ?2 ORDER BY id",
        )?;
        let lists = stmt
            .query_map(params![app, after.0], |row| row.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut all: Vec<String> = Vec::new();
        for list in lists {
            let applied: Vec<String> =
                serde_json::from_str(&list).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            for name in applied {
                if !all.contains(&name) {
                    all.push(name);
                }
            }
        }
        Ok(all)
    }

    /// Every release image deployd pulled for an app.
    pub fn pulled(&self, app: &str) -> Result<Vec<Release>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT sha, digest FROM deployments WHERE app = ?1 AND digest IS NOT NULL
             UNION SELECT sha, digest FROM prepared WHERE app = ?1",
        )?;
        let rows = stmt
            .query_map(params![app], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(sha, digest)| release(sha, digest))
            .collect()
    }

    /// Records an image a prepare pulled, so that pruning knows it.
    pub fn prepared(&self, app: &str, sha: &str, digest: &str) -> Result<(), StoreError> {
        self.conn_changing().execute(
            "INSERT OR IGNORE INTO prepared (app, sha, digest, prepared_at) VALUES (?1, ?2, ?3, ?4)",
            params![app, sha, digest, rfc3339(OffsetDateTime::now_utc())],
        )?;
        Ok(())
    }

    /// Forgets a prepared image once pruned.
    pub fn forget_prepared(&self, app: &str, sha: &str, digest: &str) -> Result<(), StoreError> {
        self.conn_changing().execute(
            "DELETE FROM prepared WHERE app = ?1 AND sha = ?2 AND digest = ?3",
            params![app, sha, digest],
        )?;
        Ok(())
    }

    /// The app's lock, if any.
    pub fn lock_of(&self, app: &str) -> Result<Option<Lock>, StoreError> {
        lock_in(&self.conn(), app)
    }

    /// Locks an app (replacing an earlier lock, whoever held it).
    pub fn lock(&self, app: &str, reason: &str, by: &str) -> Result<(), StoreError> {
        self.conn_changing().execute(
            "INSERT INTO locks (app, reason, locked_by, locked_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (app) DO UPDATE SET reason = ?2, locked_by = ?3, locked_at = ?4,
                 fleet = NULL, holder_issuer = NULL, holder_jti = NULL",
            params![app, reason, by, rfc3339(OffsetDateTime::now_utc())],
        )?;
        Ok(())
    }

    /// Locks an app for a fleet deployment, held by the token `holder`
    /// (issuer, id). Only where the app is not locked, or locked for the
    /// same fleet deployment (whose holder it replaces); returns the lock
    /// in the way otherwise, changing nothing.
    pub fn lock_for_fleet(
        &self,
        app: &str,
        reason: &str,
        by: &str,
        fleet: &deployd_proto::FleetLock,
        holder: (&str, &str),
    ) -> Result<FleetLocking, StoreError> {
        let mut conn = self.conn_changing();
        let tx = conn.transaction()?;
        // In the same transaction as the lock, so no deployment is accepted
        // between the look and the lock.
        let running: Option<(String, Option<String>)> = tx
            .query_row(
                "SELECT id, fleet FROM deployments WHERE app = ?1 AND state IN ('queued', 'running')
                 ORDER BY id LIMIT 1",
                params![app],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        if let Some((id, part)) = running {
            let ours = part
                .as_deref()
                .and_then(|p| serde_json::from_str::<deployd_proto::FleetPart>(p).ok())
                .is_some_and(|p| p.id == fleet.id);
            if !ours {
                return Ok(FleetLocking::Running(DeploymentId(id)));
            }
        }
        let held: Option<Option<String>> = tx
            .query_row(
                "SELECT fleet FROM locks WHERE app = ?1",
                params![app],
                |row| row.get(0),
            )
            .optional()?;
        let same = |f: &Option<String>| {
            f.as_deref()
                .and_then(|f| serde_json::from_str::<deployd_proto::FleetLock>(f).ok())
                .is_some_and(|f| f.id == fleet.id)
        };
        if let Some(f) = &held
            && !same(f)
        {
            drop(tx);
            drop(conn);
            return Ok(FleetLocking::Held(Box::new(
                self.lock_of(app)?
                    .ok_or_else(|| StoreError::Corrupt("a lock vanished while read".into()))?,
            )));
        }
        let fleet_json = serde_json::to_string(fleet)
            .map_err(|e| StoreError::Corrupt(format!("cannot write a fleet lock: {e}")))?;
        tx.execute(
            "INSERT INTO locks (app, reason, locked_by, locked_at, fleet, holder_issuer, holder_jti)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (app) DO UPDATE SET reason = ?2, locked_by = ?3, locked_at = ?4,
                 fleet = ?5, holder_issuer = ?6, holder_jti = ?7",
            params![
                app,
                reason,
                by,
                rfc3339(OffsetDateTime::now_utc()),
                fleet_json,
                holder.0,
                holder.1
            ],
        )?;
        tx.commit()?;
        Ok(FleetLocking::Taken)
    }

    /// Lifts an app's lock if it is held for fleet deployment `id`: true if
    /// it was, false if there was none; the lock in the way otherwise.
    pub fn unlock_fleet(&self, app: &str, id: &str) -> Result<Result<bool, Lock>, StoreError> {
        match self.lock_of(app)? {
            None => Ok(Ok(false)),
            Some(lock) if lock.lets_in(Some(id)) => {
                let removed = self.conn_changing().execute(
                    "DELETE FROM locks WHERE app = ?1 AND fleet = ?2",
                    params![app, serde_json::to_string(&lock.fleet).unwrap_or_default()],
                )?;
                Ok(Ok(removed > 0))
            }
            Some(lock) => Ok(Err(lock)),
        }
    }

    /// Lifts an app's lock; returns whether there was one.
    pub fn unlock(&self, app: &str) -> Result<bool, StoreError> {
        let removed = self
            .conn_changing()
            .execute("DELETE FROM locks WHERE app = ?1", params![app])?;
        Ok(removed > 0)
    }

    /// Adds the steps, rebuilt from the deployment's events.
    fn complete(&self, row: Row) -> Result<Deployment, StoreError> {
        let events = self.events(&DeploymentId(row.id.clone()), 0)?;
        let mut d = row.into_deployment()?;
        d.steps = steps_from(&events);
        Ok(d)
    }
}

const COLUMNS: &str = "id, app, kind, sha, digest, previous_sha, requested_by, reason, force, \
                       state, error, migrations, created_at, finished_at, migrations_kept, \
                       skip_tasks, fleet, plan, reviewed_plan, allow_unsafe_migrations, schema, \
                       canary";

/// A `deployments` row as stored.
struct Row {
    id: String,
    app: String,
    kind: String,
    sha: String,
    digest: Option<String>,
    previous_sha: Option<String>,
    requested_by: String,
    reason: Option<String>,
    force: bool,
    state: String,
    error: Option<String>,
    migrations: String,
    created_at: String,
    finished_at: Option<String>,
    migrations_kept: String,
    skip_tasks: bool,
    fleet: Option<String>,
    plan: Option<String>,
    reviewed_plan: Option<String>,
    allow_unsafe_migrations: bool,
    schema: String,
    canary: bool,
}

impl Row {
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            app: row.get(1)?,
            kind: row.get(2)?,
            sha: row.get(3)?,
            digest: row.get(4)?,
            previous_sha: row.get(5)?,
            requested_by: row.get(6)?,
            reason: row.get(7)?,
            force: row.get(8)?,
            state: row.get(9)?,
            error: row.get(10)?,
            migrations: row.get(11)?,
            created_at: row.get(12)?,
            finished_at: row.get(13)?,
            migrations_kept: row.get(14)?,
            skip_tasks: row.get(15)?,
            fleet: row.get(16)?,
            plan: row.get(17)?,
            reviewed_plan: row.get(18)?,
            allow_unsafe_migrations: row.get(19)?,
            schema: row.get(20)?,
            canary: row.get(21)?,
        })
    }

    fn into_deployment(self) -> Result<Deployment, StoreError> {
        let sha = |s: &str| {
            s.parse::<CommitSha>()
                .map_err(|_| StoreError::Corrupt(format!("bad sha {s:?}")))
        };
        Ok(Deployment {
            id: DeploymentId(self.id),
            app: self.app,
            kind: enum_parse::<DeploymentKind>(&self.kind)?,
            sha: sha(&self.sha)?,
            digest: self.digest,
            previous_sha: self.previous_sha.as_deref().map(sha).transpose()?,
            requested_by: self.requested_by,
            reason: self.reason,
            force: self.force,
            state: enum_parse(&self.state)?,
            error: self.error,
            migrations: serde_json::from_str(&self.migrations)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            migrations_kept: serde_json::from_str(&self.migrations_kept)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            skip_tasks: self.skip_tasks,
            fleet: self
                .fleet
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            plan: self.plan,
            reviewed_plan: self.reviewed_plan,
            allow_unsafe_migrations: self.allow_unsafe_migrations,
            schema: enum_parse(&self.schema)?,
            canary: self.canary,
            steps: Vec::new(),
            created_at: parse_time(&self.created_at)?,
            finished_at: self.finished_at.as_deref().map(parse_time).transpose()?,
        })
    }
}

/// Folds step start/finish events into the step list.
pub fn steps_from(events: &[DeploymentEvent]) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    for event in events {
        match &event.kind {
            EventKind::StepStarted { step } => steps.push(Step {
                name: step.clone(),
                state: StepState::Running,
                started_at: event.at,
                duration_ms: None,
                detail: None,
            }),
            EventKind::StepFinished {
                step,
                state,
                duration_ms,
                detail,
            } => {
                if let Some(s) = steps.iter_mut().rev().find(|s| &s.name == step) {
                    s.state = *state;
                    s.duration_ms = Some(*duration_ms);
                    s.detail = detail.clone();
                }
            }
            EventKind::Output { .. }
            | EventKind::OnceTasksDone
            | EventKind::Canary { .. }
            | EventKind::State { .. } => {}
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(app: &str, id: &str, sha: &str) -> Deployment {
        Deployment {
            id: DeploymentId(id.into()),
            app: app.into(),
            kind: DeploymentKind::Deploy,
            sha: sha.parse().unwrap(),
            digest: None,
            previous_sha: None,
            requested_by: "ci".into(),
            reason: Some("test".into()),
            force: false,
            state: DeploymentState::Running,
            error: None,
            migrations: Vec::new(),
            migrations_kept: Vec::new(),
            skip_tasks: false,
            fleet: None,
            plan: None,
            reviewed_plan: None,
            allow_unsafe_migrations: false,
            schema: Default::default(),
            canary: false,
            steps: Vec::new(),
            created_at: OffsetDateTime::now_utc(),
            finished_at: None,
        }
    }

    #[test]
    fn records_survive_reopening_and_steps_come_from_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = deployment("shop", "01", "abc1234");
        store.insert(&d).unwrap();
        store
            .append_event(
                &d.id,
                EventKind::StepStarted {
                    step: "pull".into(),
                },
            )
            .unwrap();
        let finished = EventKind::StepFinished {
            step: "pull".into(),
            state: StepState::Succeeded,
            duration_ms: 12,
            detail: None,
        };
        assert_eq!(store.append_event(&d.id, finished).unwrap().seq, 2);
        store.set_digest(&d.id, "sha256:00").unwrap();
        store
            .set_state(&d.id, DeploymentState::Succeeded, None)
            .unwrap();
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        let got = store.get(&d.id).unwrap().unwrap();
        assert_eq!(got.state, DeploymentState::Succeeded);
        assert!(got.finished_at.is_some());
        assert_eq!(got.steps.len(), 1);
        assert_eq!(got.steps[0].duration_ms, Some(12));
        assert_eq!(store.events(&d.id, 1).unwrap().len(), 1);
        let live = store.live_release("shop").unwrap().unwrap();
        assert_eq!(
            (live.sha.as_str(), live.digest.as_str()),
            ("abc1234", "sha256:00")
        );
    }

    #[test]
    fn history_pages_newest_first_and_locks_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for (id, sha) in [("01", "aaaaaaa"), ("02", "bbbbbbb"), ("03", "ccccccc")] {
            store.insert(&deployment("shop", id, sha)).unwrap();
        }
        store.insert(&deployment("blog", "04", "ddddddd")).unwrap();
        let page: Vec<String> = store
            .history("shop", 2, None)
            .unwrap()
            .into_iter()
            .map(|d| d.id.0)
            .collect();
        assert_eq!(page, ["03", "02"]);
        let next = store
            .history("shop", 2, Some(&DeploymentId("02".into())))
            .unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(store.unfinished().unwrap().len(), 4);

        store.lock("shop", "incident 42", "ops").unwrap();
        assert_eq!(
            store.lock_of("shop").unwrap().unwrap().reason,
            "incident 42"
        );
        assert!(store.unlock("shop").unwrap());
        assert!(!store.unlock("shop").unwrap());
    }

    #[test]
    fn prepared_images_are_known_to_pruning_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut d = deployment("shop", "01", "aaaaaaa");
        d.digest = Some("sha256:aa".into());
        store.insert(&d).unwrap();
        store.prepared("shop", "bbbbbbb", "sha256:bb").unwrap();
        // Twice (a prepare asked again) is once.
        store.prepared("shop", "bbbbbbb", "sha256:bb").unwrap();
        store.prepared("blog", "ccccccc", "sha256:cc").unwrap();
        let mut pulled: Vec<_> = (store.pulled("shop").unwrap())
            .into_iter()
            .map(|r| (r.sha.to_string(), r.digest))
            .collect();
        pulled.sort();
        assert_eq!(
            pulled,
            [
                ("aaaaaaa".to_owned(), "sha256:aa".to_owned()),
                ("bbbbbbb".to_owned(), "sha256:bb".to_owned())
            ]
        );
        store
            .forget_prepared("shop", "bbbbbbb", "sha256:bb")
            .unwrap();
        assert_eq!(store.pulled("shop").unwrap().len(), 1);
    }

    #[test]
    fn a_fleet_lock_waits_for_no_deployment_but_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fleet = deployd_proto::FleetLock {
            id: "f1".into(),
            name: "prod".into(),
            sha: "bbbbbbb".parse().unwrap(),
            rollback: false,
        };
        let holder = ("issuer", "jti-1");
        // A deployment of its own outside the fleet: refused, nothing locked.
        store.insert(&deployment("shop", "01", "aaaaaaa")).unwrap();
        let taken = store.lock_for_fleet("shop", "r", "ci", &fleet, holder);
        assert!(matches!(taken, Ok(FleetLocking::Running(ref id)) if id.0 == "01"));
        assert!(store.lock_of("shop").unwrap().is_none());
        store
            .set_state(&DeploymentId("01".into()), DeploymentState::Succeeded, None)
            .unwrap();
        // The fleet deployment's own part running: taken (a resumed fleet).
        let mut part = deployment("shop", "02", "bbbbbbb");
        part.fleet = Some(deployd_proto::FleetPart {
            id: "f1".into(),
            host: "a".into(),
            once_tasks: true,
        });
        store.insert(&part).unwrap();
        let taken = store.lock_for_fleet("shop", "r", "ci", &fleet, holder);
        assert!(matches!(taken, Ok(FleetLocking::Taken)));
        // Another fleet deployment: held.
        let other = deployd_proto::FleetLock {
            id: "f2".into(),
            ..fleet.clone()
        };
        store
            .set_state(&DeploymentId("02".into()), DeploymentState::Succeeded, None)
            .unwrap();
        let taken = store.lock_for_fleet("shop", "r", "ci", &other, holder);
        assert!(matches!(taken, Ok(FleetLocking::Held(ref lock)) if lock.reason == "r"));
    }

    #[test]
    fn schema_is_versioned_and_a_newer_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join("deployd.sqlite3")).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        // Reopening applies nothing twice.
        drop(Store::open(dir.path()).unwrap());

        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
        assert!(err.to_string().contains("newer than this deployd"));
    }
}
