//! Auditing `/v1` requests.
//!
//! A change is recorded before it is made (`requested`); if that record
//! cannot be written the change is refused. After the answer (see `guard`),
//! every change and every refusal of an authenticated caller is recorded
//! with its outcome. Requests that never authenticated are not records of
//! their own: the first of each address per minute is, the rest are
//! counted into one summary record per address and minute. The token's
//! `jti` is spent by the change, so a replayed token cannot make another; a
//! change refused for a conflict or a lock gives it back.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use axum::Extension;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::StatusCode;
use axum::http::request::Parts;
use deployd_proto::{Deployment, ErrorCode};
use time::OffsetDateTime;

use super::fleet::{FleetChange, Standing, admit};
use super::{ApiError, ApiState, Json};
use crate::auth::{AuthError, Principal};
use crate::engine::EngineError;
use crate::store::AuditRecord;

/// The deployment a change started, for the audit record.
#[derive(Debug, Clone)]
pub(super) struct Started(pub String);

/// The client's address, when the connection has one.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(client_addr(parts)))
    }
}

pub(super) fn client_addr(parts: &Parts) -> Option<IpAddr> {
    client_addr_in(&parts.extensions)
}

/// The client's address, from a request's extensions.
pub(super) fn client_addr_in(extensions: &http::Extensions) -> Option<IpAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// A record about `who`.
pub(super) fn record(
    who: Option<&Principal>,
    source: Option<IpAddr>,
    action: &str,
    outcome: &str,
) -> AuditRecord {
    let mut record = AuditRecord::new(action, outcome);
    attribute(&mut record, who, source);
    record
}

/// Says who asked, and from where.
fn attribute(record: &mut AuditRecord, who: Option<&Principal>, source: Option<IpAddr>) {
    if let Some(who) = who {
        record.subject = Some(who.subject.clone());
        record.issuer = Some(who.issuer.clone());
        record.claims = who.audit_claims.clone();
    }
    record.source = source.map(|ip| ip.to_string());
}

/// A token id spent on a change, to give back if the change is refused;
/// none for a change made under the fleet lock the token holds.
#[derive(Debug)]
pub(super) struct Spent(Option<(String, String)>);

/// Before a change: records it (or refuses it, 503, when the audit log
/// cannot be written), then spends the token's `jti` (refusing a replay).
pub(super) fn begin_change(
    state: &ApiState,
    who: &Principal,
    source: ClientAddr,
    intent: AuditRecord,
) -> Result<Spent, ApiError> {
    begin_fleet_change(state, who, source, intent, None)
}

/// Like [`begin_change`] for a change that names a fleet deployment
/// (`app`, its id, the change): see `super::fleet`. Its holder's token is
/// not spent again; a caller who is neither its holder nor an admin is
/// refused; a newer token of its holder takes the lock over.
pub(super) fn begin_fleet_change(
    state: &ApiState,
    who: &Principal,
    source: ClientAddr,
    mut intent: AuditRecord,
    fleet: Option<(&str, &str, FleetChange<'_>)>,
) -> Result<Spent, ApiError> {
    let standing = match fleet {
        Some((app, id, change)) => Some((app, id, admit(state, who, app, id, change)?)),
        None => None,
    };
    attribute(&mut intent, Some(who), source.0);
    intent.outcome = "requested".into();
    if let Err(e) = state.engine.audit(&intent) {
        if matches!(e, crate::store::StoreError::Full) {
            return Err(ApiError::store_full());
        }
        tracing::error!(error = %e, "audit log not writable: change refused");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::AuditUnavailable,
            "the audit log cannot be written, so no change is made",
        ));
    }
    let jti = who.jti.clone().ok_or_else(|| {
        AuthError::Invalid("a token without an id (jti) cannot make changes".into())
    })?;
    if let Some((_, _, Standing::Holder)) = standing {
        return Ok(Spent(None));
    }
    // Remembered as long as the token still passes verification.
    let leeway = i64::try_from(state.authenticator().leeway().as_secs()).unwrap_or(i64::MAX);
    let expires = who.expires_at.unix_timestamp().saturating_add(leeway);
    if !state.engine.spend_token(&who.issuer, &jti, expires)? {
        return Err(AuthError::Replayed.into());
    }
    if let Some((app, id, Standing::Successor)) = standing {
        state.engine.pass_fleet_lock(app, id, (&who.issuer, &jti))?;
    }
    Ok(Spent(Some((who.issuer.clone(), jti))))
}

/// After a refused change: the token may try again.
pub(super) fn give_back(state: &ApiState, spent: Spent) {
    let Spent(Some((issuer, jti))) = spent else {
        return;
    };
    if let Err(e) = state.engine.unspend_token(&issuer, &jti) {
        tracing::warn!(error = %e, "token id not given back");
    }
}

