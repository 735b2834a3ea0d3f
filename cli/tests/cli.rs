//! The built `deployctl` against a real agent (in-process, real TLS, real
//! tokens, the test bed's releases): exit codes and output for every kind
//! of outcome, the JSON schema, and a stream cut mid-deployment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deployd_proto::{AppStatus, DeploymentEvent, DeploymentPage, EventKind, Scope as S, WhoAmI};
use deployd_testkit::agent::TestAgent;
use deployd_testkit::oidc::{AUDIENCE, Issuer, RSA_A};
use deployd_testkit::{scoped, swarm_scoped};
use tokio::net::{TcpListener, TcpStream};

const ALL: [S; 4] = [S::Read, S::Deploy, S::Rollback, S::Admin];

/// deployctl with nothing of this environment but PATH, pointed at the
/// agent: its URL, its CA, its app.
fn command(agent: &TestAgent, url: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_deployctl"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", agent.state.path())
        .env("DEPLOYCTL_URL", url)
        .env("DEPLOYCTL_CA_CERT", agent.pki.ca_path())
        .env("DEPLOYCTL_APP", agent.config.apps.keys().next().unwrap());
    command
}

/// Runs deployctl with `token`.
async fn deployctl(agent: &TestAgent, url: &str, token: &str, args: &[&str]) -> Output {
    command(agent, url)
        .args(args)
        .env("DEPLOYCTL_TOKEN", token)
        .output()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the exit code; returns (stdout, stderr).
fn expect(output: &Output, code: i32, what: &str) -> (String, String) {
    let (out, err) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}\n--- stdout\n{out}\n--- stderr\n{err}"
    );
    (out, err)
}

/// Release 1 to a fresh app: success, in plain lines (not a terminal),
/// every one timestamped, with the migration it applied.
async fn deploys_release_1(agent: &TestAgent, url: &str, token: &str, sha: &str) {
    let out = deployctl(agent, url, token, &["deploy", sha]).await;
    let (lines, err) = expect(&out, 0, "release 1");
    assert!(err.contains("migrations applied: "), "{err}");
    assert!(err.contains("shop.0001_initial"), "{err}");
    assert!(lines.contains("✔ roll:web"), "{lines}");
    assert!(lines.contains("task:migrate | "), "{lines}");
    assert!(
        lines.trim_end().ends_with("deployment succeeded"),
        "{lines}"
    );
    assert!(
        lines.lines().all(|l| l.starts_with("20")),
        "timestamped: {lines}"
    );
}

/// `migrate-fails` after release 1: failed before any change, with the
/// cause, the task's last lines and the migration that stays applied.
async fn fails_to_migrate(agent: &TestAgent, url: &str, token: &str, sha: &str) {
    let out = deployctl(agent, url, token, &["deploy", sha]).await;
    let (_, err) = expect(&out, 3, "migrate fails");
    assert!(err.contains("release task migrate exited with 1"), "{err}");
    assert!(err.contains("last lines of task:migrate:"), "{err}");
    assert!(
        err.contains("migrations applied, which stay applied: shop.0002_heartbeat_queue"),
        "{err}"
    );
}

