//! Where the agent is and how to prove who we are: flags, then
//! environment variables, then a named context of the config file, then
//! defaults. Each setting is taken from the first layer that has it; the
//! token source (token, token file, OIDC) and the trust source (CA, pin)
//! are each taken whole from one layer, so an explicit `--token-file` is
//! never overridden by a `DEPLOYCTL_TOKEN` left in the environment.
//!
//! ```toml
//! # ~/.config/deployctl/config.toml
//! default_context = "staging"
//! [contexts.production]
//! url = "https://deploy-1.example.com:8443"
//! ca_cert = "/etc/deployctl/production-ca.pem"
//! token_file = "/run/secrets/deployd-token"
//! app = "shop"
//! [contexts.ops]
//! url = "https://deploy-1.example.com:8443"
//! ssh_agent = true        # or key = "~/.config/deployctl/id_ed25519"
//! operator = "alice"
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
    // The token and trust flags read their environment variables in
    // `resolve`, not through clap: clap would merge a flag and another
    // flag's variable into one layer.
    /// Bearer token (prefer a token file: flags show in `ps`). Environment:
    /// DEPLOYCTL_TOKEN.
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// File holding the bearer token. Environment: DEPLOYCTL_TOKEN_FILE.
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle trusted besides the system roots (deployd init's
    /// cert.pem). Environment: DEPLOYCTL_CA_CERT.
    #[arg(long, global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Trust exactly the agent certificate with this SHA-256 fingerprint.
    /// Environment: DEPLOYCTL_PIN_SHA256.
    #[arg(long, global = true)]
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
    /// (an `id_tokens` variable). Environment: DEPLOYCTL_OIDC.
    #[arg(long, global = true)]
    pub oidc: Option<Oidc>,
    /// Audience to ask GitHub for (must match the agent's rule).
    #[arg(long, env = "DEPLOYCTL_OIDC_AUDIENCE", global = true)]
    pub oidc_audience: Option<String>,
    /// GitLab: the variable `id_tokens` put the token in.
    #[arg(long, env = "DEPLOYCTL_OIDC_VARIABLE", global = true)]
    pub oidc_variable: Option<String>,
    /// Sign a token for each request with this operator key (from
    /// `deployctl keygen`; default: its file, if there is one). With
    /// --ssh-agent: the public key (or its .pub) naming which agent key to
    /// use. Environment: DEPLOYCTL_KEY.
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
    /// Sign with an Ed25519 key held by the running ssh-agent
    /// (SSH_AUTH_SOCK). Environment: DEPLOYCTL_SSH_AGENT=1.
    #[arg(long, global = true)]
    pub ssh_agent: bool,
    /// Operator name the host lists the key under. Default: $USER.
    #[arg(long, env = "DEPLOYCTL_OPERATOR", global = true)]
    pub operator: Option<String>,
    /// The host an operator token is for: a name (or IP address) its TLS
    /// certificate holds. Default: the URL's host.
    #[arg(long, env = "DEPLOYCTL_AUDIENCE", global = true)]
    pub audience: Option<String>,
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
    key: Option<PathBuf>,
    ssh_agent: Option<bool>,
    operator: Option<String>,
    audience: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    default_context: Option<String>,
    #[serde(default)]
    contexts: BTreeMap<String, Context>,
    /// `[fleets.NAME]`: see `fleet`.
    #[serde(default)]
    fleets: crate::fleet::Fleets,
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
    /// The operator key: a private key file, or with `ssh_agent` the public
    /// key choosing one of the agent's.
    pub key: Option<PathBuf>,
    pub ssh_agent: bool,
    pub operator: Option<String>,
    pub audience: Option<String>,
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
            .field("key", &self.key)
            .field("ssh_agent", &self.ssh_agent)
            .field("operator", &self.operator)
            .finish_non_exhaustive()
    }
}

/// deployctl's own directory: $XDG_CONFIG_HOME/deployctl, or
/// ~/.config/deployctl.
pub fn config_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("deployctl"))
}

fn default_config_path() -> Option<PathBuf> {
    Some(config_dir()?.join("config.toml"))
}