/// The end of a change that starts a deployment: 202 with it (and its id
/// for the outcome record), or the refusal, giving the token id back when
/// nothing was changed.
pub(super) async fn started(
    state: &ApiState,
    spent: Spent,
    start: impl Future<Output = Result<Deployment, EngineError>>,
) -> Result<(StatusCode, Extension<Started>, Json<Deployment>), ApiError> {
    let deployment = ended(state, spent, start.await)?;
    let started = Started(deployment.id.0.clone());
    Ok((StatusCode::ACCEPTED, Extension(started), Json(deployment)))
}

/// The end of a change: its result, or its refusal, giving the token id
/// back when nothing was changed.
pub(super) fn ended<T>(
    state: &ApiState,
    spent: Spent,
    result: Result<T, EngineError>,
) -> Result<T, ApiError> {
    result.map_err(|e| {
        if e.changed_nothing() {
            give_back(state, spent);
        }
        e.into()
    })
}

/// Whether an answer refused the caller: 401, 403 or 429.
pub(super) fn refuses_caller(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
    )
}

/// Paths and app names in records are cut to this many characters.
const MAX_PATH_CHARS: usize = 200;

/// A path (or a part of one) as recorded: at most [`MAX_PATH_CHARS`]
/// characters, and how long it was when cut.
pub(super) fn cut_path(path: &str) -> String {
    match path.char_indices().nth(MAX_PATH_CHARS) {
        None => path.to_owned(),
        Some((end, _)) => format!("{}... ({} bytes)", &path[..end], path.len()),
    }
}

/// First records written per minute for refusals of unauthenticated
/// requests, all addresses together; past it, refusals are only counted.
const MAX_FIRSTS_PER_WINDOW: usize = 100;
/// Addresses with a window open at most; past it, they count together.
const MAX_WINDOWS: usize = 10_000;

/// Refusals of requests that never authenticated: the first of each
/// address in a minute is recorded, the rest are counted and recorded as
/// one summary when the minute is over.
#[derive(Debug, Default)]
pub struct RefusalLog {
    windows: Mutex<Windows>,
}

#[derive(Debug, Default)]
struct Windows {
    /// By address (IPv6: /64); `None` for no address or a full table.
    open: HashMap<Option<IpAddr>, Window>,
    /// When the current count of first records began, and the count.
    firsts: Option<(Instant, usize)>,
}

#[derive(Debug)]
struct Window {
    opened: Instant,
    since: OffsetDateTime,
    /// Refusals not recorded one by one, by status and code.
    counted: BTreeMap<String, u64>,
}

impl Window {
    fn summary(&self, source: Option<IpAddr>) -> Option<AuditRecord> {
        let total: u64 = self.counted.values().sum();
        if total == 0 {
            return None;
        }
        let mut record = AuditRecord::new("refused_requests", "refused");
        record.source = source.map(|ip| ip.to_string());
        let counts: Vec<String> = self
            .counted
            .iter()
            .map(|(detail, n)| format!("{detail} x{n}"))
            .collect();
        let since = self
            .since
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let from = source.map_or_else(
            || "several addresses (past this minute's first records)".to_owned(),
            |ip| ip.to_string(),
        );
        record.detail = Some(format!(
            "{total} unauthenticated request(s) from {from} refused without a record of their \
             own, from {since} for {} s: {}",
            crate::auth::gate::WINDOW.as_secs(),
            counts.join(", ")
        ));
        Some(record)
    }
}

impl RefusalLog {
    /// Notes a refused unauthenticated request; returns the records to
    /// write now: its own if it is the first of its address this minute,
    /// and the summary of the address's previous minute.
    pub fn note(&self, source: Option<IpAddr>, action: &str, detail: &str) -> Vec<AuditRecord> {
        self.note_at(Instant::now(), source, action, detail)
    }

    /// The summaries of every minute that is over.
    pub fn flush(&self) -> Vec<AuditRecord> {
        self.flush_at(Instant::now(), false)
    }

    /// The summaries of every minute counted so far (at shutdown).
    pub fn flush_all(&self) -> Vec<AuditRecord> {
        self.flush_at(Instant::now(), true)
    }