#[tokio::test]
async fn every_outcome_has_its_exit_code_and_output() {
    scoped(|scope| async move {
        let agent = TestAgent::deploying(&scope).await;
        let url = agent.url.clone();
        let token = || agent.token("ci", &ALL, &[]);
        let sha = |variant: &str| scope.bed.sha(variant).to_string();

        // Usage: a bad sha never reaches the agent.
        let out = deployctl(&agent, &url, &token(), &["deploy", "HEAD"]).await;
        let (_, err) = expect(&out, 2, "bad sha");
        assert!(err.contains("lowercase hex"), "{err}");

        deploys_release_1(&agent, &url, &token(), &sha("release-1")).await;
        fails_to_migrate(&agent, &url, &token(), &sha("migrate-fails")).await;

        // Rolled back after a change.
        let out = deployctl(&agent, &url, &token(), &["deploy", &sha("worker-crash")]).await;
        let (_, err) = expect(&out, 4, "worker crash");
        assert!(err.contains("rolled_back"), "{err}");

        // A conflict, then the same token waits the running one out.
        let out = deployctl(
            &agent,
            &url,
            &token(),
            &["deploy", &sha("release-2"), "--no-follow"],
        )
        .await;
        let (id, _) = expect(&out, 0, "release 2 started");
        let waiting = token();
        let out = deployctl(&agent, &url, &waiting, &["deploy", &sha("release-2")]).await;
        let (_, err) = expect(&out, 7, "conflict");
        assert!(err.contains(id.trim()), "names the running one: {err}");
        assert!(err.contains("hint: follow it: deployctl logs"), "{err}");
        let out = deployctl(
            &agent,
            &url,
            &waiting,
            &["deploy", &sha("release-2"), "--wait-lock", "5m"],
        )
        .await;
        let (_, err) = expect(&out, 0, "waited, then a no-op success");
        assert!(err.contains("waiting for deployment"), "{err}");
        let out = deployctl(&agent, &url, &token(), &["logs", id.trim(), "--follow"]).await;
        expect(&out, 0, "logs --follow of a succeeded deployment");

        // Locked: refused with the reason, until unlocked.
        let out = deployctl(&agent, &url, &token(), &["lock", "--reason", "incident 42"]).await;
        expect(&out, 0, "lock");
        let out = deployctl(&agent, &url, &token(), &["deploy", &sha("release-1")]).await;
        let (_, err) = expect(&out, 7, "locked");
        assert!(err.contains("incident 42"), "{err}");
        let out = deployctl(&agent, &url, &token(), &["unlock"]).await;
        expect(&out, 0, "unlock");

        // A canary order with none running, and a canary the app has no
        // table for: refused, with what to do.
        let out = deployctl(
            &agent,
            &url,
            &token(),
            &["promote", "--reason", "looks fine"],
        )
        .await;
        let (_, err) = expect(&out, 1, "promote with no canary");
        assert!(
            err.contains("no canary of") && err.contains("hint:"),
            "{err}"
        );
        let out = deployctl(
            &agent,
            &url,
            &token(),
            &["deploy", &sha("release-2"), "--canary"],
        )
        .await;
        let (_, err) = expect(&out, 2, "canary not configured");
        assert!(err.contains("[apps."), "{err}");

        // Authentication and authorization.
        let out = deployctl(&agent, &url, "not-a-token", &["status"]).await;
        let (_, err) = expect(&out, 6, "bad token");
        assert!(err.contains("hint: check the token"), "{err}");
        let reader = agent.token("viewer", &[S::Read], &[]);
        let out = deployctl(&agent, &url, &reader, &["rollback"]).await;
        expect(&out, 6, "missing scope");
        let spent = token();
        expect(
            &deployctl(&agent, &url, &spent, &["lock", "--reason", "x"]).await,
            0,
            "lock",
        );
        let out = deployctl(&agent, &url, &spent, &["unlock"]).await;
        let (_, err) = expect(&out, 6, "replayed token");
        assert!(err.contains("a token makes one change"), "{err}");
        expect(
            &deployctl(&agent, &url, &token(), &["unlock"]).await,
            0,
            "unlock",
        );

        // Unreachable.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = format!("https://localhost:{}", closed.local_addr().unwrap().port());
        drop(closed);
        let out = deployctl(&agent, &dead, &token(), &["status"]).await;
        let (_, err) = expect(&out, 8, "unreachable");
        assert!(err.contains("cannot reach the agent"), "{err}");

        // Read commands in JSON follow the API's types.
        let out = deployctl(&agent, &url, &reader, &["status", "--json"]).await;
        let status: AppStatus = serde_json::from_str(&expect(&out, 0, "status").0).unwrap();
        assert_eq!(status.live_sha.unwrap().as_str(), sha("release-2"));
        let out = deployctl(
            &agent,
            &url,
            &reader,
            &["history", "--json", "--limit", "3"],
        )
        .await;
        let page: DeploymentPage = serde_json::from_str(&expect(&out, 0, "history").0).unwrap();
        assert_eq!(page.deployments.len(), 3);
        let out = deployctl(&agent, &url, &reader, &["whoami", "--json"]).await;
        let me: WhoAmI = serde_json::from_str(&expect(&out, 0, "whoami").0).unwrap();
        assert_eq!(me.subject, "viewer");
        let out = deployctl(&agent, &url, &reader, &["history"]).await;
        let (table, _) = expect(&out, 0, "history table");
        assert!(
            table.contains("rolled_back") && table.contains("succeeded"),
            "{table}"
        );
        assert!(
            table.lines().next().unwrap().contains("MIGRATIONS"),
            "{table}"
        );

        // Settings from a named context of the config file alone.
        let token_file = agent.state.path().join("token");
        std::fs::write(&token_file, agent.token("viewer", &[S::Read], &[])).unwrap();
        let config = agent.state.path().join("deployctl.toml");
        std::fs::write(
            &config,
            format!(
                "default_context = \"staging\"\n[contexts.staging]\nurl = \"https://localhost:1\"\n\
                 [contexts.production]\nurl = \"{url}\"\nca_cert = \"{ca}\"\napp = \"{app}\"\n\
                 token_file = \"{token}\"\n",
                ca = agent.pki.ca_path().display(),
                app = scope.app(),
                token = token_file.display(),
            ),
        )
        .unwrap();
        let from_file = |context: &str| {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_deployctl"))
                .env_clear()
                .env("DEPLOYCTL_CONFIG", &config)
                .args(["--context", context, "whoami"])
                .output()
        };
        let (me, _) = expect(&from_file("production").await.unwrap(), 0, "context");
        assert!(me.contains("viewer"), "{me}");
        expect(&from_file("nope").await.unwrap(), 2, "unknown context");
        // Precedence: an explicit --token-file beats a DEPLOYCTL_TOKEN left
        // in the environment, which beats the context's token file.
        let mut explicit = command(&agent, &url);
        let out = explicit
            .env("DEPLOYCTL_TOKEN", "stale-token")
            .args(["--token-file", token_file.to_str().unwrap(), "whoami"])
            .output()
            .await
            .unwrap();
        let (me, _) = expect(&out, 0, "--token-file over DEPLOYCTL_TOKEN");
        assert!(me.contains("viewer"), "{me}");
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_deployctl"))
            .env_clear()
            .env("DEPLOYCTL_CONFIG", &config)
            .env("DEPLOYCTL_TOKEN", "stale-token")
            .args(["--context", "production", "whoami"])
            .output()
            .await
            .unwrap();
        let (_, err) = expect(&out, 6, "DEPLOYCTL_TOKEN over the context's token file");
        assert!(err.contains("token"), "{err}");

        // A rollback without release tasks, followed in JSON: one
        // DeploymentEvent per line.
        let out = deployctl(
            &agent,
            &url,
            &token(),
            &["rollback", "--json", "--skip-tasks"],
        )
        .await;
        let (lines, _) = expect(&out, 0, "rollback");
        let events: Vec<DeploymentEvent> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        assert!(matches!(
            events.last().unwrap().kind,
            EventKind::State { .. }
        ));
        assert!(
            !events.iter().any(
                |e| matches!(&e.kind, EventKind::StepStarted { step } if step.starts_with("task:"))
            ),
            "{lines}"
        );
        // Its log ends with the migrations that stay applied.
        let out = deployctl(
            &agent,
            &url,
            &reader,
            &["history", "--json", "--limit", "1"],
        )
        .await;
        let page: DeploymentPage = serde_json::from_str(&expect(&out, 0, "history").0).unwrap();
        let rollback = &page.deployments[0];
        assert!(rollback.skip_tasks, "{rollback:#?}");
        let out = deployctl(&agent, &url, &reader, &["logs", &rollback.id.0]).await;
        let (_, err) = expect(&out, 0, "the rollback's log");
        assert!(
            err.contains("which stay applied: shop.0002_heartbeat_queue"),
            "{err}"
        );
    })
    .await;
}

