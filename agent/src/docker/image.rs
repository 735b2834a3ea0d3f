//! Pulling a release image from a private registry and pinning its digest.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::query_parameters::{
    CreateImageOptionsBuilder, ListImagesOptionsBuilder, PushImageOptionsBuilder,
    RemoveImageOptions, TagImageOptionsBuilder,
};
use deployd_proto::CommitSha;
use futures_util::TryStreamExt;
use serde::Deserialize;

use super::{Docker, DockerError, engine_message, status_code, tolerate};

/// `<repository>:<sha>`: a release as CI pushed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Repository including the registry host, e.g. `registry.internal:5000/shop`.
    pub repository: String,
    /// The commit sha the image was built from, used as its tag.
    pub tag: CommitSha,
}

impl ImageRef {
    /// Pairs a repository with the sha that tags the release.
    pub fn new(repository: impl Into<String>, tag: CommitSha) -> Self {
        Self {
            repository: repository.into(),
            tag,
        }
    }

    /// The registry host the repository names, as Docker reads a reference:
    /// its first path component when that looks like a host. `None` for
    /// short names, which Docker resolves against its default public registry.
    pub fn registry(&self) -> Option<&str> {
        registry_of(&self.repository)
    }
}

/// The registry host a repository names: its first path component when
/// that looks like a host (a `.` or `:` in it, or `localhost`).
fn registry_of(repository: &str) -> Option<&str> {
    let (first, _) = repository.split_once('/')?;
    (first.contains(['.', ':']) || first == "localhost").then_some(first)
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.repository, self.tag)
    }
}

/// A pulled release, pinned by content: containers run `pinned`, so a tag
/// moved in the registry later cannot change what a release runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The manifest digest, `sha256:<64 hex>`.
    pub digest: String,
    /// `<repository>@<digest>`, the reference every container is created from.
    pub pinned: String,
}

/// Credentials for one registry, as stored in an app's `registry_auth_file`:
/// `{"username": "...", "password": "..."}`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    /// Registry user name.
    pub username: String,
    /// Password or access token; never printed, logged or returned.
    pub password: String,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why a registry credentials file could not be used. Says where, never what:
/// the file holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum RegistryAuthError {
    /// The file could not be read.
    #[error("cannot read registry credentials {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The file is not `{"username": ..., "password": ...}`.
    #[error(
        "registry credentials {path} are not valid ({kind} at line {line}, column {column}); \
         expected {{\"username\": \"...\", \"password\": \"...\"}}"
    )]
    Format {
        path: String,
        kind: &'static str,
        line: usize,
        column: usize,
    },
}

impl RegistryAuth {
    /// Reads credentials from a JSON file.
    pub fn from_file(path: &Path) -> Result<Self, RegistryAuthError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RegistryAuthError::Read {
            path: display.clone(),
            source,
        })?;
        // serde_json's messages can quote the offending value: keep only
        // the position and the category.
        serde_json::from_str(&text).map_err(|e| RegistryAuthError::Format {
            path: display,
            kind: match e.classify() {
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                    "malformed JSON"
                }
                _ => "wrong fields",
            },
            line: e.line(),
            column: e.column(),
        })
    }

    /// The credentials for a pinned reference (`repo@sha256:...`), for the
    /// nodes of a cluster that pull it.
    pub(super) fn credentials_for(&self, image: &str) -> DockerCredentials {
        let repository = image.split_once('@').map_or(image, |(repo, _)| repo);
        self.credentials_at(registry_of(repository))
    }

    fn credentials(&self, image: &ImageRef) -> DockerCredentials {
        self.credentials_at(image.registry())
    }

    fn credentials_at(&self, host: Option<&str>) -> DockerCredentials {
        DockerCredentials {
            username: Some(self.username.clone()),
            password: Some(self.password.clone()),
            serveraddress: host.map(str::to_owned),
            ..Default::default()
        }
    }
}

impl Docker {
    /// Pulls `image` with `auth` and returns its digest.
    ///
    /// The engine always asks the registry, even when the tag is already
    /// present locally, so bad credentials or a deleted tag fail here.
    pub async fn pull(
        &self,
        image: &ImageRef,
        auth: Option<&RegistryAuth>,
    ) -> Result<PulledImage, DockerError> {
        let reported = self.fetch(image, image.tag.as_str(), auth).await?;
        self.pinned(image, reported).await
    }