/// Where the token comes from, as one layer gives it.
#[derive(Debug, Default, PartialEq)]
struct TokenSource {
    token: Option<String>,
    token_file: Option<PathBuf>,
    oidc: Option<Oidc>,
    key: Option<PathBuf>,
    ssh_agent: bool,
}

impl TokenSource {
    fn is_set(&self) -> bool {
        self.token.is_some()
            || self.token_file.is_some()
            || self.oidc.is_some()
            || self.key.is_some()
            || self.ssh_agent
    }
}

/// A yes/no environment variable: 1, true or yes (any case) is yes.
fn yes(v: Option<String>) -> Result<bool, CliError> {
    match given(v) {
        None => Ok(false),
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" => Ok(true),
            "0" | "false" | "no" => Ok(false),
            _ => Err(CliError::usage(format!(
                "DEPLOYCTL_SSH_AGENT is {v}: it takes 1 or 0"
            ))),
        },
    }
}

/// How the agent's certificate is trusted, as one layer gives it.
#[derive(Debug, Default, PartialEq)]
struct TrustSource {
    ca_cert: Option<PathBuf>,
    pin_sha256: Option<String>,
}

/// A value as given: empty counts as absent.
fn given(v: Option<String>) -> Option<String> {
    v.filter(|v| !v.trim().is_empty())
}

fn given_path(v: Option<PathBuf>) -> Option<PathBuf> {
    v.filter(|p| !p.as_os_str().is_empty())
}

impl Global {
    /// Resolves every setting from the flags, this process's environment
    /// and the config file.
    pub fn resolve(&self) -> Result<Settings, CliError> {
        self.resolve_with(&|name| std::env::var(name).ok())
    }

