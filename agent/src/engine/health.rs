//! Is a new container up? HTTP health for web, staying alive for the rest.
//!
//! The HTTP check says what happened: it never follows a redirect (an app
//! that redirects plain HTTP to HTTPS answers `301` with its `Location`, and
//! that is what is reported), and a refused, reset or silent connection is
//! told apart from an answer. Polling starts at 50 ms and backs off to 1 s:
//! a container that is ready fast is seen fast, and a slow one is not
//! hammered. There is no fixed sleep.

use std::fmt;
use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_TYPE, HOST, LOCATION};

use super::Ctx;
use super::common::Failure;
use crate::config::HealthConfig;
use crate::docker::ContainerState;

const FIRST_POLL: Duration = Duration::from_millis(50);
const MAX_POLL: Duration = Duration::from_secs(1);
/// One health request may take this long (a booting app accepts
/// connections before it answers).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Lines of a dead container's output quoted in the failure.
const LOG_LINES: usize = 5;
/// Characters of a short text or JSON answer quoted in the log.
const EXCERPT_CHARS: usize = 160;
/// Bytes of an answer's body read to quote it.
const EXCERPT_READ: usize = 4096;
/// Request headers whose values the log shows: what proxies forward. Any
/// other header's value may be a credential and is left out.
const SHOWN_HEADERS: [&str; 6] = [
    "accept",
    "user-agent",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-proto",
];

/// The HTTP health check: its own client, which never follows redirects,
/// trusts no TLS root (it speaks plain HTTP to containers) and ignores
/// proxy settings.
#[derive(Debug, Clone)]
pub(crate) struct HealthCheck {
    client: reqwest::Client,
}

/// What one health request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// An HTTP answer, whatever its status.
    Answer(Answer),
    /// Nothing listens on the port (yet).
    Refused,
    /// The connection was reset or closed before an answer.
    Reset,
    /// No answer within [`REQUEST_TIMEOUT`].
    Timeout,
    /// Anything else, in the HTTP client's words.
    Failed(String),
}

/// An HTTP answer to a health request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub status: u16,
    pub location: Option<String>,
    pub content_type: Option<String>,
    /// The start of a short text or JSON body, on one line.
    pub excerpt: Option<String>,
    pub elapsed: Duration,
}

/// A container that passed its HTTP health check: the answer that passed,
/// after how many requests and how long.
#[derive(Debug, Clone)]
pub(crate) struct Healthy {
    pub answer: Answer,
    pub checks: u32,
    pub after: Duration,
}

impl HealthCheck {
    pub fn new() -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .tls_certs_only(std::iter::empty())
            .build()?;
        Ok(Self { client })
    }

    /// One health request to a container's published port.
    pub async fn probe(&self, port: u16, health: &HealthConfig) -> Probe {
        let url = format!("http://127.0.0.1:{port}{}", health.path);
        let mut request = self
            .client
            .get(&url)
            .header(HOST, &health.host)
            .timeout(REQUEST_TIMEOUT);
        for (name, value) in &health.headers {
            request = request.header(name, value);
        }
        let started = Instant::now();
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Probe::from_error(&e),
        };
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let status = response.status().as_u16();
        let location = header(LOCATION);
        let content_type = header(CONTENT_TYPE);
        let quotable = content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("text/plain") || t.contains("json"));
        let mut body = Vec::new();
        while quotable && body.len() < EXCERPT_READ {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Probe::Timeout,
                Err(_) => break,
            }
        }
        body.truncate(EXCERPT_READ);
        let excerpt = excerpt(&String::from_utf8_lossy(&body));
        Probe::Answer(Answer {
            status,
            location,
            content_type,
            excerpt,
            elapsed: started.elapsed(),
        })
    }
}

