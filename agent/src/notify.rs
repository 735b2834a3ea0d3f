//! Webhooks (`[[apps.NAME.notify]]`): told when a deployment starts and how
//! it ended. Each delivery is a task of its own, retried with backoff for a
//! bounded time; nothing a hook does (fail, hang, refuse) reaches the
//! deployment. Every attempt's result is recorded with the deployment
//! (`deployctl logs <id>` shows them).
//!
//! A JSON hook's body is signed: `X-Deployd-Signature: sha256=<hex>` is the
//! HMAC-SHA256 of the body under the hook's key. `X-Deployd-Delivery` is
//! the same on every attempt of one delivery, for the receiver to drop
//! repeats; the body's `at` lets it refuse old ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deployd_proto::{Delivery, DeliveryState, Deployment};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use time::OffsetDateTime;

use crate::config::{AppConfig, NotifyConfig, NotifyFormat};
use crate::store::Store;

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Where each app's events go.
#[derive(Debug, Clone)]
pub struct Notifier {
    hooks: Arc<HashMap<String, Vec<NotifyConfig>>>,
    client: reqwest::Client,
    store: Store,
}

/// How one attempt went.
enum Attempt {
    Delivered(String),
    /// Worth another try (no answer, 429, 5xx).
    Again(String),
    /// Not worth another (a 4xx, an unreadable key).
    Refused(String),
}

