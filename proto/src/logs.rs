//! `deployctl logs --service`: the app's own output, from the containers
//! of a service, through the API.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What a log stream says, one Server-Sent Event each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LogEvent {
    /// A container's lines follow (it ran already, or a deploy started it).
    Joined {
        container: String,
        sha: Option<crate::CommitSha>,
    },
    /// One line of its output, stdout and stderr together.
    Line {
        container: String,
        #[serde(with = "time::serde::rfc3339")]
        #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
        at: OffsetDateTime,
        line: String,
    },
    /// It stopped (a deploy replaced it): no more of its lines.
    Left { container: String },
}

impl LogEvent {
    /// Its `kind` on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Joined { .. } => "joined",
            Self::Line { .. } => "line",
            Self::Left { .. } => "left",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_the_wire_tags() {
        let at = OffsetDateTime::UNIX_EPOCH;
        let container = "c".to_owned();
        for event in [
            LogEvent::Joined {
                container: container.clone(),
                sha: None,
            },
            LogEvent::Line {
                container: container.clone(),
                at,
                line: "l".into(),
            },
            LogEvent::Left { container },
        ] {
            let wire = serde_json::to_value(&event).unwrap();
            assert_eq!(wire["kind"], event.kind());
        }
        for event in [
            crate::RunEvent::Output { line: "l".into() },
            crate::RunEvent::Exited { code: 3 },
            crate::RunEvent::Failed { error: "e".into() },
        ] {
            let wire = serde_json::to_value(&event).unwrap();
            assert_eq!(wire["kind"], event.kind());
        }
    }
}
