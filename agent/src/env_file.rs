//! Env files in Docker's `--env-file` format, the way apps keep their secrets.
//!
//! One `KEY=VALUE` per line; blank lines and lines starting with `#` are
//! skipped; the value is everything after the first `=`, quotes included, as
//! Docker reads it. Errors name the line, never its content.

use std::path::Path;

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
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(index + 1);
        }
        vars.push((name.to_owned(), value.to_owned()));
    }
    Ok(vars)
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
}
