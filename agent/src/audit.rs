//! The audit chain beyond single requests: its anchors outside the store,
//! checked at start and kept current (the head file, a remote sink), and
//! its retention.
//!
//! The chain in the store proves that no record was edited, inserted or
//! removed in the middle. Whoever can write the database can still delete
//! the newest records, or rewrite the chain from one record on; only a
//! copy outside the database tells. So each new record's hash goes to the
//! log (see `store::audit`), to a head file, and, with `[audit]
//! forward_url`, the record itself to a remote sink that keeps its own
//! copy. The sink is fed from the store in order, from where it was last
//! acknowledged: records written while it is down arrive when it is back,
//! and no deployment ever waits for it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{AuditConfig, Config};
use crate::store::{AuditHead, AuditRecord, ChainCheck, Store};

/// Compaction runs at start and then this often.
const COMPACT_EVERY: Duration = Duration::from_secs(24 * 3600);
/// Records sent to the sink per read of the store.
const FORWARD_BATCH: usize = 100;
/// Retry pauses while the sink fails: doubled up to the longest.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(60);

/// Checks the chain against its head file, then anchors new records to
/// it; starts retention and, if set, forwarding. The tasks end with
/// `stopping`.
pub fn start(
    config: &Config,
    store: &Store,
    stopping: &CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let head_file = config.audit.head_file(&config.state_dir);
    if check_head_file(store, &head_file) {
        store.anchor_head_to(head_file);
        // Anchors the newest record right away (an alarm just written, or
        // the records a stop cut off from their anchor).
        if let Ok(Some(newest)) = store.audit_head() {
            store.anchor_existing(&newest);
        }
    }
    let sink = Sink::new(&config.audit)?;
    let mut tasks = vec![tokio::spawn(retention(
        store.clone(),
        config.store.retain_days,
        sink.is_some(),
        stopping.clone(),
    ))];
    if let Some(sink) = sink {
        tasks.push(tokio::spawn(sink.forward(store.clone(), stopping.clone())));
    }
    Ok(tasks)
}

/// Compares the store's chain with the head file left by the last run.
/// A mismatch is an alarm, in the log and as an audit record. A chain that
/// contradicts the file leaves the file as it stands, as evidence: returns
/// whether new heads may replace it.
fn check_head_file(store: &Store, path: &std::path::Path) -> bool {
    let newest = match store.audit_head() {
        Ok(newest) => newest,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the audit log's newest record");
            return false;
        }
    };
    let anchored = match AuditHead::read(path) {
        Ok(head) => head,
        Err(_) if !path.exists() => {
            if let Some(newest) = newest {
                alarm(
                    store,
                    format!(
                        "the store holds {} audit records but its head file {} is missing: \
                         deleted, or anchoring is new on this host",
                        newest.seq,
                        path.display()
                    ),
                );
            }
            return true;
        }
        Err(e) => {
            alarm(
                store,
                format!("the audit head file is unreadable ({e}); it is kept as it is"),
            );
            return false;
        }
    };
    match store.verify_audit_against(std::slice::from_ref(&anchored)) {
        Ok(ChainCheck::Intact(_)) => {
            // Records past the head file: deployd stopped between a record
            // and its anchor, or something else wrote them.
            if let Some(newest) = newest.filter(|n| n.seq > anchored.seq) {
                alarm(
                    store,
                    format!(
                        "the store holds audit records {}..{} that its head file (record {}) \
                         does not know: written while deployd was stopping, or by something else",
                        anchored.seq + 1,
                        newest.seq,
                        anchored.seq
                    ),
                );
            }
            true
        }
        Ok(ChainCheck::Broken { seq, reason }) => {
            alarm(
                store,
                format!(
                    "the audit log does not match its head file {}: record {seq}: {reason}; \
                     the head file is kept as it is (run `deployd audit verify`)",
                    path.display()
                ),
            );
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot check the audit log against its head file");
            false
        }
    }
}

/// Says loudly that the audit log and its anchors disagree: in the log,
/// and as a record of the chain itself.
fn alarm(store: &Store, what: String) {
    tracing::error!("{what}");
    let mut record = AuditRecord::new("audit_anchor_mismatch", "alarm");
    record.subject = Some("deployd".into());
    record.detail = Some(what);
    if let Err(e) = store.append_audit(&record) {
        tracing::error!(error = %e, "cannot record the audit alarm");
    }
}

