//! Golden JSON fixtures pin the wire format: a change here is a protocol change.

use deployd_proto::{CommitSha, ErrorBody};

#[test]
fn error_body_matches_fixture() {
    let fixture = include_str!("data/error_body.json");
    let body: ErrorBody = serde_json::from_str(fixture).unwrap();
    assert_eq!(
        body,
        ErrorBody::new("invalid_sha", "a commit sha has 7 to 40 hex digits, got 3")
    );
    let round_trip: serde_json::Value = serde_json::to_value(&body).unwrap();
    assert_eq!(
        round_trip,
        serde_json::from_str::<serde_json::Value>(fixture).unwrap()
    );
}

#[test]
fn commit_sha_is_a_plain_string_on_the_wire() {
    let sha: CommitSha = serde_json::from_str("\"4f2a9c1\"").unwrap();
    assert_eq!(serde_json::to_string(&sha).unwrap(), "\"4f2a9c1\"");
}

#[test]
fn invalid_sha_is_refused_while_decoding() {
    let err = serde_json::from_str::<CommitSha>("\"HEAD\"").unwrap_err();
    assert!(err.to_string().contains("lowercase hex"), "{err}");
}
