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
use crate::store::{AuditHead, ChainCheck, Store};

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
    let trusted = check_head_file(store, &head_file);
    if trusted {
        store.anchor_head_to(head_file);
    }
    let mut tasks = vec![tokio::spawn(retention(
        store.clone(),
        config.store.retain_days,
        stopping.clone(),
    ))];
    if let Some(sink) = Sink::new(&config.audit)? {
        tasks.push(tokio::spawn(sink.forward(store.clone(), stopping.clone())));
    }
    Ok(tasks)
}

/// Compares the store's chain with the head file left by the last run.
/// A mismatch is logged as the alarm it is, and the file is left as it
/// stands, as evidence: returns whether new heads may replace it.
fn check_head_file(store: &Store, path: &std::path::Path) -> bool {
    let anchored = match AuditHead::read(path) {
        Ok(head) => head,
        // None yet (a new host): this run starts it.
        Err(_) if !path.exists() => return true,
        Err(e) => {
            tracing::error!(error = %e, "the audit head file is unreadable; not replacing it");
            return false;
        }
    };
    match store.verify_audit_against(std::slice::from_ref(&anchored)) {
        Ok(ChainCheck::Intact(_)) => true,
        Ok(ChainCheck::Broken { seq, reason }) => {
            tracing::error!(
                head_file = %path.display(),
                seq,
                "the audit log does not match its head file: record {seq}: {reason}; \
                 the head file is kept as it is (run `deployd audit verify`)"
            );
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot check the audit log against its head file");
            false
        }
    }
}

/// Removes events and audit records older than `retain_days`, at start and
/// daily.
async fn retention(store: Store, retain_days: u32, stopping: CancellationToken) {
    let keep = time::Duration::days(i64::from(retain_days));
    loop {
        match store.compact(OffsetDateTime::now_utc() - keep) {
            Ok(done) if done.events > 0 || done.audit.is_some() => tracing::info!(
                events = done.events,
                audit_through = done.audit.map(|(through, _)| through),
                checkpoint = done.audit.map(|(_, at)| at),
                retain_days,
                "store compacted"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "store compaction failed; tried again later"),
        }
        tokio::select! {
            () = stopping.cancelled() => return,
            () = tokio::time::sleep(COMPACT_EVERY) => {}
        }
    }
}

/// Where records are forwarded.
#[derive(Debug)]
struct Sink {
    url: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Sink {
    fn new(cfg: &AuditConfig) -> anyhow::Result<Option<Self>> {
        let Some(url) = &cfg.forward_url else {
            return Ok(None);
        };
        crate::install_crypto_provider();
        let mut http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .https_only(true)
            .no_proxy();
        if let Some(path) = &cfg.forward_ca {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read audit.forward_ca {}", path.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{} is not a PEM CA bundle", path.display()))?
            {
                http = http.add_root_certificate(cert);
            }
        }
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
            http: http.build().context("HTTP client for audit.forward_url")?,
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
            let sent = sink.send_pending(&store).await;
            let wait = match sent {
                Ok(()) => {
                    if failing {
                        tracing::info!(url = %sink.url, "the audit sink takes records again");
                    }
                    failing = false;
                    pause = FIRST_RETRY;
                    None
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(url = %sink.url, error = %e,
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

    async fn send_pending(&self, store: &Store) -> anyhow::Result<()> {
        loop {
            let after = store.forwarded_seq()?;
            let batch = store.audit_after(after, FORWARD_BATCH)?;
            if batch.is_empty() {
                return Ok(());
            }
            for (entry, prev_hash, hash) in batch {
                let body = serde_json::json!({
                    "seq": entry.seq,
                    "prev_hash": prev_hash,
                    "hash": hash,
                    "record": entry.record,
                });
                let mut request = self.http.post(&self.url).json(&body);
                if let Some(token) = &self.token {
                    request = request.bearer_auth(token);
                }
                let answer = request.send().await?;
                anyhow::ensure!(
                    answer.status().is_success(),
                    "it answered {} to record {}",
                    answer.status(),
                    entry.seq
                );
                store.set_forwarded_seq(entry.seq)?;
            }
        }
    }
}
