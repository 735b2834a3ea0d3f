//! The CI templates in docs/ci parse, deploy with deployctl and the job's
//! own OIDC token, and the production jobs match a rule of the example
//! agent configuration: the claims such a job's token carries earn it
//! `deploy` on the app, and the same job on another branch or environment
//! earns nothing.

use deployd::auth::grants_under;
use deployd::config::{Config, OidcConfig};
use deployd_proto::Scope;
use serde_json::{Map, Value, json};
use yaml_rust2::{Yaml, YamlLoader};

fn load(name: &str) -> Yaml {
    let path = format!("{}/../docs/ci/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .remove(0)
}

fn example_issuer(name: &str) -> OidcConfig {
    let config = Config::from_toml(deployd::config::EXAMPLE).unwrap();
    config
        .auth
        .oidc
        .into_iter()
        .find(|o| o.name == name)
        .unwrap()
}

fn claims(value: Value) -> Map<String, Value> {
    value.as_object().unwrap().clone()
}

/// Whether the claims earn `deploy` on the example's app.
fn may_deploy(issuer: &OidcConfig, claims: &Map<String, Value>) -> bool {
    grants_under(issuer, claims)
        .unwrap()
        .iter()
        .any(|g| g.scopes.contains(&Scope::Deploy) && g.apps.iter().any(|a| a == "shop"))
}

/// The value after `flag` in a command line.
fn flag<'a>(command: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = command.split_whitespace();
    words.find(|w| *w == flag)?;
    words.next()
}

#[test]
fn the_github_workflow_deploys_keyless_from_main_in_production() {
    let workflow = load("github-actions.yml");
    assert_eq!(workflow["on"]["push"]["branches"][0].as_str(), Some("main"));
    let job = &workflow["jobs"]["deploy-production"];
    assert_eq!(job["environment"].as_str(), Some("production"));
    assert_eq!(job["permissions"]["id-token"].as_str(), Some("write"));
    let steps = job["steps"].as_vec().unwrap();
    let command = steps
        .iter()
        .filter_map(|s| s["run"].as_str())
        .find(|r| r.contains("deployctl deploy"))
        .unwrap();
    assert_eq!(flag(command, "--oidc"), Some("github"));
    let audience = flag(command, "--oidc-audience").unwrap();

    let github = example_issuer("github");
    let token = claims(json!({
        "aud": audience, "repository": "acme/shop",
        "environment": "production", "ref": "refs/heads/main",
    }));
    assert!(
        may_deploy(&github, &token),
        "no example rule matches the workflow"
    );
    for (claim, other) in [("ref", "refs/heads/feature"), ("environment", "staging")] {
        let mut elsewhere = token.clone();
        elsewhere.insert(claim.into(), other.into());
        assert!(
            !may_deploy(&github, &elsewhere),
            "{claim}={other} may deploy"
        );
    }
}

#[test]
fn the_gitlab_pipeline_deploys_staging_on_develop_and_production_by_hand() {
    let pipeline = load("gitlab-ci.yml");
    let script = pipeline[".deploy"]["script"][0].as_str().unwrap();
    assert!(script.starts_with("deployctl deploy"), "{script}");
    assert_eq!(flag(script, "--oidc"), Some("gitlab"));

    let staging = &pipeline["deploy:staging"];
    assert_eq!(staging["extends"].as_str(), Some(".deploy"));
    let rule = &staging["rules"][0];
    assert!(rule["if"].as_str().unwrap().contains("\"develop\""));
    assert!(rule["when"].is_badvalue(), "staging is automatic");

    let production = &pipeline["deploy:production"];
    let rule = &production["rules"][0];
    assert!(rule["if"].as_str().unwrap().contains("\"main\""));
    assert_eq!(rule["when"].as_str(), Some("manual"));
    assert_eq!(
        production["environment"]["name"].as_str(),
        Some("production")
    );
    let audience = production["id_tokens"]["DEPLOYD_ID_TOKEN"]["aud"]
        .as_str()
        .unwrap();

    let gitlab = example_issuer("gitlab");
    let token = claims(json!({
        "aud": audience, "project_path": "acme/shop", "environment": "production",
        "environment_protected": "true", "ref_protected": "true", "ref": "main",
    }));
    assert!(
        may_deploy(&gitlab, &token),
        "no example rule matches the pipeline"
    );
    let mut unprotected = token.clone();
    unprotected.insert("ref_protected".into(), "false".into());
    assert!(!may_deploy(&gitlab, &unprotected));
    let mut staging_token = token;
    staging_token.insert("aud".into(), "deployd-staging".into());
    assert!(
        !may_deploy(&gitlab, &staging_token),
        "a staging token may deploy production"
    );
}