    fn note_at(
        &self,
        now: Instant,
        source: Option<IpAddr>,
        action: &str,
        detail: &str,
    ) -> Vec<AuditRecord> {
        let window = crate::auth::gate::WINDOW;
        let mut windows = crate::sync::lock(&self.windows);
        let mut key = source.map(crate::limit::bucket);
        let firsts = match windows.firsts {
            Some((began, n)) if now.saturating_duration_since(began) < window => (began, n),
            _ => (now, 0),
        };
        // Past the first records of this minute, or with the table full,
        // a new address counts in the one shared window: summaries stay as
        // few as first records, whatever the number of addresses.
        if !windows.open.contains_key(&key)
            && (firsts.1 >= MAX_FIRSTS_PER_WINDOW || windows.open.len() >= MAX_WINDOWS)
        {
            key = None;
        }
        let mut written = Vec::new();
        if let Some(open) = windows.open.get_mut(&key) {
            if now.saturating_duration_since(open.opened) < window {
                *open.counted.entry(detail.to_owned()).or_default() += 1;
                return written;
            }
            written.extend(open.summary(key));
            windows.open.remove(&key);
        }
        let mut opened = Window {
            opened: now,
            since: OffsetDateTime::now_utc(),
            counted: BTreeMap::new(),
        };
        if firsts.1 < MAX_FIRSTS_PER_WINDOW && key.is_some() {
            windows.firsts = Some((firsts.0, firsts.1 + 1));
            let mut first = record(None, source, action, "refused");
            first.detail = Some(format!(
                "{detail} (further unauthenticated refusals of this address within {} s are \
                 counted in one summary record)",
                window.as_secs()
            ));
            written.push(first);
        } else {
            windows.firsts = Some(firsts);
            opened.counted.insert(detail.to_owned(), 1);
        }
        windows.open.insert(key, opened);
        written
    }

    fn flush_at(&self, now: Instant, all: bool) -> Vec<AuditRecord> {
        let window = crate::auth::gate::WINDOW;
        let mut windows = crate::sync::lock(&self.windows);
        let mut written = Vec::new();
        windows.open.retain(|key, open| {
            let over = all || now.saturating_duration_since(open.opened) >= window;
            if over {
                written.extend(open.summary(*key));
            }
            !over
        });
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flood_is_one_record_and_one_summary_per_address_and_minute() {
        let log = RefusalLog::default();
        let start = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let first = log.note_at(start, Some(a), "PATCH /v1/x", "401 unauthenticated");
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].action, "PATCH /v1/x");
        for i in 0..5000 {
            let detail = if i < 20 {
                "401 unauthenticated"
            } else {
                "429 too_many_failures"
            };
            assert!(
                log.note_at(start, Some(a), "PATCH /v1/x", detail)
                    .is_empty()
            );
        }
        // Another address has a first record of its own.
        assert_eq!(
            log.note_at(start, Some(b), "GET /v1", "401 invalid_token")
                .len(),
            1
        );
        // Nothing is over yet; a minute later both are summarised once.
        assert!(
            log.flush_at(start + Duration::from_secs(30), false)
                .is_empty()
        );
        let summaries = log.flush_at(start + Duration::from_secs(61), false);
        assert_eq!(summaries.len(), 1, "{summaries:#?}");
        let detail = summaries[0].detail.as_deref().unwrap();
        assert!(detail.starts_with("5000 unauthenticated"), "{detail}");
        assert!(detail.contains("401 unauthenticated x20"), "{detail}");
        assert!(detail.contains("429 too_many_failures x4980"), "{detail}");
        assert_eq!(summaries[0].source.as_deref(), Some("192.0.2.1"));
        // The next minute starts over with a first record.
        let later = start + Duration::from_secs(62);
        assert_eq!(log.note_at(later, Some(a), "PATCH /v1/x", "401 x").len(), 1);
    }

    #[test]
    fn first_records_are_bounded_across_addresses() {
        let log = RefusalLog::default();
        let start = Instant::now();
        let mut firsts = 0;
        for i in 0..(MAX_FIRSTS_PER_WINDOW as u32 + 50) {
            let ip = IpAddr::V4((0x0a00_0000 + i).into());
            firsts += log.note_at(start, Some(ip), "GET /v1", "401 x").len();
        }
        assert_eq!(firsts, MAX_FIRSTS_PER_WINDOW);
        // The rest share one window: one summary for all 50 of them.
        let summaries = log.flush_at(start, true);
        assert_eq!(summaries.len(), 1, "{summaries:#?}");
        assert!(summaries[0].source.is_none());
        assert!(
            summaries[0]
                .detail
                .as_deref()
                .unwrap()
                .starts_with("50 unauthenticated"),
            "{summaries:#?}"
        );
    }

    #[test]
    fn long_paths_are_cut_and_say_how_long_they_were() {
        assert_eq!(cut_path("/v1/apps/shop/status"), "/v1/apps/shop/status");
        let long = format!("/v1/{}", "a".repeat(60_000));
        let cut = cut_path(&long);
        assert!(cut.len() < 240, "{}", cut.len());
        assert!(cut.ends_with("... (60004 bytes)"), "{cut}");
        // Never inside a character.
        assert!(cut_path(&"é".repeat(300)).starts_with('é'));
    }
}
