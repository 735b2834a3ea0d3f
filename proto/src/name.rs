//! Names both sides check alike.

/// App, service and release task names: 1 to 32 of a-z, 0-9 and `-`,
/// starting with a letter. They end up in URLs, container names and labels.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}