/// Removes events and audit records older than `retain_days`, at start and
/// daily; with a sink, never a record it has not acknowledged.
async fn retention(store: Store, retain_days: u32, forwarding: bool, stopping: CancellationToken) {
    let keep = time::Duration::days(i64::from(retain_days));
    loop {
        let keep_from = if forwarding {
            match store.forwarded_seq() {
                Ok(seq) => Some(seq.saturating_add(1)),
                Err(e) => {
                    tracing::warn!(error = %e, "store compaction skipped: cannot read what the sink has");
                    Some(0)
                }
            }
        } else {
            None
        };
        match store.compact(OffsetDateTime::now_utc() - keep, keep_from) {
            Ok(done) if done.events > 0 || done.plans > 0 || done.audit.is_some() => {
                tracing::info!(
                    events = done.events,
                    plans = done.plans,
                    audit_through = done.audit.map(|(through, _)| through),
                    checkpoint = done.audit.map(|(_, at)| at),
                    retain_days,
                    "store compacted"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "store compaction failed; tried again later"),
        }
        tokio::select! {
            () = stopping.cancelled() => return,
            () = tokio::time::sleep(COMPACT_EVERY) => {}
        }
    }
}

/// Where records are forwarded. Its `Debug` shows neither the token nor
/// credentials in the URL.
struct Sink {
    url: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("url", &shown_url(&self.url))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// A URL as logged: without a user or password in it.
fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

impl Sink {
    fn new(cfg: &AuditConfig) -> anyhow::Result<Option<Self>> {
        let Some(url) = &cfg.forward_url else {
            return Ok(None);
        };
        let http = crate::https_client(cfg.forward_ca.as_deref())
            .map_err(|e| anyhow::anyhow!("HTTP client for audit.forward_url: {e}"))?;
        let token = match &cfg.forward_token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| {
                        format!("cannot read audit.forward_token_file {}", path.display())
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(Some(Self {
            url: url.clone(),
            http,
            token,
        }))
    }

    /// Sends every record after the last acknowledged one, in order, then
    /// waits for new ones; retries a failing sink with growing pauses.
    async fn forward(self, store: Store, stopping: CancellationToken) {
        let sink = Arc::new(self);
        let mut pause = FIRST_RETRY;
        let mut failing = false;
        loop {
            let sent = sink.send_pending(&store, &stopping).await;
            let wait = match sent {
                Ok(()) => {
                    if failing {
                        tracing::info!(url = %shown_url(&sink.url), "the audit sink takes records again");
                    }
                    failing = false;
                    pause = FIRST_RETRY;
                    None
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(url = %shown_url(&sink.url), error = %e,
                            "the audit sink fails; records are kept and sent when it is back");
                    }
                    failing = true;
                    let wait = pause;
                    pause = (pause * 2).min(LONGEST_RETRY);
                    Some(wait)
                }
            };
            tokio::select! {
                () = stopping.cancelled() => return,
                () = store.audit_appended(), if wait.is_none() => {}
                () = tokio::time::sleep(wait.unwrap_or(LONGEST_RETRY)) => {}
            }
        }
    }

    /// Sends what the sink has not had yet, batch by batch, until there is
    /// nothing left or deployd stops (then what was acknowledged stays
    /// acknowledged).
    async fn send_pending(
        &self,
        store: &Store,
        stopping: &CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            let after = store.forwarded_seq()?;
            let batch = store.audit_after(after, FORWARD_BATCH)?;
            if batch.is_empty() {
                return Ok(());
            }
            let mut acknowledged = None;
            let mut failed = None;
            for stored in batch {
                // The text exactly as hashed: the sink can check the chain,
                // hash = sha256(prev_hash "\n" seq "\n" body).
                let body = serde_json::json!({
                    "seq": stored.entry.seq,
                    "prev_hash": stored.prev_hash,
                    "hash": stored.hash,
                    "body": stored.body,
                    "record": stored.entry.record,
                });
                let mut request = self.http.post(&self.url).json(&body);
                if let Some(token) = &self.token {
                    request = request.bearer_auth(token);
                }
                let sent = tokio::select! {
                    () = stopping.cancelled() => break,
                    sent = request.send() => sent,
                };
                match sent {
                    Ok(answer) if answer.status().is_success() => {
                        acknowledged = Some(stored.entry.seq);
                    }
                    Ok(answer) => {
                        failed = Some(anyhow::anyhow!(
                            "it answered {} to record {}",
                            answer.status(),
                            stored.entry.seq
                        ));
                        break;
                    }
                    Err(e) => {
                        failed = Some(anyhow::Error::new(e.without_url()));
                        break;
                    }
                }
            }
            if let Some(seq) = acknowledged {
                store.set_forwarded_seq(seq)?;
            }
            if let Some(e) = failed {
                return Err(e);
            }
            if stopping.is_cancelled() {
                return Ok(());
            }
        }
    }
}
