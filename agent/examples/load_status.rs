//! Load on the API: N concurrent clients, each on its own TLS connection,
//! reading an app's status for a while: back to back (the most the agent
//! serves), or each every PERIOD_MS (a steady load, whose latency is the
//! agent's, not a queue's). Prints requests, errors and latency
//! percentiles. Run through `scripts/api/load.sh`.
//!
//!   load_status URL CA_PEM TOKEN APP CLIENTS SECONDS [PERIOD_MS]

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    deployd::install_crypto_provider();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, ca, token, app, clients, seconds, period) = match args.as_slice() {
        [url, ca, token, app, clients, seconds] => (url, ca, token, app, clients, seconds, None),
        [url, ca, token, app, clients, seconds, period] => (
            url,
            ca,
            token,
            app,
            clients,
            seconds,
            Some(Duration::from_millis(period.parse().unwrap())),
        ),
        _ => panic!("usage: load_status URL CA_PEM TOKEN APP CLIENTS SECONDS [PERIOD_MS]"),
    };
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let clients: usize = clients.parse().unwrap();
    let run_for = Duration::from_secs(seconds.parse().unwrap());
    let target = format!("{url}/v1/apps/{app}/status");
    // Every client connects first (TCP and TLS handshakes, one request):
    // what is measured is status over open connections, as a dashboard or
    // a script in a loop has them.
    let connected: Vec<reqwest::Client> = futures_util::future::join_all((0..clients).map(|_| {
        let client = reqwest::Client::builder()
            .tls_certs_only([ca.clone()])
            .pool_max_idle_per_host(1)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let (target, token) = (target.clone(), token.clone());
        async move {
            let warm = client.get(&target).bearer_auth(&token).send().await;
            assert!(
                warm.is_ok_and(|r| r.status().is_success()),
                "a client could not connect"
            );
            client
        }
    }))
    .await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (index, client) in connected.into_iter().enumerate() {
        let (target, token) = (target.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = Vec::new();
            // Paced clients are spread over the period, as independent
            // clients are, not all at its start.
            let mut tick = period.map(|p| {
                let offset = p * u32::try_from(index).unwrap() / u32::try_from(clients).unwrap();
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, p);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick
            });
            while start.elapsed() < run_for {
                if let Some(tick) = tick.as_mut() {
                    tick.tick().await;
                }
                let sent = Instant::now();
                let result = client.get(&target).bearer_auth(&token).send().await;
                match result {
                    Ok(r) if r.status().is_success() => match r.bytes().await {
                        Ok(_) => latencies.push(sent.elapsed()),
                        Err(e) => errors.push(e.to_string()),
                    },
                    Ok(r) => errors.push(format!("HTTP {}", r.status())),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    for task in tasks {
        let (l, e) = task.await.unwrap();
        latencies.extend(l);
        errors.extend(e);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let pace = period.map_or("back to back".to_owned(), |p| {
        format!("each every {} ms", p.as_millis())
    });
    println!(
        "{clients} clients ({pace}), {:.1} s: {} requests ({:.0}/s), {} errors",
        elapsed.as_secs_f64(),
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        errors.len()
    );
    if !latencies.is_empty() {
        println!(
            "latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            percentile(&latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&latencies, 0.90).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.last().unwrap().as_secs_f64() * 1e3,
        );
    }
    for e in errors.iter().take(5) {
        println!("error: {e}");
    }
    if !errors.is_empty() {
        std::process::exit(1);
    }
}
