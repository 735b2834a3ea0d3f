//! Env files in Docker's `--env-file` format, the way apps keep their secrets.
//!
//! One `KEY=VALUE` per line; blank lines and lines starting with `#` are
//! skipped; the value is everything after the first `=`, quotes included, as
//! Docker reads it. Errors name the line, never its content.
//!
//! [`AppEnv`] layers them with the configuration's `env` tables into what
//! each container of a deployment gets.

use std::collections::HashMap;
use std::path::Path;

use crate::config::{AppConfig, EnvVars};

/// Why an env file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EnvFileError {
    /// The file could not be read.
    #[error("cannot read env file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A line is not `KEY=VALUE` with a valid variable name.
    #[error("env file {path}, line {line}: expected KEY=VALUE with KEY made of A-Z, a-z, 0-9, _")]
    Syntax { path: String, line: usize },
}

/// Reads an env file into `(name, value)` pairs, in file order.
pub fn read(path: &Path) -> Result<Vec<(String, String)>, EnvFileError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| EnvFileError::Read {
        path: display.clone(),
        source,
    })?;
    parse(&text).map_err(|line| EnvFileError::Syntax {
        path: display,
        line,
    })
}

/// Parses env file text; on error returns the 1-based line number.
fn parse(text: &str) -> Result<Vec<(String, String)>, usize> {
    let mut vars = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line.split_once('=').ok_or(index + 1)?;
        let name = name.trim_end();
        if !is_variable_name(name) {
            return Err(index + 1);
        }
        vars.push((name.to_owned(), value.to_owned()));
    }
    Ok(vars)
}

/// `A-Z`, `a-z`, `0-9` and `_`, not starting with a digit.
pub fn is_variable_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The environment of every container of one deployment, read once at its
/// start: the app's `env_file` and `env`, then a service's or a release
/// task's own `env_file` and `env` over them (a later layer's value wins).
/// `Debug` leaves the values out: they are secrets.
pub struct AppEnv {
    app: Vec<(String, String)>,
    services: HashMap<String, Vec<(String, String)>>,
    tasks: HashMap<String, Vec<(String, String)>>,
}

impl std::fmt::Debug for AppEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppEnv").finish_non_exhaustive()
    }
}

impl AppEnv {
    /// Reads every env file the app's configuration names.
    pub fn read(cfg: &AppConfig) -> Result<Self, EnvFileError> {
        let app = layer(&[], cfg.env_file.as_deref(), &cfg.env)?;
        let mut services = HashMap::new();
        for (name, service) in &cfg.services {
            let env = layer(&app, service.env_file.as_deref(), &service.env)?;
            services.insert(name.clone(), env);
        }
        let mut tasks = HashMap::new();
        for task in &cfg.release {
            let env = layer(&app, task.env_file.as_deref(), &task.env)?;
            tasks.insert(task.name.clone(), env);
        }
        Ok(Self {
            app,
            services,
            tasks,
        })
    }

    /// A service's containers' environment.
    pub fn service(&self, name: &str) -> &[(String, String)] {
        self.services.get(name).unwrap_or(&self.app)
    }

    /// A release task's environment.
    pub fn task(&self, name: &str) -> &[(String, String)] {
        self.tasks.get(name).unwrap_or(&self.app)
    }
}

/// `base`, then the file's variables, then `vars`; a name keeps its first
/// place and takes its last value.
fn layer(
    base: &[(String, String)],
    file: Option<&Path>,
    vars: &EnvVars,
) -> Result<Vec<(String, String)>, EnvFileError> {
    let mut env = base.to_vec();
    let from_file = match file {
        Some(path) => read(path)?,
        None => Vec::new(),
    };
    let set = from_file
        .into_iter()
        .chain(vars.0.iter().map(|(k, v)| (k.clone(), v.clone())));
    for (name, value) in set {
        match env.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => env.push((name, value)),
        }
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_docker() {
        let text =
            "# comment\n\nDJANGO_SECRET_KEY=abc=def\n  DEBUG=False\nQUOTED=\"kept\"\nEMPTY=\n";
        let vars = parse(text).unwrap();
        assert_eq!(
            vars,
            [
                ("DJANGO_SECRET_KEY".to_owned(), "abc=def".to_owned()),
                ("DEBUG".to_owned(), "False".to_owned()),
                ("QUOTED".to_owned(), "\"kept\"".to_owned()),
                ("EMPTY".to_owned(), String::new()),
            ]
        );
    }

    #[test]
    fn reports_the_line_not_the_content() {
        assert_eq!(parse("OK=1\nsecret-value-without-name\n"), Err(2));
        assert_eq!(parse("1ABC=x\n"), Err(1));
        assert_eq!(parse("BAD NAME=x\n"), Err(1));
        let err = EnvFileError::Syntax {
            path: "shop.env".into(),
            line: 2,
        };
        assert!(!err.to_string().contains("secret-value"));
    }

    #[test]
    fn layers_override_by_name_and_keep_order() {
        let base = vec![
            ("A".to_owned(), "1".to_owned()),
            ("B".to_owned(), "2".to_owned()),
        ];
        let vars = EnvVars(
            [
                ("B".to_owned(), "3".to_owned()),
                ("C".to_owned(), "4".to_owned()),
            ]
            .into(),
        );
        let env = layer(&base, None, &vars).unwrap();
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("A", "1"), ("B", "3"), ("C", "4")]);
    }
}