/// A TCP relay whose open connections can be cut at once.
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let generation = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let cut = generation.clone();
                cut.store(false, Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let relay = tokio::io::copy_bidirectional(&mut client, &mut server);
                    let watch = async {
                        while !cut.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! { _ = relay => {}, () = watch => {} }
                });
            }
        });
        Self { addr, cut }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

/// The same commands against an agent on the swarm backend
/// (`scripts/testbed.sh swarm up`; `scripts/test.sh` runs every test whose
/// name contains `_on_swarm` apart): the same exit codes and lines, and
/// status naming each task's node.
#[tokio::test]
async fn the_same_commands_and_exit_codes_on_swarm() {
    swarm_scoped(|scope| async move {
        let agent = TestAgent::on_swarm(&scope).await;
        let url = agent.url.clone();
        let token = || agent.token("ci", &ALL, &[]);
        let sha = |variant: &str| scope.bed.sha(variant).to_string();

        deploys_release_1(&agent, &url, &token(), &sha("release-1")).await;
        fails_to_migrate(&agent, &url, &token(), &sha("migrate-fails")).await;

        let out = deployctl(&agent, &url, &token(), &["deploy", &sha("release-2")]).await;
        expect(&out, 0, "release 2");
        let out = deployctl(&agent, &url, &token(), &["status"]).await;
        let (table, _) = expect(&out, 0, "status");
        let id = scope.docker.swarm_manager().await.unwrap();
        let node = scope
            .docker
            .swarm_nodes()
            .await
            .unwrap()
            .remove(&id)
            .unwrap();
        assert!(table.contains(&format!(" on {node}")), "{node}: {table}");
        assert!(table.contains(&sha("release-2")[..12]), "{table}");

        let out = deployctl(&agent, &url, &token(), &["lock", "--reason", "incident 42"]).await;
        expect(&out, 0, "lock");
        let out = deployctl(&agent, &url, &token(), &["deploy", &sha("release-1")]).await;
        let (_, err) = expect(&out, 7, "locked");
        assert!(err.contains("incident 42"), "{err}");
        let out = deployctl(&agent, &url, &token(), &["unlock"]).await;
        expect(&out, 0, "unlock");

        let out = deployctl(&agent, &url, &token(), &["rollback"]).await;
        let (lines, _) = expect(&out, 0, "rollback");
        assert!(
            lines.trim_end().ends_with("deployment succeeded"),
            "{lines}"
        );
        let out = deployctl(&agent, &url, &token(), &["status", "--json"]).await;
        let status: AppStatus = serde_json::from_str(&expect(&out, 0, "status").0).unwrap();
        assert_eq!(status.live_sha.unwrap().as_str(), sha("release-1"));
    })
    .await;
}

#[tokio::test]
async fn a_stream_cut_mid_deployment_resumes_without_loss_or_repeats() {
    scoped(|scope| async move {
        let agent = TestAgent::deploying(&scope).await;
        let relay = Relay::start(agent.server.addr()).await;
        let url = format!("https://localhost:{}", relay.addr.port());
        let token = agent.token("ci", &ALL, &[]);
        let sha = scope.bed.sha("release-1").to_string();
        let args = ["deploy", sha.as_str(), "--json"];
        let follow = deployctl(&agent, &url, &token, &args);
        let cutter = async {
            // Cut every connection a few times while it runs.
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                relay.cut();
            }
        };
        let (out, ()) = tokio::join!(follow, cutter);
        let (lines, err) = expect(&out, 0, "deploy through a flaky relay");
        assert!(
            err.contains("resuming after event"),
            "the stream was never cut: {err}"
        );
        let seqs: Vec<u64> = lines
            .lines()
            .map(|l| serde_json::from_str::<DeploymentEvent>(l).unwrap().seq)
            .collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{lines}");
        // The whole log, as the agent recorded it.
        let id = agent
            .engine
            .store()
            .history(&scope.app(), 1, None)
            .unwrap()
            .remove(0)
            .id;
        assert_eq!(
            agent.engine.store().events(&id, 0).unwrap().len(),
            seqs.len()
        );
    })
    .await;
}

