//! deployd as systemd runs it: the `deployd` binary takes its public
//! listener from `LISTEN_FDS` and reports to `NOTIFY_SOCKET` (both set here
//! by `scripts/lib/socket_holder.py`, which plays systemd's deployd.socket
//! and notification socket). READY=1 comes once the API listens, watchdog
//! pings follow, SIGHUP is bracketed by RELOADING=1 and READY=1 and makes
//! a new token key work at once (a broken configuration changes nothing),
//! and a restart of deployd refuses no connection made meanwhile.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Times "deployd ready" was logged.
fn starts(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("deployd ready")
        .count()
}

/// Polls `done` until it holds; fails with `why()` after `within`.
fn wait_until(within: Duration, mut done: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{}", why());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_starts(log: &Path, n: usize) {
    wait_until(
        Duration::from_secs(60),
        || starts(log) >= n,
        || {
            format!(
                "deployd did not start {n} time(s):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        },
    );
}

/// One request on a new connection; the status line, or why there was none.
fn request(addr: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    answer
        .lines()
        .next()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| "no answer".to_owned())
}

struct Holder(Child);

/// The notifications deployd sent so far, one per line.
fn notified(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn wait_for_notice(log: &Path, what: &str, n: usize) {
    wait_until(
        Duration::from_secs(60),
        || notified(log).iter().filter(|l| *l == what).count() >= n,
        || format!("no {n} x {what} from deployd: {:?}", notified(log)),
    );
}

/// `deployd token issue` with `config`, signed with `key`.
fn token(bin: &str, config: &Path, key: &str) -> String {
    let out = Command::new(bin)
        .args([
            "token", "issue", "--sub", "ops", "--scope", "read", "--key", key, "--config",
        ])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// An operator key made by OpenSSH's ssh-keygen: its `[[auth.operators]]`
/// entry, and a way to mint a token with it as deployctl would (an EdDSA
/// JWT whose kid is the key's fingerprint), made here with jsonwebtoken.
fn operator(dir: &Path, name: &str) -> (String, impl Fn() -> String) {
    use ed25519::pkcs8::EncodePrivateKey;
    let path = dir.join(format!("{name}_ed25519"));
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .status()
        .expect("ssh-keygen (Debian's openssh-client) is installed");
    assert!(made.success());
    let key = ssh_key::PrivateKey::read_openssh_file(&path).unwrap();
    let public = key.public_key().to_openssh().unwrap();
    let kid = key
        .public_key()
        .fingerprint(ssh_key::HashAlg::Sha256)
        .to_string();
    let pair = key.key_data().ed25519().unwrap();
    let der = ed25519::KeypairBytes {
        secret_key: pair.private.to_bytes(),
        public_key: None,
    }
    .to_pkcs8_der()
    .unwrap();
    let signing = jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes());
    let entry =
        format!("[[auth.operators]]\nname = \"{name}\"\nkey = \"{public}\"\nscopes = [\"read\"]\n");
    let name = name.to_owned();
    let mint = move || {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(kid.clone());
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        // For the name deployctl connects by, which init's certificate holds.
        let claims = deployd_proto::OperatorClaims::new(
            &name,
            "localhost",
            now,
            format!("{name}-{now}-{}", std::process::id()),
        );
        jsonwebtoken::encode(&header, &claims, &signing).unwrap()
    };
    (entry, mint)
}

/// The status of `GET /v1/whoami` with `token`, over TLS trusting `ca`.
fn whoami(api: u16, ca: &Path, token: &str) -> u16 {
    deployd::install_crypto_provider();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    let url = format!("https://localhost:{api}/v1/whoami");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async { client.get(url).bearer_auth(token).send().await })
        .unwrap()
        .status()
        .as_u16()
}

fn wait_for_log(log: &Path, what: &str) {
    wait_until(
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains(what)
        },
        || format!("deployd never logged {what:?}"),
    );
}

