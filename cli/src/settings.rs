//! Where the agent is and how to prove who we are: flags, then
//! environment variables, then a named context of the config file.
//!
//! ```toml
//! # ~/.config/deployctl/config.toml
//! default_context = "staging"
//! [contexts.production]
//! url = "https://deploy-1.example.com:8443"
//! ca_cert = "/etc/deployctl/production-ca.pem"
//! token_file = "/run/secrets/deployd-token"
//! app = "shop"
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use serde::Deserialize;

use crate::exit::CliError;

/// Connection and identity flags every command takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Agent URL, e.g. https://deploy-1.example.com:8443.
    #[arg(long, env = "DEPLOYCTL_URL", global = true)]
    pub url: Option<String>,
    /// Bearer token (prefer DEPLOYCTL_TOKEN_FILE: flags show in `ps`).
    #[arg(long, env = "DEPLOYCTL_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, env = "DEPLOYCTL_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle trusted besides the system roots (deployd init's cert.pem).
    #[arg(long, env = "DEPLOYCTL_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Trust exactly the agent certificate with this SHA-256 fingerprint.
    #[arg(long, env = "DEPLOYCTL_PIN_SHA256", global = true)]
    pub pin_sha256: Option<String>,
    /// App to act on (when the agent runs several).
    #[arg(long, env = "DEPLOYCTL_APP", global = true)]
    pub app: Option<String>,
    /// Named context of the config file.
    #[arg(long, env = "DEPLOYCTL_CONTEXT", global = true)]
    pub context: Option<String>,
    /// Config file. Default: $XDG_CONFIG_HOME/deployctl/config.toml.
    #[arg(long, env = "DEPLOYCTL_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Fetch the CI job's own OIDC token instead of using a stored one:
    /// `github` (Actions, needs `permissions: id-token: write`) or `gitlab`
    /// (an `id_tokens` variable).
    #[arg(long, env = "DEPLOYCTL_OIDC", global = true)]
    pub oidc: Option<Oidc>,
    /// Audience to ask GitHub for (must match the agent's rule).
    #[arg(long, env = "DEPLOYCTL_OIDC_AUDIENCE", global = true)]
    pub oidc_audience: Option<String>,
    /// GitLab: the variable `id_tokens` put the token in.
    #[arg(long, env = "DEPLOYCTL_OIDC_VARIABLE", global = true)]
    pub oidc_variable: Option<String>,
}

/// CI systems whose job tokens deployctl can fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Oidc {
    Github,
    Gitlab,
}

/// One context of the config file; the same names as the flags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Context {
    url: Option<String>,
    token_file: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    pin_sha256: Option<String>,
    app: Option<String>,
    oidc: Option<Oidc>,
    oidc_audience: Option<String>,
    oidc_variable: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    default_context: Option<String>,
    #[serde(default)]
    contexts: BTreeMap<String, Context>,
}

/// Everything resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_cert: Option<PathBuf>,
    pub pin_sha256: Option<String>,
    pub app: Option<String>,
    pub oidc: Option<Oidc>,
    pub oidc_audience: Option<String>,
    pub oidc_variable: Option<String>,
}

fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("deployctl/config.toml"))
}

impl Global {
    /// Flags and environment first, then the context.
    pub fn resolve(&self) -> Result<Settings, CliError> {
        let context = self.context_from_file()?;
        let url = self.url.clone().or(context.url).ok_or_else(|| {
            CliError::usage("no agent URL").hint(
                "set --url or DEPLOYCTL_URL (e.g. https://deploy-1.example.com:8443), or a context",
            )
        })?;
        let url = url.trim_end_matches('/').to_owned();
        if !url.starts_with("https://") {
            return Err(CliError::usage(format!(
                "the agent URL must be https://, got {url}"
            )));
        }
        Ok(Settings {
            url,
            token: self.token.clone(),
            token_file: self.token_file.clone().or(context.token_file),
            ca_cert: self.ca_cert.clone().or(context.ca_cert),
            pin_sha256: self.pin_sha256.clone().or(context.pin_sha256),
            app: self.app.clone().or(context.app),
            oidc: self.oidc.or(context.oidc),
            oidc_audience: self.oidc_audience.clone().or(context.oidc_audience),
            oidc_variable: self.oidc_variable.clone().or(context.oidc_variable),
        })
    }

    fn context_from_file(&self) -> Result<Context, CliError> {
        let (path, explicit) = match &self.config {
            Some(path) => (path.clone(), true),
            None => match default_config_path() {
                Some(path) => (path, false),
                None => return Ok(Context::default()),
            },
        };
        if !path.exists() {
            if explicit || self.context.is_some() {
                return Err(CliError::usage(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            return Ok(Context::default());
        }
        let file: ConfigFile = config::Config::builder()
            .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml))
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| CliError::usage(format!("config file {}: {e}", path.display())))?;
        let Some(name) = self.context.clone().or(file.default_context) else {
            return Ok(Context::default());
        };
        file.contexts.get(&name).cloned().ok_or_else(|| {
            let known: Vec<&str> = file.contexts.keys().map(String::as_str).collect();
            CliError::usage(format!(
                "no context {name} in {} (known: {})",
                path.display(),
                known.join(", ")
            ))
        })
    }
}

impl Settings {
    /// The app to act on: the flag, or the only one there can be.
    pub fn app(&self) -> Result<&str, CliError> {
        self.app.as_deref().ok_or_else(|| {
            CliError::usage("which app?").hint("set --app or DEPLOYCTL_APP, or app in the context")
        })
    }
}