impl Probe {
    fn from_error(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            return Self::Timeout;
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(cause) = source {
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind::*;
                match io.kind() {
                    ConnectionRefused => return Self::Refused,
                    ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => {
                        return Self::Reset;
                    }
                    _ => {}
                }
            }
            if let Some(hyper) = cause.downcast_ref::<hyper::Error>()
                && (hyper.is_incomplete_message() || hyper.is_closed())
            {
                return Self::Reset;
            }
            source = cause.source();
        }
        // The causes only: the error itself names the URL, whose query may
        // hold a credential.
        let mut words = Vec::new();
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            words.push(c.to_string());
            cause = c.source();
        }
        if words.is_empty() {
            words.push("no answer".to_owned());
        }
        Self::Failed(words.join(": "))
    }

    /// The answer, if it passed the check.
    pub fn healthy(self, health: &HealthConfig) -> Result<Answer, Probe> {
        match self {
            Self::Answer(answer) if health.accepts(answer.status) => Ok(answer),
            other => Err(other),
        }
    }

    /// What to do about an answer that keeps failing, if anything is known.
    fn hint(&self) -> Option<&'static str> {
        let Self::Answer(answer) = self else {
            return None;
        };
        let to_https = answer
            .location
            .as_deref()
            .is_some_and(|l| l.starts_with("https://"));
        if (300..400).contains(&answer.status) && to_https {
            Some(
                "the app redirects plain HTTP to HTTPS (Django: SECURE_SSL_REDIRECT); send the header \
                 the TLS proxy in front sets: health.headers = { \"X-Forwarded-Proto\" = \"https\" }, \
                 with SECURE_PROXY_SSL_HEADER in the app's settings",
            )
        } else if (300..400).contains(&answer.status) {
            Some(
                "redirects are never followed: point health.path at the page itself (Django: mind the trailing slash)",
            )
        } else if answer.status == 400 {
            Some(
                "Django answers 400 to a Host it does not allow: health.host must be in ALLOWED_HOSTS",
            )
        } else {
            None
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Answer(answer) => answer.fmt(f),
            Self::Refused => f.write_str("connection refused"),
            Self::Reset => f.write_str("connection reset before an answer"),
            Self::Timeout => write!(f, "no answer within {} s", REQUEST_TIMEOUT.as_secs()),
            Self::Failed(why) => write!(f, "request failed: {why}"),
        }
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if let Some(location) = &self.location {
            write!(f, " Location: {location}")?;
        }
        if let Some(content_type) = &self.content_type {
            write!(f, " ({content_type})")?;
        }
        if let Some(excerpt) = &self.excerpt {
            write!(f, " {excerpt}")?;
        }
        write!(f, " in {} ms", self.elapsed.as_millis())
    }
}

/// A body's start on one line, if there is any.
fn excerpt(body: &str) -> Option<String> {
    let line = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        return None;
    }
    let mut cut: String = line.chars().take(EXCERPT_CHARS).collect();
    if cut.len() < line.len() {
        cut.push('…');
    }
    Some(cut)
}

/// The request a health check sends, for the log: path, Host and the extra
/// headers. Only the values of headers proxies forward are shown, and no
/// query string: either may carry a credential.
pub(crate) fn describe_request(health: &HealthConfig) -> String {
    let path = match health.path.split_once('?') {
        Some((path, _)) => format!("{path}?[query not shown]"),
        None => health.path.clone(),
    };
    let mut line = format!("GET {path} (Host: {}", health.host);
    for (name, value) in &health.headers {
        let shown = SHOWN_HEADERS.contains(&name.to_ascii_lowercase().as_str());
        let value = if shown { value.as_str() } else { "[not shown]" };
        line.push_str(&format!(", {name}: {value}"));
    }
    line.push(')');
    line
}

impl Ctx {
    /// Waits until the container's answer on the health path is one of the
    /// accepted statuses; fails at once if it exits or restarts.
    pub(crate) async fn wait_healthy(
        &self,
        id: &str,
        port: u16,
        health: &HealthConfig,
    ) -> Result<Healthy, Failure> {
        let started = Instant::now();
        let deadline = started + health.timeout;
        let mut delay = FIRST_POLL;
        let mut checks = 0;
        loop {
            self.ensure_alive(id).await?;
            checks += 1;
            let last = match self.health.probe(port, health).await.healthy(health) {
                Ok(answer) => {
                    self.view.observed.set_health(id, "healthy".to_owned());
                    return Ok(Healthy {
                        answer,
                        checks,
                        after: started.elapsed(),
                    });
                }
                Err(probe) => probe,
            };
            if Instant::now() >= deadline {
                let mut why = format!(
                    "not healthy within {} s: {} answered {last} (the last of {checks} checks)",
                    health.timeout.as_secs(),
                    describe_request(health),
                );
                if let Some(hint) = last.hint() {
                    why.push_str(&format!("; {hint}"));
                }
                return Err(Failure(why));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_POLL);
        }
    }