/// The deployd process the holder runs (the shell it starts execs into it).
fn deployd_pid(holder: &Holder) -> String {
    let out = Command::new("pgrep")
        .args(["-P", &holder.0.id().to_string()])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

#[test]
fn as_a_systemd_service_it_notifies_reloads_and_restarts_refusing_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_deployd");
    let api = free_port();
    let init = Command::new(bin)
        .args(["init", "--san", "localhost", "--listen"])
        .arg(format!("127.0.0.1:{api}"))
        .arg("--dir")
        .arg(dir.path().join("etc"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(init.success());
    let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // An app name of its own: at start deployd routes to whatever web
    // containers of the app already run.
    let app = format!("socket{}", std::process::id());
    let config = dir.path().join("etc/deployd.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        r#"
[apps.{app}]
image = "registry.test/shop"
[apps.{app}.switch]
listen = "{public}"
[apps.{app}.services.web]
port = 8000
health = {{ path = "/healthz/", host = "shop.test" }}
"#
    ));
    std::fs::write(&config, text).unwrap();

    let log = dir.path().join("deployd.log");
    let notices = dir.path().join("notify.log");
    let holder_script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lib/socket_holder.py");
    let holder = Holder(
        Command::new("python3")
            .arg(holder_script)
            .arg(public.to_string())
            .arg("--notify")
            .arg(&notices)
            .args(["--watchdog-usec", "1000000", "--ready-probe"])
            .arg(format!("127.0.0.1:{api}"))
            .arg("--")
            .args([bin, "run", "--config"])
            .arg(&config)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_starts(&log, 1);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("using the listener systemd passed"),
        "{logged}"
    );
    // Nothing is deployed: the switch itself answers.
    assert_eq!(request(public).unwrap(), "HTTP/1.1 503 Service Unavailable");

    // READY=1, and the API accepted a connection the moment it came.
    wait_for_notice(&notices, "READY=1", 1);
    let seen = notified(&notices);
    let ready = seen.iter().position(|l| l == "READY=1").unwrap();
    assert_eq!(
        seen[ready + 1..].first().map(String::as_str),
        Some("STATUS=serving"),
        "{seen:?}"
    );
    assert!(seen.contains(&"PROBE=ok".to_owned()), "{seen:?}");
    // WATCHDOG_USEC=1s: a ping every half second.
    let pings = seen.iter().filter(|l| *l == "WATCHDOG=1").count();
    wait_for_notice(&notices, "WATCHDOG=1", pings + 3);

    // SIGHUP to deployd itself: a reload, bracketed for systemd. A second
    // signing key (from another init) is added, and switch_threads changed.
    let ca = dir.path().join("etc/tls/cert.pem");
    let other = dir.path().join("other");
    let made = Command::new(bin)
        .args(["init", "--san", "localhost", "--dir"])
        .arg(&other)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(made.success());
    let before = std::fs::read_to_string(&config).unwrap();
    // A top-level key at the top; another [[auth.keys]] and an operator at
    // the end.
    let (alice, alice_token) = operator(dir.path(), "alice");
    let added = format!(
        "switch_threads = 2\n{before}\n[[auth.keys]]\nid = \"ops2\"\nalgorithm = \"EdDSA\"\n\
         public_key = \"{}\"\nprivate_key = \"{}\"\n",
        other.join("keys/ops.pub").display(),
        other.join("keys/ops.key").display()
    );
    let added = format!("{added}{alice}");
    std::fs::write(&config, &added).unwrap();
    let new_key = token(bin, &config, "ops2");
    assert_eq!(whoami(api, &ca, &new_key), 401, "not before the reload");
    let hup = |pid: &str| {
        let sent = Command::new("kill").args(["-HUP", pid]).status().unwrap();
        assert!(sent.success());
    };
    hup(&deployd_pid(&holder));
    wait_for_notice(&notices, "READY=1", 2);
    let seen = notified(&notices);
    let reloading = seen.iter().position(|l| l == "RELOADING=1").unwrap();
    assert!(reloading > ready, "{seen:?}");
    wait_for_log(&log, "[auth] reloaded");
    assert_eq!(whoami(api, &ca, &new_key), 200, "the new key works at once");
    assert_eq!(
        whoami(api, &ca, &alice_token()),
        200,
        "so does the operator"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("TLS certificate and key reloaded"),
        "{logged}"
    );
    assert!(
        logged.contains("changed, taking effect at the next restart keys=switch_threads"),
        "{logged}"
    );
    // A configuration that does not load changes nothing.
    std::fs::write(
        &config,
        added.replace("algorithm = \"EdDSA\"", "algorithm = \"nope\""),
    )
    .unwrap();
    hup(&deployd_pid(&holder));
    wait_for_notice(&notices, "READY=1", 3);
    wait_for_log(&log, "configuration not reloaded, nothing changed");
    assert_eq!(whoami(api, &ca, &new_key), 200);
    // The operator's key taken out: refused from the reload on.
    std::fs::write(&config, added.replace(&alice, "")).unwrap();
    hup(&deployd_pid(&holder));
    wait_for_notice(&notices, "READY=1", 4);
    wait_until(
        Duration::from_secs(30),
        || whoami(api, &ca, &alice_token()) == 401,
        || "alice's key still works after it was removed".to_owned(),
    );
    assert_eq!(whoami(api, &ca, &new_key), 200);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    answers.push(request(public));
                }
                answers
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // SIGHUP to the holder: it stops deployd (SIGTERM) and starts it again.
    let restart = Command::new("kill")
        .args(["-HUP", &holder.0.id().to_string()])
        .status()
        .unwrap();
    assert!(restart.success());
    wait_for_starts(&log, 2);
    wait_for_notice(&notices, "STOPPING=1", 1);
    wait_for_notice(&notices, "READY=1", 5);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let answers: Vec<Result<String, String>> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let failed: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(answers.len() > 20, "only {} requests", answers.len());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        logged.matches("using the listener systemd passed").count(),
        2
    );
    drop(holder);
}
