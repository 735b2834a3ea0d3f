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

/// Connection and identity flags every command takes. Its `Debug` leaves
/// the token out.
#[derive(Clone, Args)]
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

/// Everything resolved. Its `Debug` leaves the token out.
#[derive(Clone)]
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

impl std::fmt::Debug for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Global")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("context", &self.context)
            .field("oidc", &self.oidc)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("ca_cert", &self.ca_cert)
            .field("pin_sha256", &self.pin_sha256)
            .field("app", &self.app)
            .field("oidc", &self.oidc)
            .finish_non_exhaustive()
    }
}

fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("deployctl/config.toml"))
}

impl Global {
    /// Flags and environment first, then the context. The token source
    /// and the trust source are each taken whole from one layer: a token
    /// given on the command line or in the environment is not mixed with a
    /// context's OIDC setting, a CA given there not with a context's pin.
    /// Within a layer, `--oidc` beats `--token` beats `--token-file`, and
    /// a pin beats a CA. Empty values count as absent.
    pub fn resolve(&self) -> Result<Settings, CliError> {
        let context = self.context_from_file()?;
        let given = |v: &Option<String>| v.clone().filter(|v| !v.trim().is_empty());
        let given_path = |v: &Option<PathBuf>| v.clone().filter(|p| !p.as_os_str().is_empty());
        let url = given(&self.url).or(context.url).ok_or_else(|| {
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
        let (token, token_file, oidc) = {
            let flags = (given(&self.token), given_path(&self.token_file), self.oidc);
            if flags.0.is_some() || flags.1.is_some() || flags.2.is_some() {
                flags
            } else {
                (None, context.token_file, context.oidc)
            }
        };
        let (ca_cert, pin_sha256) = {
            let flags = (given_path(&self.ca_cert), given(&self.pin_sha256));
            if flags.0.is_some() || flags.1.is_some() {
                flags
            } else {
                (context.ca_cert, context.pin_sha256)
            }
        };
        Ok(Settings {
            url,
            token,
            token_file,
            ca_cert,
            pin_sha256,
            app: given(&self.app).or(context.app),
            oidc,
            oidc_audience: given(&self.oidc_audience).or(context.oidc_audience),
            oidc_variable: given(&self.oidc_variable).or(context.oidc_variable),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn global(args: &[&str]) -> Global {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            global: Global,
        }
        let mut all = vec!["deployctl"];
        all.extend_from_slice(args);
        <Cli as clap::Parser>::try_parse_from(all).unwrap().global
    }

    #[test]
    fn token_and_trust_come_whole_from_one_layer() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            "[contexts.prod]\nurl = \"https://prod:8443\"\noidc = \"github\"\n\
             pin_sha256 = \"AA\"\napp = \"shop\"\n",
        )
        .unwrap();
        let config = config.to_str().unwrap();
        // A token and a CA on the command line replace the context's OIDC
        // and pin; the rest of the context still applies.
        let s = global(&[
            "--config",
            config,
            "--context",
            "prod",
            "--token",
            "t",
            "--ca-cert",
            "/ca.pem",
        ])
        .resolve()
        .unwrap();
        assert_eq!((s.token.as_deref(), s.oidc), (Some("t"), None));
        assert_eq!((s.ca_cert.is_some(), s.pin_sha256), (true, None));
        assert_eq!(
            (s.url.as_str(), s.app.as_deref()),
            ("https://prod:8443", Some("shop"))
        );
        // Empty values count as absent: the context's settings stand.
        let s = global(&["--config", config, "--context", "prod", "--token", " "])
            .resolve()
            .unwrap();
        assert_eq!((s.token, s.oidc), (None, Some(Oidc::Github)));
        assert!(global(&["--url", "http://plain:80"]).resolve().is_err());
        let shown = format!(
            "{:?}",
            global(&["--url", "https://a:1", "--token", "secret-t"])
                .resolve()
                .unwrap()
        );
        assert!(!shown.contains("secret-t"), "{shown}");
    }
}
