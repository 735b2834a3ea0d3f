//! deployd's traffic switch alone, in front of one fixed upstream: what
//! `scripts/bench/switch.sh` measures against nginx and against no proxy.
//! The listener, proxy and connection pool are the ones `deployd run`
//! serves; only the engine, which would pick the upstream, is left out.
//!
//!   switch_proxy LISTEN UPSTREAM [THREADS]   e.g. 127.0.0.1:18081 127.0.0.1:18080

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::net::SocketAddr;

use deployd::config::Config;
use deployd::switch::{Routes, Switch, Upstream};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: switch_proxy LISTEN UPSTREAM [THREADS]";
    let listen: SocketAddr = args.next().expect(usage).parse().expect(usage);
    let upstream: SocketAddr = args.next().expect(usage).parse().expect(usage);
    let threads: usize = args.next().map_or(1, |t| t.parse().expect(usage));
    let text = format!(
        r#"
        switch_threads = {threads}
        [apps.bench]
        image = "registry.invalid/bench"
        [apps.bench.switch]
        listen = "{listen}"
        [apps.bench.services.web]
        port = {port}
        health = {{ path = "/", host = "bench" }}
        "#,
        port = upstream.port()
    );
    let config = Config::from_toml(&text).unwrap();
    let routes = Routes::for_config(&config);
    let serving = Switch::bind(&config, &routes).unwrap().serve().unwrap();
    let _ = routes.get("bench").unwrap().switch_to(&[Upstream {
        container: "backend".into(),
        addr: upstream,
        release: "bench".into(),
    }]);
    println!("switch on {listen} -> {upstream}");
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    serving.shutdown().await;
}
