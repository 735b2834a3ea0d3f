//! `deployctl keygen`.

use clap::Args;

use crate::exit::{CliError, Exit};
use crate::settings::Global;

/// Make an operator key: an Ed25519 key pair that deployctl signs a short
/// token with for every request, so no host-issued token is needed. Prints
/// the entry that makes a host trust it.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  deployctl keygen --name alice\n  \
    deployctl keygen --key ~/.config/deployctl/ci_ed25519 --name ci-bot\n\n\
    The key goes to --key (default: $XDG_CONFIG_HOME/deployctl/id_ed25519, 0600), its public\n\
    half beside it (.pub). A key already in your ssh-agent needs no keygen: list its\n\
    public key (ssh-add -L) on the host and pass --ssh-agent.")]
pub struct Keygen {
    /// Operator name: the key's comment, and the name the host lists it
    /// under. Default: $USER.
    #[arg(long)]
    name: Option<String>,
    /// Replace an existing key (the hosts must then trust the new one).
    #[arg(long)]
    force: bool,
}

impl Keygen {
    pub fn run(self, global: &Global, json: bool) -> Result<Exit, CliError> {
        let name = self
            .name
            .or_else(|| std::env::var("USER").ok())
            .filter(|n| deployd_proto::is_plain_name(n))
            .ok_or_else(|| {
                CliError::usage("no usable operator name")
                    .hint("pass --name: 1-32 of a-z, 0-9 and -, starting with a letter")
            })?;
        // Where later commands look for it: --key, DEPLOYCTL_KEY, else the
        // default file.
        let named = global.key.clone().or_else(|| {
            std::env::var_os("DEPLOYCTL_KEY")
                .filter(|k| !k.is_empty())
                .map(std::path::PathBuf::from)
        });
        let path = match named {
            Some(path) => path,
            None => crate::operator::default_key_path().ok_or_else(|| {
                CliError::usage("no home directory to keep the key in").hint("pass --key PATH")
            })?,
        };
        let public = crate::operator::keygen(&path, &name, self.force)?;
        let fingerprint = public.fingerprint(ssh_key::HashAlg::Sha256).to_string();
        let key = public
            .to_openssh()
            .map_err(|e| CliError::new(Exit::Other, format!("cannot encode the key: {e}")))?;
        let out = if json {
            serde_json::json!({
                "path": path,
                "name": name,
                "public_key": key,
                "fingerprint": fingerprint,
            })
            .to_string()
        } else {
            format!(
                "wrote {} ({fingerprint})\n\
                 To trust it, add this to each host's deployd.toml, then reload deployd\n\
                 (systemctl reload deployd); narrow scopes and apps as you see fit:\n\n\
                 [[auth.operators]]\n\
                 name = \"{name}\"\n\
                 key = \"{key}\"\n\
                 scopes = [\"read\", \"deploy\", \"rollback\"]\n\
                 apps = [\"*\"]",
                path.display()
            )
        };
        println!("{out}");
        Ok(Exit::Success)
    }
}
