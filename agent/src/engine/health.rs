//! Is a new container up? HTTP health for web, staying alive for the rest.
//!
//! Polling starts at 50 ms and backs off to 1 s: a container that is ready
//! fast is seen fast, and a slow one is not hammered. There is no fixed sleep.

use std::time::{Duration, Instant};

use reqwest::header::HOST;

use super::Ctx;
use super::run::Failure;
use crate::config::HealthConfig;
use crate::docker::ContainerState;

const FIRST_POLL: Duration = Duration::from_millis(50);
const MAX_POLL: Duration = Duration::from_secs(1);
/// One health request may take this long (a booting app accepts
/// connections before it answers).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Lines of a dead container's output quoted in the failure.
const LOG_LINES: usize = 5;

impl Ctx {
    /// Waits until the container answers 200 on the health path, fails at
    /// once if it exits or restarts.
    pub(crate) async fn wait_healthy(
        &self,
        id: &str,
        port: u16,
        health: &HealthConfig,
    ) -> Result<(), Failure> {
        let deadline = Instant::now() + health.timeout;
        let mut delay = FIRST_POLL;
        loop {
            self.ensure_alive(id).await?;
            let last = match self.probe(port, health).await {
                Ok(()) => {
                    self.observed.set_health(id, "healthy".to_owned());
                    return Ok(());
                }
                Err(answer) => answer,
            };
            if Instant::now() >= deadline {
                return Err(Failure(format!(
                    "not healthy within {} s (last answer to {}: {last})",
                    health.timeout.as_secs(),
                    health.path
                )));
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

    /// One health request; `Err` describes the answer.
    pub(crate) async fn probe(&self, port: u16, health: &HealthConfig) -> Result<(), String> {
        let url = format!("http://127.0.0.1:{port}{}", health.path);
        match self
            .http
            .get(&url)
            .header(HOST, &health.host)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
        {
            Ok(r) if r.status() == reqwest::StatusCode::OK => Ok(()),
            Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
            Err(e) if e.is_timeout() => Err("no answer within 2 s".into()),
            Err(e) if e.is_connect() => Err("connection refused".into()),
            Err(_) => Err("connection failed".into()),
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
