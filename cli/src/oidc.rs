//! Keyless CI: the job's own OIDC token, so the job stores no deploy secret.
//!
//! - GitHub Actions (`permissions: id-token: write`): GET
//!   `$ACTIONS_ID_TOKEN_REQUEST_URL&audience=<aud>` with
//!   `Authorization: bearer $ACTIONS_ID_TOKEN_REQUEST_TOKEN`; the answer is
//!   `{"value": "<jwt>"}`.
//! - GitLab CI: `id_tokens: { DEPLOYD_ID_TOKEN: { aud: <aud> } }` puts the
//!   token in a variable; `--oidc-variable` names it.

use serde::Deserialize;

use crate::exit::{CliError, Exit};
use crate::settings::{Oidc, Settings};

/// GitLab's variable when none is named.
pub const DEFAULT_GITLAB_VARIABLE: &str = "DEPLOYD_ID_TOKEN";

#[derive(Deserialize)]
struct GithubAnswer {
    value: String,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Fetches (GitHub) or reads (GitLab) the job's token.
pub async fn job_token(kind: Oidc, settings: &Settings) -> Result<String, CliError> {
    match kind {
        Oidc::Github => github(settings).await,
        Oidc::Gitlab => {
            let name = settings
                .oidc_variable
                .as_deref()
                .unwrap_or(DEFAULT_GITLAB_VARIABLE);
            env(name).ok_or_else(|| {
                CliError::new(Exit::Auth, format!("no GitLab ID token in ${name}")).hint(format!(
                    "declare it in the job: id_tokens: {{ {name}: {{ aud: <the agent's audience> }} }}"
                ))
            })
        }
    }
}

async fn github(settings: &Settings) -> Result<String, CliError> {
    let missing = || {
        CliError::new(
            Exit::Auth,
            "ACTIONS_ID_TOKEN_REQUEST_URL/_TOKEN are not set: no GitHub OIDC token to fetch",
        )
        .hint("give the job `permissions: id-token: write`")
    };
    let url = env("ACTIONS_ID_TOKEN_REQUEST_URL").ok_or_else(missing)?;
    let bearer = env("ACTIONS_ID_TOKEN_REQUEST_TOKEN").ok_or_else(missing)?;
    let audience = settings.oidc_audience.as_deref().ok_or_else(|| {
        CliError::usage("--oidc github needs an audience").hint(
            "set --oidc-audience or DEPLOYCTL_OIDC_AUDIENCE to the audience of the agent's rule",
        )
    })?;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .map_err(|e| CliError::new(Exit::Other, format!("HTTP client: {e}")))?;
    let mut url = reqwest::Url::parse(&url)
        .map_err(|_| CliError::new(Exit::Auth, "ACTIONS_ID_TOKEN_REQUEST_URL is not a URL"))?;
    url.query_pairs_mut().append_pair("audience", audience);
    let answer = client
        .get(url)
        .header("Authorization", format!("bearer {bearer}"))
        .send()
        .await
        .map_err(|e| {
            CliError::new(
                Exit::Auth,
                format!("cannot reach GitHub's token endpoint: {e}"),
            )
        })?;
    if !answer.status().is_success() {
        return Err(CliError::new(
            Exit::Auth,
            format!("GitHub's token endpoint answered HTTP {}", answer.status()),
        ));
    }
    let answer: GithubAnswer = answer.json().await.map_err(|_| {
        CliError::new(
            Exit::Auth,
            "GitHub's token endpoint did not answer {\"value\": ...}",
        )
    })?;
    Ok(answer.value)
}
