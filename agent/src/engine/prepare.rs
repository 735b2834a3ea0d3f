//! Preparing a release ahead of its deployment: pull it and pin its digest,
//! changing nothing that runs. A fleet prepares every host at once and
//! deploys only when they all resolved the tag to the same digest.
//!
//! A pull can outlast an API request, so a prepare runs as a task of its
//! own and is asked again until it ends. Each app keeps its latest prepare
//! only, and pulls one at a time: asking for another sha while one pulls
//! is refused (409), once it has ended starts over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deployd_proto::{CommitSha, PrepareState, Prepared};

use super::common::Failure;
use super::{Ctx, EngineError, EngineHandle};
use crate::config::AppConfig;
use crate::docker::{ImageRef, PulledImage, RegistryAuth};

/// Each app's latest prepare.
#[derive(Debug, Default)]
pub(super) struct Prepares(Mutex<HashMap<String, Prepared>>);

impl Prepares {
    fn get(&self) -> std::sync::MutexGuard<'_, HashMap<String, Prepared>> {
        crate::sync::lock(&self.0)
    }

    /// Forgets the app's prepare of `sha` (its image was pruned): asked
    /// again, it pulls again.
    pub(super) fn forget(&self, app: &str, sha: &str) {
        let mut prepares = self.get();
        if prepares.get(app).is_some_and(|p| p.sha.as_str() == sha) {
            prepares.remove(app);
        }
    }
}

/// How long one ask waits for a pull to end before answering `pulling`:
/// well inside the API's request timeout.
const ASK_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

impl EngineHandle {
    /// Like [`EngineHandle::prepare`], but waits up to 15 s for the pull to
    /// end, so a caller asks a few times, not hundreds.
    pub async fn prepare_waiting(
        &self,
        app: &str,
        sha: &CommitSha,
    ) -> Result<Prepared, EngineError> {
        let deadline = tokio::time::Instant::now() + ASK_WAIT;
        let mut prepared = self.prepare(app, sha)?;
        while prepared.state == PrepareState::Pulling && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            // The guard is dropped here: `prepare` takes the lock again.
            let latest = self.ctx.jobs.prepares.get().get(app).cloned();
            prepared = match latest {
                Some(p) if p.sha == *sha => p,
                // Replaced by a prepare of another sha (once ours ended),
                // or forgotten (its image was pruned).
                _ => self.prepare(app, sha)?,
            };
        }
        Ok(prepared)
    }

    /// Where the prepare of `sha` stands, starting it if the app's latest
    /// prepare is of another sha or failed.
    pub fn prepare(&self, app: &str, sha: &CommitSha) -> Result<Prepared, EngineError> {
        let cfg = self
            .apps
            .get(app)
            .cloned()
            .ok_or_else(|| EngineError::UnknownApp(app.to_owned()))?;
        let mut prepares = self.ctx.jobs.prepares.get();
        if let Some(known) = prepares.get(app) {
            if known.sha == *sha && known.state != PrepareState::Failed {
                return Ok(known.clone());
            }
            // One pull at a time per app, whoever asks.
            if known.state == PrepareState::Pulling {
                return Err(EngineError::Preparing {
                    app: app.to_owned(),
                    sha: known.sha.clone(),
                });
            }
        }
        let pulling = Prepared {
            sha: sha.clone(),
            state: PrepareState::Pulling,
            digest: None,
            error: None,
        };
        prepares.insert(app.to_owned(), pulling.clone());
        drop(prepares);
        let ctx = Arc::clone(&self.ctx);
        let (app, sha) = (app.to_owned(), sha.clone());
        tokio::spawn(async move {
            let ended = match ctx.pull_recorded(&app, &cfg, &sha).await {
                Ok(image) => Prepared {
                    sha: sha.clone(),
                    state: PrepareState::Ready,
                    digest: Some(image.digest),
                    error: None,
                },
                Err(Failure(error)) => Prepared {
                    sha: sha.clone(),
                    state: PrepareState::Failed,
                    digest: None,
                    error: Some(error),
                },
            };
            tracing::info!(%app, %sha, state = ?ended.state, "prepare ended");
            let mut prepares = ctx.jobs.prepares.get();
            // A newer prepare of another sha replaced this one: keep it.
            if prepares.get(&app).is_some_and(|p| p.sha == sha) {
                prepares.insert(app, ended);
            }
        });
        Ok(pulling)
    }
}

/// The app's registry credentials, read from their file on every use (a
/// rotated password needs no restart). Errors name the file, never its
/// content.
pub(crate) fn registry_auth(cfg: &AppConfig) -> Result<Option<RegistryAuth>, Failure> {
    Ok(match &cfg.registry_auth_file {
        Some(path) => Some(RegistryAuth::from_file(path)?),
        None => None,
    })
}

impl Ctx {
    /// Pulls release `sha` of the app ahead of a deployment (a prepare, a
    /// plan) and records the pull, so that an image no deployment ends up
    /// using is pruned with the app's other unused images.
    pub(crate) async fn pull_recorded(
        &self,
        app: &str,
        cfg: &AppConfig,
        sha: &CommitSha,
    ) -> Result<PulledImage, Failure> {
        let auth = registry_auth(cfg)?;
        let image = ImageRef::new(cfg.image.clone(), sha.clone());
        let image = self.docker.pull(&image, auth.as_ref()).await?;
        self.store
            .prepared(app, sha.as_str(), &image.digest)
            .map_err(|e| Failure(format!("cannot record the pull: {e}")))?;
        Ok(image)
    }
}