/// GitHub's ID token endpoint, as a job sees it: it checks the job's
/// request token and signs a token for the audience asked.
async fn github_token_endpoint(issuer: Arc<Issuer>) -> SocketAddr {
    use axum::extract::Query;
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().route(
        "/token",
        axum::routing::get(
            move |headers: HeaderMap,
                  Query(q): Query<std::collections::HashMap<String, String>>| {
                let issuer = issuer.clone();
                async move {
                    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok());
                    if bearer != Some("bearer job-request-token") || !q.contains_key("api-version")
                    {
                        return Err(StatusCode::UNAUTHORIZED);
                    }
                    let audience = q.get("audience").cloned().unwrap_or_default();
                    let token = issuer.token("a", RSA_A, serde_json::json!({"aud": audience}));
                    Ok(axum::Json(serde_json::json!({"value": token})))
                }
            },
        ),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn keyless_ci_deploys_with_the_jobs_own_oidc_token() {
    scoped(|scope| async move {
        let issuer = Arc::new(Issuer::start().await);
        issuer.publish(&[("a", RSA_A)]);
        let repository = scope.publish_releases().await;
        let agent =
            TestAgent::start_with(&scope, &repository, "", &issuer.config(&scope.app())).await;
        scope.start_db().await;
        scope.start_redis().await;
        let endpoint = github_token_endpoint(issuer.clone()).await;
        let github = |audience: &str| {
            let mut c = command(&agent, &agent.url);
            c.env(
                "ACTIONS_ID_TOKEN_REQUEST_URL",
                format!("http://{endpoint}/token?api-version=2.0"),
            )
            .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "job-request-token")
            .env("DEPLOYCTL_OIDC", "github")
            .env("DEPLOYCTL_OIDC_AUDIENCE", audience);
            c
        };
        let sha = scope.bed.sha("release-1").to_string();

        // GitHub Actions: a production job deploys with no stored secret.
        let out = github(AUDIENCE)
            .args(["deploy", &sha])
            .output()
            .await
            .unwrap();
        let (lines, _) = expect(&out, 0, "keyless GitHub deploy");
        assert!(lines.contains("deployment succeeded"), "{lines}");
        let history = agent.engine.store().history(&scope.app(), 1, None).unwrap();
        assert_eq!(
            history[0].requested_by,
            "repo:acme/shop:environment:production"
        );

        // A token for another audience matches no rule of the agent.
        let out = github("someone-else")
            .args(["whoami"])
            .output()
            .await
            .unwrap();
        expect(&out, 6, "wrong audience");
        // No id-token permission: the request variables are missing.
        let out = command(&agent, &agent.url)
            .args(["--oidc", "github", "--oidc-audience", AUDIENCE, "status"])
            .output()
            .await
            .unwrap();
        let (_, err) = expect(&out, 6, "no id-token permission");
        assert!(err.contains("id-token: write"), "{err}");

        // GitLab CI: the token `id_tokens` put in a variable.
        let token = issuer.token("a", RSA_A, serde_json::json!({}));
        let out = command(&agent, &agent.url)
            .env("DEPLOYD_ID_TOKEN", &token)
            .args(["--oidc", "gitlab", "whoami", "--json"])
            .output()
            .await
            .unwrap();
        let me: WhoAmI = serde_json::from_str(&expect(&out, 0, "keyless GitLab").0).unwrap();
        assert_eq!(me.grants[0].apps, [scope.app()]);
    })
    .await;
}

#[tokio::test]
async fn a_plan_is_reviewed_then_deployed_as_reviewed() {
    scoped(|scope| async move {
        let agent = TestAgent::planning(&scope).await;
        let url = agent.url.clone();
        let ci = || agent.token("ci", &[S::Read, S::Deploy], &[]);
        let sha = |variant: &str| scope.bed.sha(variant).to_string();
        let out = deployctl(&agent, &url, &ci(), &["deploy", &sha("release-2")]).await;
        let (lines, _) = expect(&out, 0, "release 2");
        assert!(lines.contains("plan | 16 migrations to apply"), "{lines}");

        // The plan for humans: what breaks, and how to deploy it as
        // reviewed.
        let out = deployctl(&agent, &url, &ci(), &["plan", &sha("drop-column")]).await;
        let (plan, err) = expect(&out, 3, "plan of a refused release");
        println!("{plan}");
        assert!(err.starts_with("plan "), "{err}");
        assert!(
            plan.contains("  shop.0003_remove_heartbeat_queue  [breaks]"),
            "{plan}"
        );
        assert!(plan.contains(r#"| ALTER TABLE "shop_heartbeat" DROP COLUMN "queue""#));
        assert!(plan.contains("verdict   REFUSED: 1 operation(s)"), "{plan}");
        let last = plan.lines().last().unwrap();
        let id = last
            .strip_prefix(&format!(
                "deploy it as reviewed: deployctl deploy {} --plan ",
                &sha("drop-column")[..12]
            ))
            .unwrap_or_else(|| panic!("{last}"));

        // The same plan as JSON, by id.
        let out = deployctl(&agent, &url, &ci(), &["plan", "--show", id, "--json"]).await;
        let (json, _) = expect(&out, 3, "plan --json");
        let shown: deployd_proto::Plan = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(shown.id, id);
        assert_eq!(
            shown.migrations.unwrap().migrations[0].operations[0].verdict,
            deployd_proto::Verdict::Breaks
        );

        // Refused by the app's rule; the override needs a reason.
        let out = deployctl(
            &agent,
            &url,
            &ci(),
            &["deploy", &sha("drop-column"), "--plan", id],
        )
        .await;
        let (_, err) = expect(&out, 3, "refused");
        assert!(
            err.contains("refused: a migration would break release"),
            "{err}"
        );
        let out = deployctl(
            &agent,
            &url,
            &ci(),
            &["deploy", &sha("drop-column"), "--allow-unsafe-migrations"],
        )
        .await;
        expect(&out, 2, "override without a reason");

        // A safe release, reviewed, then deployed as reviewed.
        let out = deployctl(&agent, &url, &ci(), &["plan", &sha("expand")]).await;
        let (plan, _) = expect(&out, 0, "plan expand");
        assert!(
            plan.contains("verdict   nothing breaks the running release"),
            "{plan}"
        );
        let id = plan.lines().last().unwrap().rsplit(' ').next().unwrap();
        let out = deployctl(
            &agent,
            &url,
            &ci(),
            &["deploy", &sha("expand"), "--plan", id],
        )
        .await;
        let (lines, _) = expect(&out, 0, "deploy as reviewed");
        assert!(
            lines.contains(&format!("holds to the reviewed plan {id}")),
            "{lines}"
        );
    })
    .await;
}

/// A real `ssh-agent` (OpenSSH's) on a socket of its own; stopped when
/// dropped.
struct SshAgent {
    socket: std::path::PathBuf,
    _process: tokio::process::Child,
}

impl SshAgent {
    async fn start(dir: &std::path::Path) -> Self {
        let socket = dir.join("agent.sock");
        let process = tokio::process::Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("ssh-agent (Debian's openssh-client) is installed");
        deployd_testkit::poll("ssh-agent's socket", Duration::from_secs(30), || async {
            socket.exists().then_some(())
        })
        .await;
        Self {
            socket,
            _process: process,
        }
    }

    /// `ssh-add key`.
    async fn add(&self, key: &std::path::Path) {
        let out = tokio::process::Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &self.socket)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "ssh-add: {}", text(&out.stderr));
    }
}