    /// Pulls the exact image `digest` of `image`'s repository: what a
    /// rollback runs, whatever the tag points at now.
    pub async fn pull_digest(
        &self,
        image: &ImageRef,
        digest: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<PulledImage, DockerError> {
        self.fetch(image, digest, auth).await?;
        let pinned = format!("{}@{digest}", image.repository);
        self.api
            .inspect_image(&pinned)
            .await
            .map_err(DockerError::engine(format!("inspect {pinned}")))?;
        Ok(PulledImage {
            digest: digest.to_owned(),
            pinned,
        })
    }

    /// Pulls `image.repository` at `reference` (a tag or a digest); returns
    /// the digest the engine reported.
    async fn fetch(
        &self,
        image: &ImageRef,
        reference: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<Option<String>, DockerError> {
        let options = CreateImageOptionsBuilder::default()
            .from_image(&image.repository)
            .tag(reference)
            .build();
        let credentials = auth.map(|a| a.credentials(image));
        tracing::debug!(%image, reference, "pulling");
        let progress = self
            .api
            .create_image(Some(options), None, credentials)
            .try_fold(None, |digest, info| async move {
                // The engine reports the manifest it pulled as "Digest: sha256:...".
                let reported = info
                    .status
                    .as_deref()
                    .and_then(|s| s.strip_prefix("Digest: "))
                    .map(str::to_owned);
                Ok(reported.or(digest))
            });
        match tokio::time::timeout(PULL_TIMEOUT, progress).await {
            Ok(result) => result.map_err(|e| pull_error(image, &e)),
            Err(_) => Err(DockerError::Timeout {
                what: format!("pulling {image}"),
                timeout: PULL_TIMEOUT,
            }),
        }
    }

    /// Pins the pulled image: by the digest the pull reported, checked
    /// against the image's recorded digests, else the one recorded for it.
    async fn pinned(
        &self,
        image: &ImageRef,
        reported: Option<String>,
    ) -> Result<PulledImage, DockerError> {
        let inspect = self
            .api
            .inspect_image(&image.to_string())
            .await
            .map_err(DockerError::engine(format!("inspect {image}")))?;
        let prefix = format!("{}@", image.repository);
        let recorded: Vec<String> = inspect
            .repo_digests
            .unwrap_or_default()
            .into_iter()
            .filter_map(|d| d.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        let digest = match reported {
            Some(d) if recorded.contains(&d) => d,
            _ if recorded.len() == 1 => recorded[0].clone(),
            _ => {
                return Err(DockerError::Pull {
                    image: image.to_string(),
                    reason: "the engine recorded no single registry digest for it".into(),
                });
            }
        };
        Ok(PulledImage {
            pinned: format!("{prefix}{digest}"),
            digest,
        })
    }
}

impl Docker {
    /// Removes one reference (`repo:tag` or `repo@digest`) to an image; the
    /// image goes with its last reference. Returns `false` when a container
    /// still uses it (the engine refuses), `true` when gone or already absent.
    pub async fn remove_image_ref(&self, reference: &str) -> Result<bool, DockerError> {
        let result = self
            .api
            .remove_image(reference, None::<RemoveImageOptions>, None)
            .await;
        match result {
            Err(e) if status_code(&e) == Some(409) => Ok(false),
            other => tolerate(other, 404, format!("remove image {reference}")).map(|()| true),
        }
    }

    /// Every local reference (`repo:tag`, `repo@digest`) into `repository`.
    pub async fn image_refs(&self, repository: &str) -> Result<Vec<String>, DockerError> {
        let filters = HashMap::from([("reference", vec![repository.to_owned()])]);
        let options = ListImagesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let images = self
            .api
            .list_images(Some(options))
            .await
            .map_err(DockerError::engine("list images"))?;
        let prefix_tag = format!("{repository}:");
        let prefix_digest = format!("{repository}@");
        Ok(images
            .into_iter()
            .flat_map(|i| i.repo_tags.into_iter().chain(i.repo_digests))
            .filter(|r| r.starts_with(&prefix_tag) || r.starts_with(&prefix_digest))
            .collect())
    }

    /// Whether an image reference exists locally.
    pub async fn has_image(&self, reference: &str) -> Result<bool, DockerError> {
        match self.api.inspect_image(reference).await {
            Ok(_) => Ok(true),
            Err(e) if status_code(&e) == Some(404) => Ok(false),
            Err(e) => Err(DockerError::engine(format!("inspect {reference}"))(e)),
        }
    }

    /// Tags `source` as `target` and pushes it with `auth`, as CI does.
    pub async fn tag_and_push(
        &self,
        source: &str,
        target: &ImageRef,
        auth: &RegistryAuth,
    ) -> Result<(), DockerError> {
        let tag = TagImageOptionsBuilder::default()
            .repo(&target.repository)
            .tag(target.tag.as_str())
            .build();
        self.api
            .tag_image(source, Some(tag))
            .await
            .map_err(DockerError::engine(format!("tag {source} as {target}")))?;
        let options = PushImageOptionsBuilder::default()
            .tag(target.tag.as_str())
            .build();
        self.api
            .push_image(
                &target.repository,
                Some(options),
                Some(auth.credentials(target)),
            )
            .try_for_each(|_| async { Ok(()) })
            .await
            .map_err(|e| DockerError::Pull {
                image: target.to_string(),
                reason: format!("push failed: {}", engine_message(&e)),
            })
    }
}

/// Longest a pull may take; a stalled registry must not hang a deployment.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Sorts a failed pull into what the user must fix.
fn pull_error(image: &ImageRef, e: &bollard::errors::Error) -> DockerError {
    let image = image.to_string();
    let status = status_code(e);
    let message = engine_message(e);
    classify_pull_failure(image, status, message)
}

fn classify_pull_failure(image: String, status: Option<u16>, message: String) -> DockerError {
    let lower = message.to_lowercase();
    // Auth first: registries that deny access often say so with a 404
    // ("pull access denied ... may require 'docker login'").
    let auth = [
        "unauthorized",
        "authentication required",
        "no basic auth credentials",
        "denied",
    ];
    if auth.iter().any(|needle| lower.contains(needle)) {
        DockerError::Unauthorized { image }
    } else if status == Some(404)
        || lower.contains("manifest unknown")
        || lower.contains("not found")
    {
        DockerError::NotFound { image }
    } else {
        DockerError::Pull {
            image,
            reason: message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(repository: &str) -> ImageRef {
        ImageRef::new(repository, "abc1234".parse().unwrap())
    }

    #[test]
    fn registry_is_the_first_component_when_it_looks_like_a_host() {
        assert_eq!(
            image("127.0.0.1:5000/shop").registry(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(
            image("registry.internal/team/shop").registry(),
            Some("registry.internal")
        );
        assert_eq!(image("localhost/shop").registry(), Some("localhost"));
        assert_eq!(image("team/shop").registry(), None);
        assert_eq!(image("shop").registry(), None);
    }

    // The messages below are the ones Debian's Docker 20.10 engine gives
    // for a Debian docker-registry; the real-engine test covers the same path.
    #[test]
    fn classifies_engine_pull_failures() {
        let classify =
            |status, msg: &str| classify_pull_failure("r/shop:abc1234".into(), status, msg.into());
        assert!(matches!(
            classify(Some(500), "unauthorized: authentication required"),
            DockerError::Unauthorized { .. }
        ));
        assert!(matches!(
            classify(
                Some(500),
                "Head \"http://r/v2/shop/manifests/abc1234\": no basic auth credentials"
            ),
            DockerError::Unauthorized { .. }
        ));
        assert!(matches!(
            classify(
                Some(404),
                "manifest for r/shop:abc1234 not found: manifest unknown"
            ),
            DockerError::NotFound { .. }
        ));
        // What Docker says when a registry such as GitLab's denies access.
        assert!(matches!(
            classify(
                Some(404),
                "pull access denied for r/shop, repository does not exist or may require 'docker login': denied: access forbidden"
            ),
            DockerError::Unauthorized { .. }
        ));
        let other = classify(
            Some(500),
            "Get \"http://r/v2/\": dial tcp: connection refused",
        );
        assert!(matches!(other, DockerError::Pull { .. }));
        assert!(other.to_string().contains("connection refused"));
    }

    #[test]
    fn credentials_never_show_in_debug_or_errors() {
        let dir = std::env::temp_dir().join(format!("deployd-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("registry.json");

        std::fs::write(&path, r#"{"username": "ci", "password": "hunter2-secret"}"#).unwrap();
        let auth = RegistryAuth::from_file(&path).unwrap();
        assert!(!format!("{auth:?}").contains("hunter2"));

        std::fs::write(&path, r#"{"username": "ci", "password": 1234567}"#).unwrap();
        let err = RegistryAuth::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("wrong fields") && !err.contains("1234567"),
            "{err}"
        );

        std::fs::write(&path, r#"{"username": "ci", "password": "hunter2-secret""#).unwrap();
        let err = RegistryAuth::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("malformed JSON") && !err.contains("hunter2"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
