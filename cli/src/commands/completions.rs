//! `deployctl completions <shell>`.

use clap::{Args, CommandFactory};
use clap_complete::Shell;

/// Print a shell completion script.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  deployctl completions bash > /etc/bash_completion.d/deployctl")]
pub struct Completions {
    pub shell: Shell,
}

impl Completions {
    pub fn run(&self) {
        let mut command = crate::Cli::command();
        clap_complete::generate(
            self.shell,
            &mut command,
            "deployctl",
            &mut std::io::stdout(),
        );
    }
}