#[tokio::test]
async fn operators_sign_with_their_own_key_or_their_ssh_agent() {
    scoped(|scope| async move {
        let homes = tempfile::tempdir().unwrap();
        let home = |name: &str| homes.path().join(name);
        let keygen = |name: &str, args: &[&str]| {
            let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_deployctl"));
            c.env_clear()
                .env("HOME", home(name))
                .env("USER", name)
                .arg("keygen")
                .args(args);
            c
        };

        // deployctl keygen: a key only its owner reads, that OpenSSH reads
        // too, and the entry the host needs.
        let out = keygen("alice", &[]).output().await.unwrap();
        let (said, _) = expect(&out, 0, "keygen");
        let key_file = home("alice").join(".config/deployctl/id_ed25519");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let listed = std::process::Command::new("ssh-keygen")
            .arg("-lf")
            .arg(&key_file)
            .output()
            .unwrap();
        let fingerprint = text(&listed.stdout).split(' ').nth(1).unwrap().to_owned();
        assert!(said.contains(&fingerprint), "{said}");
        let entry = said.split_once("\n\n").unwrap().1;
        assert!(
            entry.starts_with("[[auth.operators]]\nname = \"alice\""),
            "{said}"
        );
        let out = keygen("alice", &[]).output().await.unwrap();
        let (_, err) = expect(&out, 2, "keygen over a key");
        assert!(err.contains("--force"), "{err}");
        let out = keygen("carol", &["--json"]).output().await.unwrap();
        let carol: serde_json::Value = serde_json::from_str(&expect(&out, 0, "carol").0).unwrap();

        // Bob's key comes from OpenSSH and lives in his ssh-agent.
        std::fs::create_dir_all(home("bob")).unwrap();
        let bob_key = home("bob").join("id_ed25519");
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "bob@laptop", "-f"])
            .arg(&bob_key)
            .status()
            .unwrap();
        assert!(made.success());
        let ssh_agent = SshAgent::start(&home("bob")).await;
        ssh_agent.add(&bob_key).await;
        let bob_public = std::fs::read_to_string(bob_key.with_extension("pub")).unwrap();

        // The host trusts the three keys: alice and bob may deploy the
        // app (bob may also run commands and read its logs), carol may only
        // read another app.
        let app = scope.app();
        let operators = format!(
            "{entry}\n\
             [[auth.operators]]\nname = \"bob\"\nkey = \"{bob}\"\n\
             scopes = [\"read\", \"deploy\", \"rollback\", \"run\", \"logs\"]\napps = [\"{app}\"]\n\
             [[auth.operators]]\nname = \"carol\"\nkey = \"{carol}\"\n\
             scopes = [\"read\"]\napps = [\"another\"]\n",
            bob = bob_public.trim(),
            carol = carol["public_key"].as_str().unwrap(),
        );
        let repository = scope.publish_releases().await;
        let agent = TestAgent::start_with(&scope, &repository, "", &operators).await;
        scope.start_db().await;
        scope.start_redis().await;
        let as_alice = || {
            let mut c = command(&agent, &agent.url);
            c.env("HOME", home("alice"));
            c
        };
        let as_bob = || {
            let mut c = command(&agent, &agent.url);
            c.env("HOME", home("bob"))
                .env("USER", "bob")
                .env("SSH_AUTH_SOCK", &ssh_agent.socket)
                .arg("--ssh-agent");
            c
        };
        let sha = |variant: &str| scope.bed.sha(variant).to_string();
        let requested_by = || {
            let history = agent.engine.store().history(&app, 1, None).unwrap();
            history[0].requested_by.clone()
        };

        // Alice deploys with the key keygen wrote: no token anywhere.
        let out = as_alice()
            .args(["deploy", &sha("release-1")])
            .output()
            .await
            .unwrap();
        let (lines, _) = expect(&out, 0, "alice deploys");
        assert!(lines.contains("deployment succeeded"), "{lines}");
        assert_eq!(requested_by(), "alice");
        // Bob deploys with the key his ssh-agent holds, and each request
        // (deploy, then following it) had a token of its own.
        let out = as_bob()
            .args(["deploy", &sha("release-2")])
            .output()
            .await
            .unwrap();
        expect(&out, 0, "bob deploys through his ssh-agent");
        assert_eq!(requested_by(), "bob");
        let out = as_bob().args(["whoami", "--json"]).output().await.unwrap();
        let me: WhoAmI = serde_json::from_str(&expect(&out, 0, "bob whoami").0).unwrap();
        assert_eq!(
            (me.subject.as_str(), me.issuer.as_str()),
            ("bob", "deployctl")
        );
        let left = me.expires_at - time::OffsetDateTime::now_utc();
        assert!(left <= time::Duration::seconds(60), "{left}");
        // Alice rolls back.
        let out = as_alice().args(["rollback"]).output().await.unwrap();
        expect(&out, 0, "alice rolls back");
        assert_eq!(requested_by(), "alice");
        let log = agent.engine.store().audit_tail(200).unwrap();
        let rollback = log
            .iter()
            .rev()
            .find(|e| e.record.action == "rollback")
            .unwrap();
        assert_eq!(rollback.record.subject.as_deref(), Some("alice"));
        assert_eq!(rollback.record.claims.get("key"), Some(&fingerprint));
        let claims: Vec<&String> = rollback.record.claims.keys().collect();
        assert_eq!(claims, ["jti", "key"]);

        // What a key may do is the host's to say: no lock for alice, no
        // reading this app for carol.
        let out = as_alice()
            .args(["lock", "--reason", "x"])
            .output()
            .await
            .unwrap();
        let (_, err) = expect(&out, 6, "alice may not lock");
        assert!(err.contains("alice may not admin"), "{err}");
        let out = command(&agent, &agent.url)
            .env("HOME", home("carol"))
            .args(["status"])
            .output()
            .await
            .unwrap();
        let (_, err) = expect(&out, 6, "carol may not read this app");
        assert!(err.contains("carol may not read"), "{err}");
        // A token is for one host: sent to this one, it names this one.
        let out = as_alice()
            .args(["--audience", "deploy-2.example.com", "whoami"])
            .output()
            .await
            .unwrap();
        let (_, err) = expect(&out, 6, "a token for another host");
        assert!(
            err.contains("not a name of this host's certificate"),
            "{err}"
        );
        // A key signs for its own operator only.
        let out = as_alice()
            .args(["--operator", "bob", "whoami"])
            .output()
            .await
            .unwrap();
        let (_, err) = expect(&out, 6, "alice's key naming bob");
        assert!(
            err.contains("names operator bob but its key is alice's"),
            "{err}"
        );

        runs_a_command_in_the_live_release(&agent, &scope, &as_alice, &as_bob).await;
        follows_the_app_logs_across_a_deploy(&scope, &as_alice, &as_bob, homes.path()).await;

        // Bob's key removed from the configuration and the configuration
        // reloaded (what SIGHUP does): his agent's signature is refused.
        let mut config = agent.config.clone();
        config.auth.operators.retain(|o| o.name != "bob");
        agent.api.replace_authenticator(
            deployd::auth::Authenticator::new(&config.auth)
                .unwrap()
                .for_host(&agent.tls.cert)
                .unwrap(),
        );
        let out = as_bob().args(["status"]).output().await.unwrap();
        let (_, err) = expect(&out, 6, "bob's key removed");
        assert!(err.contains("not an operator's key here"), "{err}");
        let out = as_alice().args(["status"]).output().await.unwrap();
        expect(&out, 0, "alice still trusted");
    })
    .await;
}