impl Notifier {
    /// The hooks of `apps` (name, configuration); deliveries recorded in
    /// `store`.
    pub fn new<'a>(
        apps: impl Iterator<Item = (&'a String, &'a AppConfig)>,
        store: Store,
    ) -> Result<Self, String> {
        crate::install_crypto_provider();
        let hooks: HashMap<String, Vec<NotifyConfig>> = apps
            .filter(|(_, cfg)| !cfg.notify.is_empty())
            .map(|(app, cfg)| (app.clone(), cfg.notify.clone()))
            .collect();
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            // A redirect would take the signed body somewhere unnamed.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("deployd/", env!("CARGO_PKG_VERSION")));
        if hooks.is_empty() {
            // Never used: no need of the system's CA certificates (a host
            // without them runs deployd all the same).
            builder = builder.tls_certs_only(std::iter::empty());
        }
        let client = builder.build().map_err(|e| {
            format!("webhooks ([apps.NAME.notify]) need the system's CA certificates: {e}")
        })?;
        Ok(Self {
            hooks: Arc::new(hooks),
            client,
            store,
        })
    }

    /// Tells every hook of the deployment's app that wants `event`
    /// (`started`, or the terminal state's name). Returns at once.
    pub fn tell(&self, deployment: &Deployment, event: &str) {
        let Some(hooks) = self.hooks.get(&deployment.app) else {
            return;
        };
        for (index, hook) in hooks.iter().enumerate() {
            if !hook.events.iter().any(|e| e == event) {
                continue;
            }
            let delivery = Delivery {
                hook: hook_name(index, &hook.url),
                event: event.to_owned(),
                state: DeliveryState::Retrying,
                attempts: 0,
                detail: "not sent yet".into(),
                at: OffsetDateTime::now_utc(),
            };
            self.record(deployment, &delivery);
            let this = self.clone();
            let hook = hook.clone();
            let deployment = deployment.clone();
            tokio::spawn(async move { this.deliver(&hook, &deployment, delivery).await });
        }
    }

    fn record(&self, deployment: &Deployment, delivery: &Delivery) {
        if let Err(e) = self.store.put_delivery(&deployment.id, delivery) {
            tracing::warn!(deployment.id = %deployment.id, hook = %delivery.hook, error = %e, "delivery not recorded");
        }
    }

    /// Attempts until delivered, refused, or `retry_for` has passed.
    async fn deliver(&self, hook: &NotifyConfig, deployment: &Deployment, mut delivery: Delivery) {
        let body = match hook.format {
            NotifyFormat::Json => json_body(deployment, &delivery.event),
            NotifyFormat::Slack => slack_body(deployment, &delivery.event),
        };
        let id = uuid::Uuid::now_v7().to_string();
        let give_up = tokio::time::Instant::now() + hook.retry_for;
        let mut backoff = Duration::from_secs(1);
        loop {
            let attempt = self.attempt(hook, &id, &delivery.event, &body).await;
            delivery.attempts += 1;
            delivery.at = OffsetDateTime::now_utc();
            let (state, detail) = match attempt {
                Attempt::Delivered(detail) => (DeliveryState::Delivered, detail),
                Attempt::Refused(detail) => (DeliveryState::Failed, detail),
                Attempt::Again(detail) if tokio::time::Instant::now() + backoff >= give_up => {
                    let waited = humantime::format_duration(hook.retry_for);
                    (
                        DeliveryState::Failed,
                        format!("{detail}; given up after {waited}"),
                    )
                }
                Attempt::Again(detail) => (DeliveryState::Retrying, detail),
            };
            delivery.state = state;
            delivery.detail = detail;
            self.record(deployment, &delivery);
            if state != DeliveryState::Retrying {
                if state == DeliveryState::Failed {
                    tracing::warn!(deployment.id = %deployment.id, hook = %delivery.hook, detail = %delivery.detail, "webhook not delivered");
                }
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn attempt(&self, hook: &NotifyConfig, id: &str, event: &str, body: &str) -> Attempt {
        let mut request = self
            .client
            .post(&hook.url)
            .timeout(hook.timeout)
            .header("content-type", "application/json")
            .header("x-deployd-event", event)
            .header("x-deployd-delivery", id);
        if let Some(path) = &hook.secret_file {
            match crate::auth::read_secret(path) {
                Ok(key) => request = request.header("x-deployd-signature", signature(&key, body)),
                Err(e) => return Attempt::Refused(e),
            }
        }
        match request.body(body.to_owned()).send().await {
            Ok(answer) => {
                let status = answer.status();
                let detail = format!("HTTP {}", status.as_u16());
                if status.is_success() {
                    Attempt::Delivered(detail)
                } else if status.is_server_error() || status.as_u16() == 429 {
                    Attempt::Again(detail)
                } else {
                    Attempt::Refused(detail)
                }
            }
            Err(e) if e.is_timeout() => Attempt::Again(format!(
                "no answer within {}",
                humantime::format_duration(hook.timeout)
            )),
            // The chain says why (refused, TLS, DNS); a URL never shows.
            Err(e) => Attempt::Again(cause(&e.without_url())),
        }
    }
}

/// `notify[0] hooks.example.com`: where a hook is, without its URL's path,
/// which may be its secret (Slack's are).
fn hook_name(index: usize, url: &str) -> String {
    let host = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    format!("notify[{index}] {host}")
}

fn cause(e: &dyn std::error::Error) -> String {
    let mut why = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    why
}

/// `sha256=` and the hex of the body's HMAC-SHA256 under `key`.
fn signature(key: &[u8], body: &str) -> String {
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

fn json_body(d: &Deployment, event: &str) -> String {
    serde_json::json!({
        "event": event,
        "app": d.app,
        "deployment": d.id.0,
        "kind": d.kind.as_str(),
        "sha": d.sha,
        "previous_sha": d.previous_sha,
        "digest": d.digest,
        "requested_by": d.requested_by,
        "reason": d.reason,
        "state": d.state.as_str(),
        "error": d.error,
        "at": OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    })
    .to_string()
}

fn slack_body(d: &Deployment, event: &str) -> String {
    let mark = match event {
        "started" => ":rocket:",
        "succeeded" => ":white_check_mark:",
        "rolled_back" => ":leftwards_arrow_with_hook:",
        _ => ":x:",
    };
    let sha = deployd_proto::short_sha(d.sha.as_str());
    let what = match event {
        "started" => "started".to_owned(),
        other => other.replace('_', " "),
    };
    let mut text = format!(
        "{mark} {}: {} of {sha} {what} (by {})",
        d.app, d.kind, d.requested_by
    );
    if let Some(error) = d.error.as_deref().filter(|_| event != "started") {
        text.push_str(&format!("\n> {error}"));
    }
    serde_json::json!({ "text": text }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_the_hmac_of_the_body() {
        // RFC 4231, test case 2.
        let hex = signature(b"Jefe", "what do ya want for nothing?");
        assert_eq!(
            hex,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_hook_is_named_by_its_host_never_its_path() {
        let name = hook_name(2, "https://hooks.slack.com/services/T0/B0/secret");
        assert_eq!(name, "notify[2] hooks.slack.com");
    }
}
