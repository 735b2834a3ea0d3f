//! All HTTP to the agent goes through here. Error answers become one
//! readable line with a hint and the right exit code; a token never
//! appears in any of them.

use std::time::Duration;

use deployd_proto::{ErrorBody, ErrorCode};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use crate::exit::{CliError, Exit};
use crate::operator::Operator;
use crate::settings::Settings;
use crate::{oidc, tls};

/// A job token this close to its expiry is fetched again.
const RENEW_BEFORE: Duration = Duration::from_secs(60);

/// Whether a JWT's `exp` is less than `margin` away (or unreadable). The
/// token is not verified here: the agent does that; this only decides
/// when to ask the CI for a new one.
fn expires_within(token: &str, margin: Duration) -> bool {
    use base64::Engine;
    let exp = token
        .split('.')
        .nth(1)
        .and_then(|payload| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .ok()
        })
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .and_then(|claims| claims.get("exp").and_then(serde_json::Value::as_i64));
    let Some(exp) = exp else { return true };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    exp - now < i64::try_from(margin.as_secs()).unwrap_or(i64::MAX)
}

/// A connection to one agent, with the caller's token. Its `Debug` leaves
/// the token out.
pub struct Client {
    http: reqwest::Client,
    /// For event streams: no overall timeout.
    streaming: reqwest::Client,
    settings: Settings,
    /// The token in use; GitHub job tokens are fetched again when refused.
    token: Mutex<Option<String>>,
    /// With an operator key, a token is signed for every request instead.
    operator: Option<Operator>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn unreachable(url: &str, e: &reqwest::Error) -> CliError {
    // The chain says why (refused, TLS, DNS) without any header content.
    let mut why = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    CliError::new(Exit::Unreachable, format!("cannot reach the agent at {url}: {why}"))
        .hint("is deployd running there? check DEPLOYCTL_URL, and DEPLOYCTL_CA_CERT or --pin-sha256 for its certificate")
}

impl Client {
    pub fn new(settings: Settings) -> Result<Self, CliError> {
        let build = |timeout: Option<Duration>| {
            let mut builder = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .user_agent(concat!("deployctl/", env!("CARGO_PKG_VERSION")));
            match timeout {
                Some(timeout) => builder = builder.timeout(timeout),
                None => builder = builder.read_timeout(Duration::from_secs(45)),
            }
            if let Some(pin) = &settings.pin_sha256 {
                builder = builder
                    .tls_backend_preconfigured(tls::pinned_config(tls::parse_fingerprint(pin)?)?);
            } else if let Some(path) = &settings.ca_cert {
                let pem = std::fs::read(path).map_err(|e| {
                    CliError::usage(format!("cannot read CA file {}: {e}", path.display()))
                })?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| {
                    CliError::usage(format!(
                        "{} is not a PEM certificate bundle",
                        path.display()
                    ))
                })?;
                builder = builder.tls_certs_merge(certs);
            }
            builder
                .build()
                .map_err(|e| CliError::new(Exit::Other, format!("HTTP client: {e}")))
        };
        Ok(Self {
            operator: Operator::from_settings(&settings)?,
            http: build(Some(Duration::from_secs(60)))?,
            // No overall timeout, but the agent sends a keep-alive every
            // 15 s: a stream silent for 45 s is dead.
            streaming: build(None)?,
            settings,
            token: Mutex::new(None),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The token: given, read from a file, or fetched from the CI, once;
    /// a GitHub job token is fetched again when it nears its expiry (a
    /// fleet deployment can outlast one).
    async fn token(&self) -> Result<String, CliError> {
        if let Some(operator) = &self.operator {
            return operator.token();
        }
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref() {
            let renewable = self.settings.oidc == Some(crate::settings::Oidc::Github);
            if !(renewable && expires_within(token, RENEW_BEFORE)) {
                return Ok(token.clone());
            }
        }
        let token = self.fresh_token().await?;
        *cached = Some(token.clone());
        Ok(token)
    }

    /// After a 401: a GitHub job token is fetched again (they live
    /// minutes); `false` if there is nothing new to try.
    async fn renew_token(&self) -> bool {
        if self.settings.oidc != Some(crate::settings::Oidc::Github) {
            return false;
        }
        *self.token.lock().await = None;
        true
    }

    async fn fresh_token(&self) -> Result<String, CliError> {
        let s = &self.settings;
        if let Some(kind) = s.oidc {
            return oidc::job_token(kind, s).await;
        }
        if let Some(token) = &s.token {
            return Ok(token.trim().to_owned());
        }
        if let Some(path) = &s.token_file {
            return std::fs::read_to_string(path)
                .map(|t| t.trim().to_owned())
                .map_err(|e| {
                    CliError::usage(format!("cannot read token file {}: {e}", path.display()))
                });
        }
        Err(CliError::new(Exit::Auth, "no token")
            .hint("set DEPLOYCTL_TOKEN or DEPLOYCTL_TOKEN_FILE, --oidc github|gitlab in CI, or use an operator key (deployctl keygen, --ssh-agent)"))
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<reqwest::Response, CliError> {
        let url = format!("{}{path}", self.settings.url);
        let mut renewed = false;
        loop {
            let mut request = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(self.token().await?);
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request
                .send()
                .await
                .map_err(|e| unreachable(&self.settings.url, &e))?;
            if response.status().is_success() {
                return Ok(response);
            }
            // Reads may outlive a short job token: one fresh try.
            let read = method == Method::GET;
            if response.status() == StatusCode::UNAUTHORIZED
                && read
                && !renewed
                && self.renew_token().await
            {
                renewed = true;
                continue;
            }
            return Err(error_from(response).await);
        }
    }

    /// `GET path`: its JSON answer, or the error it stands for.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.answer(Method::GET, path, None).await
    }

    /// `method path` with `body` (a `deployd_proto` request type) as JSON:
    /// its JSON answer, or the error it stands for.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, CliError> {
        let body = serde_json::to_value(body)
            .map_err(|e| CliError::new(Exit::Other, format!("cannot write the request: {e}")))?;
        self.answer(method, path, Some(&body)).await
    }

    async fn answer<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, CliError> {
        let response = self.request(method, path, body).await?;
        response.json().await.map_err(|e| {
            CliError::new(
                Exit::Other,
                format!("the agent's answer is not what deployctl expects: {e}"),
            )
            .hint("are deployctl and deployd of compatible versions?")
        })
    }

    /// `POST path` with `body` as JSON, answered by an event stream that
    /// lasts as long as what it reports (no overall timeout).
    pub async fn post_stream(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<reqwest::Response, CliError> {
        let url = format!("{}{path}", self.settings.url);
        self.open_stream(self.streaming.post(url).json(body)).await
    }

    /// `GET path`, answered by an event stream.
    pub async fn get_stream(&self, path: &str) -> Result<reqwest::Response, CliError> {
        let url = format!("{}{path}", self.settings.url);
        self.open_stream(self.streaming.get(url)).await
    }

    async fn open_stream(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CliError> {
        let response = request
            .bearer_auth(self.token().await?)
            .header("accept", "text/event-stream")
            .send()
            .await
            .map_err(|e| unreachable(&self.settings.url, &e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(error_from(response).await)
    }

    /// A request whose answer has no body (204).
    pub async fn call_empty(&self, method: Method, path: &str) -> Result<(), CliError> {
        self.request(method, path, None).await.map(|_| ())
    }

    /// Opens a deployment's event stream after `after`; with `live` false,
    /// the recorded events only. `None`: the deployment is over and every
    /// event was seen (204).
    pub async fn events(
        &self,
        id: &str,
        after: u64,
        live: bool,
    ) -> Result<Option<reqwest::Response>, CliError> {
        let url = if live {
            format!("{}/v1/deployments/{id}/events", self.settings.url)
        } else {
            format!(
                "{}/v1/deployments/{id}/events?follow=false",
                self.settings.url
            )
        };
        let mut renewed = false;
        let response = loop {
            let mut request = self
                .streaming
                .get(&url)
                .bearer_auth(self.token().await?)
                .header("accept", "text/event-stream");
            if after > 0 {
                request = request.header("last-event-id", after.to_string());
            }
            let response = request
                .send()
                .await
                .map_err(|e| unreachable(&self.settings.url, &e))?;
            if response.status() == StatusCode::UNAUTHORIZED && !renewed && self.renew_token().await
            {
                renewed = true;
                continue;
            }
            break response;
        };
        match response.status() {
            StatusCode::NO_CONTENT => Ok(None),
            s if s.is_success() => Ok(Some(response)),
            // A restarting agent, or a proxy in front of one: retried like
            // a dropped connection.
            s @ (StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT) => Err(CliError::new(
                Exit::Unreachable,
                format!("the agent answered HTTP {s} to the event stream"),
            )),
            _ => Err(error_from(response).await),
        }
    }
}

/// Turns an error answer into a [`CliError`].
async fn error_from(response: reqwest::Response) -> CliError {
    let status = response.status();
    let body = response.json::<ErrorBody>().await.unwrap_or_else(|_| {
        ErrorBody::new(
            ErrorCode::Unknown,
            format!("the agent answered HTTP {status}"),
        )
    });
    let message = body.message.clone();
    match (status, body.code) {
        (_, ErrorCode::TokenReplayed) => CliError::new(Exit::Auth, message)
            .hint("a token makes one change; get a new one (deployd token issue, or the CI's OIDC token)"),
        (StatusCode::UNAUTHORIZED, _) => CliError::new(Exit::Auth, message)
            .hint("check the token (DEPLOYCTL_TOKEN / DEPLOYCTL_TOKEN_FILE / --oidc): expired, wrong audience or issuer? Or the operator key: is it in the host's [[auth.operators]]?"),
        (StatusCode::FORBIDDEN, _) => CliError::new(Exit::Auth, message)
            .hint("`deployctl whoami` shows what this token may do"),
        (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyStreams) => CliError::new(Exit::Other, message)
            .hint("too many event streams are open for this token or address: end other --follow commands"),
        (StatusCode::TOO_MANY_REQUESTS, _) => CliError::new(Exit::Auth, message)
            .hint("too many failed logins from here; wait a minute"),
        (_, ErrorCode::StoreFull) => CliError::new(Exit::Other, message)
            .hint("free space on the disk of the agent's state directory (df /var/lib/deployd), then retry"),
        (StatusCode::CONFLICT, ErrorCode::Conflict) => {
            let hint = match &body.deployment {
                Some(id) => format!("follow it: deployctl logs {id} --follow; or retry with --wait-lock 10m"),
                None => "retry with --wait-lock 10m".to_owned(),
            };
            let mut error = CliError::new(Exit::Conflict, message).hint(hint);
            error.running = body.deployment.clone();
            error
        }
        (StatusCode::LOCKED, _) => CliError::new(Exit::Conflict, message)
            .hint("deployctl unlock lifts it (admin scope), or retry with --wait-lock"),
        (StatusCode::CONFLICT, ErrorCode::Preparing) => CliError::new(Exit::Conflict, message)
            .hint("a pull or plan of the app is under way; retry once it has ended"),
        (_, ErrorCode::NoCanary) => CliError::new(Exit::Other, message)
            .hint("a canary runs only during `deployctl deploy --canary`; deployctl status shows what runs"),
        (_, ErrorCode::CanaryNotConfigured) => CliError::new(Exit::Usage, message)
            .hint("add an [apps.NAME.canary] table to deployd's config, or deploy without --canary"),
        (StatusCode::CONFLICT, ErrorCode::CommandRunning) => CliError::new(Exit::Conflict, message)
            .hint("--concurrent runs a command beside others (at most 4 at once)"),
        (StatusCode::CONFLICT, ErrorCode::NothingLive) => CliError::new(Exit::Conflict, message)
            .hint("deployctl deploy <sha> first: a command runs in the live release"),
        (StatusCode::CONFLICT, _) => CliError::new(Exit::Other, message),
        (StatusCode::SERVICE_UNAVAILABLE, _) => {
            CliError::new(Exit::Other, message).hint("the agent is busy or degraded; try again shortly")
        }
        (s, _) if s.is_server_error() => {
            CliError::new(Exit::Other, message).hint("the agent's log (journalctl -u deployd) has the details")
        }
        _ => CliError::new(Exit::Other, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn token_expiring_in(seconds: i64) -> String {
        let exp = time::OffsetDateTime::now_utc().unix_timestamp() + seconds;
        let encode = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.sig",
            encode(serde_json::json!({"alg": "RS256"})),
            encode(serde_json::json!({"exp": exp, "sub": "ci"}))
        )
    }

    #[test]
    fn job_tokens_are_renewed_only_near_their_expiry() {
        let minute = Duration::from_secs(60);
        assert!(!expires_within(&token_expiring_in(300), minute));
        assert!(expires_within(&token_expiring_in(30), minute));
        assert!(expires_within(&token_expiring_in(-10), minute));
        // Unreadable: fetch a new one rather than send it.
        assert!(expires_within("not a jwt", minute));
    }
}