    /// Waits until the container has run for `min_healthy` without dying, or
    /// is Docker-healthy if its image has a HEALTHCHECK.
    pub(crate) async fn wait_up(&self, id: &str, min_healthy: Duration) -> Result<(), Failure> {
        let started = Instant::now();
        let mut delay = FIRST_POLL;
        loop {
            let health = self.ensure_alive(id).await?;
            match health.as_deref() {
                Some("healthy") => return Ok(()),
                Some("unhealthy") => {
                    return Err(Failure("its HEALTHCHECK reports unhealthy".into()));
                }
                // A HEALTHCHECK decides; without one, time alive does. Docker
                // gives up on a check after its own retries, so no deadline here.
                Some(_) => {}
                None if started.elapsed() >= min_healthy => return Ok(()),
                None => {}
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_POLL);
        }
    }

    /// Fails if the container exited or was restarted; returns its health.
    pub(crate) async fn ensure_alive(&self, id: &str) -> Result<Option<String>, Failure> {
        match self.docker.state(id).await? {
            ContainerState::Running {
                health,
                restarts: 0,
            } => Ok(health),
            ContainerState::Running { restarts, .. } => Err(Failure(format!(
                "it exited and was restarted {restarts} time(s){}",
                self.last_words(id).await
            ))),
            ContainerState::Exited { exit_code } => Err(Failure(format!(
                "it exited with {exit_code}{}",
                self.last_words(id).await
            ))),
        }
    }

    /// The end of a container's output, to say why it died.
    async fn last_words(&self, id: &str) -> String {
        match self.docker.tail_logs(id, LOG_LINES).await {
            Ok(lines) if !lines.is_empty() => format!(": {}", lines.join(" | ")),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(headers: &[(&str, &str)]) -> HealthConfig {
        HealthConfig {
            path: "/healthz/".into(),
            host: "shop.example".into(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            expect: vec![200],
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn an_answer_says_its_status_location_and_time() {
        let answer = Answer {
            status: 301,
            location: Some("https://shop.example/healthz/".into()),
            content_type: Some("text/html; charset=utf-8".into()),
            excerpt: None,
            elapsed: Duration::from_millis(7),
        };
        assert_eq!(
            answer.to_string(),
            "HTTP 301 Location: https://shop.example/healthz/ (text/html; charset=utf-8) in 7 ms"
        );
        let probe = Probe::Answer(answer);
        assert!(probe.hint().unwrap().contains("X-Forwarded-Proto"));
        assert!(probe.clone().healthy(&health(&[])).is_err());
    }

    #[test]
    fn long_bodies_are_cut_on_one_line() {
        assert_eq!(
            excerpt(" {\"db\":\n \"ok\"} ").as_deref(),
            Some("{\"db\": \"ok\"}")
        );
        assert_eq!(excerpt("  \n"), None);
        let long = "é".repeat(EXCERPT_CHARS + 10);
        assert_eq!(excerpt(&long).unwrap().chars().count(), EXCERPT_CHARS + 1);
    }

    #[test]
    fn the_logged_request_leaves_credentials_out() {
        let mut check = health(&[
            ("X-Forwarded-Proto", "https"),
            ("Authorization", "Bearer s3cret"),
            ("X-Health-Password", "s3cret"),
        ]);
        assert!(!format!("{check:?}").contains("s3cret"));
        check.path = "/healthz/?key=s3cret".into();
        let line = describe_request(&check);
        assert_eq!(
            line,
            "GET /healthz/?[query not shown] (Host: shop.example, Authorization: [not shown], X-Forwarded-Proto: https, X-Health-Password: [not shown])"
        );
    }
}