    /// Flags, then the environment (`env` looks a variable up), then the
    /// context, then defaults. The token source and the trust source are
    /// each taken whole from the first layer that sets any part of them:
    /// a token file on the command line is not mixed with a token in the
    /// environment, nor a CA given there with a context's pin. Within a
    /// layer, OIDC beats a token beats a token file, and a pin beats a CA.
    /// Empty values count as absent.
    fn resolve_with(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, CliError> {
        let context = self.context_from_file()?;
        let url = given(self.url.clone()).or(context.url).ok_or_else(|| {
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
        let mut tokens = [
            TokenSource {
                token: given(self.token.clone()),
                token_file: given_path(self.token_file.clone()),
                oidc: self.oidc,
                key: given_path(self.key.clone()),
                ssh_agent: self.ssh_agent,
            },
            TokenSource {
                token: given(env("DEPLOYCTL_TOKEN")),
                token_file: given_path(env("DEPLOYCTL_TOKEN_FILE").map(PathBuf::from)),
                oidc: None,
                key: given_path(env("DEPLOYCTL_KEY").map(PathBuf::from)),
                ssh_agent: yes(env("DEPLOYCTL_SSH_AGENT"))?,
            },
            TokenSource {
                token: None,
                token_file: given_path(context.token_file),
                oidc: context.oidc,
                key: given_path(context.key),
                ssh_agent: context.ssh_agent.unwrap_or(false),
            },
        ];
        // DEPLOYCTL_OIDC is read only when the environment may be the layer
        // the token comes from: flags beat it, whatever it says.
        if let (false, Some(name)) = (tokens[0].is_set(), given(env("DEPLOYCTL_OIDC"))) {
            tokens[1].oidc = Some(
                <Oidc as clap::ValueEnum>::from_str(name.trim(), true).map_err(|_| {
                    CliError::usage(format!(
                        "DEPLOYCTL_OIDC is {name}: it takes github or gitlab"
                    ))
                })?,
            );
        }
        // Nothing set anywhere: the key `deployctl keygen` wrote, if any.
        let token = tokens
            .into_iter()
            .find(TokenSource::is_set)
            .unwrap_or_else(|| TokenSource {
                key: crate::operator::default_key_path().filter(|p| p.exists()),
                ..TokenSource::default()
            });
        let trusts = [
            TrustSource {
                ca_cert: given_path(self.ca_cert.clone()),
                pin_sha256: given(self.pin_sha256.clone()),
            },
            TrustSource {
                ca_cert: given_path(env("DEPLOYCTL_CA_CERT").map(PathBuf::from)),
                pin_sha256: given(env("DEPLOYCTL_PIN_SHA256")),
            },
            TrustSource {
                ca_cert: given_path(context.ca_cert),
                pin_sha256: given(context.pin_sha256),
            },
        ];
        let trust = trusts
            .into_iter()
            .find(|t| t.ca_cert.is_some() || t.pin_sha256.is_some())
            .unwrap_or_default();
        Ok(Settings {
            url,
            token: token.token,
            token_file: token.token_file,
            ca_cert: trust.ca_cert,
            pin_sha256: trust.pin_sha256,
            app: given(self.app.clone()).or(context.app),
            oidc: token.oidc,
            oidc_audience: given(self.oidc_audience.clone()).or(context.oidc_audience),
            oidc_variable: given(self.oidc_variable.clone()).or(context.oidc_variable),
            key: token.key,
            ssh_agent: token.ssh_agent,
            operator: given(self.operator.clone()).or(context.operator),
            audience: given(self.audience.clone()).or(context.audience),
        })
    }

    /// The config file, if there is one: where it is and what it says.
    fn config_file(&self) -> Result<Option<(PathBuf, ConfigFile)>, CliError> {
        let (path, explicit) = match &self.config {
            Some(path) => (path.clone(), true),
            None => match default_config_path() {
                Some(path) => (path, false),
                None => return Ok(None),
            },
        };
        if !path.exists() {
            if explicit || self.context.is_some() {
                return Err(CliError::usage(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            return Ok(None);
        }
        let file: ConfigFile = config::Config::builder()
            .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml))
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| CliError::usage(format!("config file {}: {e}", path.display())))?;
        Ok(Some((path, file)))
    }

    /// The fleets of the config file, and the file's path.
    pub fn fleets_from_file(&self) -> Result<Option<(PathBuf, crate::fleet::Fleets)>, CliError> {
        Ok(self.config_file()?.map(|(path, file)| (path, file.fleets)))
    }

    /// These settings for one host of a fleet: its URL, app and trust
    /// stand in for the flags; the token comes from the usual layers.
    pub fn for_host(&self, host: &crate::fleet::Host) -> Self {
        let mut global = self.clone();
        global.url = Some(host.url.clone());
        // An operator token names its host: each host's own URL's.
        global.audience = None;
        global.app = Some(host.app.clone());
        match &host.trust {
            crate::fleet::Trust::System => {}
            crate::fleet::Trust::Ca(path) => {
                global.ca_cert = Some(path.clone());
                global.pin_sha256 = None;
            }
            crate::fleet::Trust::Pin(pin) => {
                global.pin_sha256 = Some(pin.clone());
                global.ca_cert = None;
            }
        }
        global
    }

    fn context_from_file(&self) -> Result<Context, CliError> {
        let Some((path, file)) = self.config_file()? else {
            return Ok(Context::default());
        };
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
    /// Settings with nothing but a URL, for tests to fill in.
    #[cfg(test)]
    pub fn for_tests() -> Self {
        Self {
            url: "https://localhost:1".to_owned(),
            token: None,
            token_file: None,
            ca_cert: None,
            pin_sha256: None,
            app: None,
            oidc: None,
            oidc_audience: None,
            oidc_variable: None,
            key: None,
            ssh_agent: false,
            operator: None,
            audience: None,
        }
    }

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
    fn an_operator_key_is_a_token_source_like_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            "[contexts.ops]\nurl = \"https://prod:8443\"\nssh_agent = true\n\
             operator = \"alice\"\naudience = \"prod\"\n",
        )
        .unwrap();
        let config = config.to_str().unwrap();
        let ops = ["--config", config, "--context", "ops"];
        let s = global(&ops).resolve_with(&|_| None).unwrap();
        assert!(s.ssh_agent);
        assert_eq!(
            (s.operator.as_deref(), s.audience.as_deref()),
            (Some("alice"), Some("prod"))
        );
        // A token in the environment beats the context's agent...
        let env = |name: &str| (name == "DEPLOYCTL_TOKEN").then(|| "t".to_owned());
        let s = global(&ops).resolve_with(&env).unwrap();
        assert_eq!((s.token.as_deref(), s.ssh_agent), (Some("t"), false));
        // ...and a key on the command line beats that token.
        let s = global(&[&ops[..], &["--key", "/k"]].concat())
            .resolve_with(&env)
            .unwrap();
        assert_eq!(
            (s.token, s.key, s.ssh_agent),
            (None, Some("/k".into()), false)
        );
        let env = |name: &str| (name == "DEPLOYCTL_SSH_AGENT").then(|| "perhaps".to_owned());
        assert!(global(&ops).resolve_with(&env).is_err());
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
        .resolve_with(&|_| None)
        .unwrap();
        assert_eq!((s.token.as_deref(), s.oidc), (Some("t"), None));
        assert_eq!((s.ca_cert.is_some(), s.pin_sha256), (true, None));
        assert_eq!(
            (s.url.as_str(), s.app.as_deref()),
            ("https://prod:8443", Some("shop"))
        );
        // Empty values count as absent: the context's settings stand.
        let s = global(&["--config", config, "--context", "prod", "--token", " "])
            .resolve_with(&|_| None)
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

    #[test]
    fn flags_beat_the_environment_beats_the_context_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            "default_context = \"prod\"\n[contexts.prod]\nurl = \"https://context:8443\"\n\
             token_file = \"/context/token\"\nca_cert = \"/context/ca.pem\"\napp = \"shop\"\n",
        )
        .unwrap();
        let config = config.to_str().unwrap().to_owned();
        let environment = [
            ("DEPLOYCTL_TOKEN", "env-token"),
            ("DEPLOYCTL_PIN_SHA256", "EE"),
        ];
        let env = |name: &str| {
            environment
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        };
        let resolve = |args: &[&str], env: &dyn Fn(&str) -> Option<String>| {
            let mut all = vec!["--config", config.as_str()];
            all.extend_from_slice(args);
            global(&all).resolve_with(env).unwrap()
        };
        // Flags first: an explicit token file beats the environment's token
        // (the bug this guards against), an explicit CA its pin.
        let s = resolve(
            &["--token-file", "/flag/token", "--ca-cert", "/flag/ca.pem"],
            &env,
        );
        assert_eq!(
            s.token_file.as_deref(),
            Some(std::path::Path::new("/flag/token"))
        );
        assert_eq!(s.token, None);
        assert_eq!(
            s.ca_cert.as_deref(),
            Some(std::path::Path::new("/flag/ca.pem"))
        );
        assert_eq!(s.pin_sha256, None);
        // Then the environment, over the context.
        let s = resolve(&[], &env);
        assert_eq!(s.token.as_deref(), Some("env-token"));
        assert_eq!(s.token_file, None);
        assert_eq!((s.pin_sha256.as_deref(), s.ca_cert), (Some("EE"), None));
        // Then the context.
        let s = resolve(&[], &|_| None);
        assert_eq!(
            s.token_file.as_deref(),
            Some(std::path::Path::new("/context/token"))
        );
        assert_eq!(
            s.ca_cert.as_deref(),
            Some(std::path::Path::new("/context/ca.pem"))
        );
        assert_eq!(
            (s.url.as_str(), s.app.as_deref()),
            ("https://context:8443", Some("shop"))
        );
        // Then defaults: nothing set anywhere.
        let s = global(&["--url", "https://flag:1"])
            .resolve_with(&|_| None)
            .unwrap();
        assert_eq!(
            (s.token, s.token_file, s.oidc, s.ca_cert),
            (None, None, None, None)
        );
        // A bad DEPLOYCTL_OIDC is a usage error, not ignored.
        let bad = |name: &str| (name == "DEPLOYCTL_OIDC").then(|| "jenkins".to_owned());
        assert!(
            global(&["--url", "https://a:1"])
                .resolve_with(&bad)
                .is_err()
        );
    }
}