/// `deployctl run` (bob may, alice may not): output, exit code, the live
/// release's environment and database, a timeout, one command at a time,
/// Ctrl-C, the audit log.
async fn runs_a_command_in_the_live_release(
    agent: &TestAgent,
    scope: &deployd_testkit::Scope,
    as_alice: &(dyn Fn() -> tokio::process::Command + Sync),
    as_bob: &(dyn Fn() -> tokio::process::Command + Sync),
) {
    let app = scope.app();
    let run = |who: &(dyn Fn() -> tokio::process::Command + Sync), args: &[&str]| {
        let mut c = who();
        c.arg("run").args(args);
        c
    };
    let out = run(as_alice, &["--", "true"]).output().await.unwrap();
    let (_, err) = expect(&out, 6, "alice may not run");
    assert!(err.contains("alice may not run"), "{err}");

    // Its own exit code, stdout and stderr as they come, the release named.
    let out = run(
        as_bob,
        &["--", "sh", "-c", "echo out; echo err >&2; exit 3"],
    )
    .output()
    .await
    .unwrap();
    let (lines, err) = expect(&out, 3, "a command's own exit code");
    assert!(
        lines.contains("out\n") && lines.contains("err\n"),
        "{lines}"
    );
    let live = scope.bed.sha("release-1").to_string();
    assert!(
        err.contains(&format!("(release {}, web's environment)", &live[..12])),
        "{err}"
    );
    // manage.py with the app's environment, on its network: its database.
    let out = run(
        as_bob,
        &["--", "python", "manage.py", "showmigrations", "shop"],
    )
    .output()
    .await
    .unwrap();
    let (lines, _) = expect(&out, 0, "manage.py showmigrations");
    assert!(lines.contains("[X] 0001_initial"), "{lines}");

    // A timeout stops it, and nothing is left behind.
    let out = run(as_bob, &["--timeout", "2s", "--", "sleep", "600"])
        .output()
        .await
        .unwrap();
    let (_, err) = expect(&out, 1, "timed out");
    assert!(err.contains("sleep 600 did not finish within 2 s"), "{err}");
    let left = || async {
        agent
            .engine
            .docker()
            .containers(&[("deployd.app", app.as_str()), ("deployd.task", "run")])
            .await
            .unwrap()
    };
    assert!(left().await.is_empty(), "{:?}", left().await);

    // One at a time: a second command waits for the first's end, unless
    // it says it may run beside it.
    let mut first = run(as_bob, &["--", "sleep", "600"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut said = tokio::io::BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut said, &mut line)
        .await
        .unwrap();
    assert!(line.starts_with("running in "), "{line}");
    let out = run(as_bob, &["--", "true"]).output().await.unwrap();
    let (_, err) = expect(&out, 7, "another command runs");
    assert!(err.contains("bob runs `sleep 600`"), "{err}");
    let out = run(as_bob, &["--concurrent", "--", "true"])
        .output()
        .await
        .unwrap();
    expect(&out, 0, "concurrent");
    // Ctrl-C (or a lost connection) stops it: its container goes.
    first.kill().await.unwrap();
    deployd_testkit::poll(
        "the abandoned command's container removed",
        Duration::from_secs(60),
        || async { left().await.is_empty().then_some(()) },
    )
    .await;

    // Who ran what, and how it ended (the last end is recorded once its
    // container is gone).
    let finished = || {
        let log = agent.engine.store().audit_tail(200).unwrap();
        let ends = log
            .iter()
            .filter(|e| e.record.action == "run_finished")
            .count();
        (ends >= 5).then_some(log)
    };
    let log = deployd_testkit::poll(
        "five commands' ends recorded",
        Duration::from_secs(60),
        || async { finished() },
    )
    .await;
    let asked = log
        .iter()
        .find(|e| {
            e.record.action == "run"
                && e.record
                    .detail
                    .as_deref()
                    .is_some_and(|d| d.starts_with("sh -c"))
        })
        .unwrap();
    assert_eq!(asked.record.subject.as_deref(), Some("bob"));
    assert_eq!(
        asked.record.detail.as_deref(),
        Some("sh -c 'echo out; echo err >&2; exit 3' (as the default service)")
    );
    let outcomes: Vec<&str> = log
        .iter()
        .filter(|e| e.record.action == "run_finished")
        .map(|e| e.record.outcome.as_str())
        .collect();
    assert_eq!(
        outcomes,
        ["exited 3", "exited 0", "failed", "exited 0", "failed"],
        "{log:#?}"
    );
}

/// `deployctl logs --service web` (bob may, alice may not): the running
/// containers' lines, then, followed through a deploy, the new containers
/// join and the old ones leave.
async fn follows_the_app_logs_across_a_deploy(
    scope: &deployd_testkit::Scope,
    as_alice: &(dyn Fn() -> tokio::process::Command + Sync),
    as_bob: &(dyn Fn() -> tokio::process::Command + Sync),
    dir: &std::path::Path,
) {
    let app = scope.app();
    let prefix = |variant: &str| format!("{app}-web-{}-", &scope.bed.sha(variant).as_str()[..12]);
    let (old, new) = (prefix("release-1"), prefix("release-2"));
    let out = as_alice()
        .args(["logs", "--service", "web"])
        .output()
        .await
        .unwrap();
    let (_, err) = expect(&out, 6, "alice may not read logs");
    assert!(err.contains("alice may not logs"), "{err}");
    let out = as_bob()
        .args(["logs", "--service", "web", "--tail", "5"])
        .output()
        .await
        .unwrap();
    let (lines, _) = expect(&out, 0, "bob reads the logs");
    assert!(
        !lines.is_empty() && lines.lines().all(|l| l.starts_with(&old)),
        "{lines}"
    );

    let (stdout, stderr) = (dir.join("logs.out"), dir.join("logs.err"));
    let mut following = as_bob()
        .args(["logs", "--service", "web", "--follow", "--tail", "1"])
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
    deployd_testkit::poll(
        "the follower joined the running container",
        Duration::from_secs(60),
        || async { read(&stderr).contains("joined").then_some(()) },
    )
    .await;
    let out = as_alice()
        .args(["deploy", &scope.bed.sha("release-2").to_string()])
        .output()
        .await
        .unwrap();
    expect(&out, 0, "release 2 deployed while logs are followed");
    deployd_testkit::poll(
        "the new container's lines, and the old one gone",
        Duration::from_secs(120),
        || async {
            let said = read(&stderr);
            let lines = read(&stdout);
            (said.contains(&format!("-- {new}")) && said.contains(" left") && lines.contains(&new))
                .then_some(())
        },
    )
    .await;
    following.kill().await.unwrap();
    let (said, lines) = (read(&stderr), read(&stdout));
    let first_new = lines.find(&new).unwrap();
    assert!(
        lines[..first_new].contains(&old),
        "old lines first:\n{lines}"
    );
    assert!(
        said.contains(&format!("-- {old}"))
            && said.contains(&format!(
                "joined (release {})",
                &new[app.len() + 5..new.len() - 1]
            )),
        "{said}"
    );
}

/// What a webhook receiver got: the event header, the signature header and
/// the body of each request, answered or not.
#[derive(Default)]
struct Received(std::sync::Mutex<Vec<(String, String, String)>>);

/// A webhook receiver on loopback: `/hook` answers 500 to its first two
/// requests, then 200; `/hang` records what it got, and never answers.
async fn webhook_receiver() -> (SocketAddr, Arc<Received>, Arc<Received>) {
    use axum::http::{HeaderMap, StatusCode};
    let received = Arc::new(Received::default());
    let hung = Arc::new(Received::default());
    let record = |received: Arc<Received>, headers: HeaderMap, body: String| {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let mut all = received.0.lock().unwrap();
        all.push((
            header("x-deployd-event"),
            header("x-deployd-signature"),
            body,
        ));
        all.len()
    };
    let hook = {
        let received = received.clone();
        move |headers: HeaderMap, body: String| async move {
            let seen = record(received, headers, body);
            if seen <= 2 {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            }
        }
    };
    let hang = {
        let hung = hung.clone();
        move |headers: HeaderMap, body: String| async move {
            record(hung, headers, body);
            std::future::pending::<()>().await;
            StatusCode::OK
        }
    };
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .route("/hang", axum::routing::post(hang));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, received, hung)
}

#[tokio::test]
async fn webhooks_hear_of_every_outcome_signed_retried_and_never_in_the_way() {
    use hmac::Mac;
    scoped(|scope| async move {
        let (receiver, received, hung) = webhook_receiver().await;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("notify.key");
        std::fs::write(&secret, "a webhook key of at least 32 bytes, for tests\n").unwrap();
        let app = scope.app();
        let hooks = format!(
            "[[apps.{app}.notify]]\nurl = \"http://127.0.0.1:{port}/hook\"\n\
             secret_file = \"{secret}\"\ntimeout = \"5s\"\nretry_for = \"5m\"\n\
             [[apps.{app}.notify]]\nurl = \"http://127.0.0.1:{port}/hang\"\nformat = \"slack\"\n\
             events = [\"started\", \"succeeded\"]\ntimeout = \"10m\"\nretry_for = \"1h\"\n",
            port = receiver.port(),
            secret = secret.display(),
        );
        let repository = scope.publish_releases().await;
        let agent = TestAgent::start_with(&scope, &repository, "", &hooks).await;
        scope.start_db().await;
        scope.start_redis().await;
        let token = || agent.token("ci", &ALL, &[]);
        let sha = |variant: &str| scope.bed.sha(variant).to_string();
        let mut ids = Vec::new();
        for (variant, code) in [("release-1", 0), ("migrate-fails", 3), ("worker-crash", 4)] {
            let out = deployctl(&agent, &agent.url, &token(), &["deploy", &sha(variant)]).await;
            expect(&out, code, variant);
            ids.push(agent.engine.store().history(&app, 1, None).unwrap()[0].id.clone());
        }
        // rollback_failed, which no release here provokes: the same
        // delivery path, told of a record in that state.
        let mut failed = agent.engine.store().get(&ids[2]).unwrap().unwrap();
        failed.state = deployd_proto::DeploymentState::RollbackFailed;
        let notifier =
            deployd::notify::Notifier::new(agent.config.apps.iter(), agent.engine.store().clone())
                .unwrap();
        notifier.tell(&failed, "rollback_failed");

        // Every outcome arrives, signed, after the first two answers (500)
        // were retried.
        let wanted = ["started", "succeeded", "failed", "rolled_back", "rollback_failed"];
        let got = deployd_testkit::poll("every outcome delivered", Duration::from_secs(180), || async {
            let all = received.0.lock().unwrap().clone();
            let events: Vec<&str> = all.iter().map(|(e, _, _)| e.as_str()).collect();
            wanted
                .iter()
                .all(|w| events.contains(w))
                .then_some(all)
        })
        .await;
        let key = std::fs::read_to_string(&secret).unwrap();
        for (event, signature, body) in &got {
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.trim_end().as_bytes()).unwrap();
            mac.update(body.as_bytes());
            let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(signature, &format!("sha256={hex}"), "{event}: {body}");
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(json["event"], event.as_str());
            assert_eq!(json["app"], app.as_str());
        }
        assert_eq!(got[0].0, "started");
        let attempts = got.iter().filter(|(_, _, body)| *body == got[0].2).count();
        assert_eq!(attempts, 3, "the same delivery, retried after two 500s");

        // The hook that never answers held nothing up: the deployment's
        // first step began, and its end was recorded, within a second of
        // the events that set deliveries off.
        let events = agent.engine.store().events(&ids[0], 0).unwrap();
        let at = |pick: &dyn Fn(&EventKind) -> bool| {
            events.iter().filter(|e| pick(&e.kind)).map(|e| e.at).collect::<Vec<_>>()
        };
        let running = at(&|k| matches!(k, EventKind::State { state, .. } if *state == deployd_proto::DeploymentState::Running))[0];
        let first_step = at(&|k| matches!(k, EventKind::StepStarted { .. }))[0];
        let last_step = *at(&|k| matches!(k, EventKind::StepFinished { .. })).last().unwrap();
        let ended = *at(&|k| matches!(k, EventKind::State { state, .. } if state.is_terminal())).last().unwrap();
        let (started_in, ended_in) = (first_step - running, ended - last_step);
        println!("first step began {started_in} after the start; the end recorded {ended_in} after the last step");
        assert!(started_in < time::Duration::SECOND, "{started_in}");
        assert!(ended_in < time::Duration::SECOND, "{ended_in}");

        // The Slack-compatible hook got its text, though it never answered.
        let slack = hung.0.lock().unwrap().clone();
        let short = &sha("release-1")[..12];
        assert_eq!(
            slack[0].2,
            format!(r#"{{"text":":rocket: {app}: deploy of {short} started (by ci)"}}"#)
        );

        // deployctl logs <id> says how each delivery went.
        let out = deployctl(&agent, &agent.url, &token(), &["logs", &ids[0].0]).await;
        let (lines, _) = expect(&out, 0, "logs of release 1");
        assert!(
            lines.contains("notify | notify[0] 127.0.0.1: started delivered (HTTP 200, 3 attempts)"),
            "{lines}"
        );
        assert!(
            lines.contains("notify | notify[1] 127.0.0.1: started retrying"),
            "{lines}"
        );
    })
    .await;
}
