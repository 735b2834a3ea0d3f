//! Talking to systemd as a `Type=notify` service: READY once the API
//! listens and state is reconciled, RELOADING and STOPPING around SIGHUP and
//! SIGTERM, and watchdog pings while the runtime is responsive.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The API listens, crash recovery is done and the switch routes: systemd
/// may start what is ordered after deployd.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// SIGHUP: a reload is under way; `ready` ends it.
pub fn reloading() {
    notify(&[NotifyState::Reloading]);
}

/// SIGTERM: shutting down.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// When systemd asked for a watchdog (`WatchdogSec=`), pings it at half
/// the interval from a task on the agent's runtime: a runtime whose worker
/// threads are all stuck for the whole interval stops the pings, and
/// systemd restarts deployd. A single stuck task (the engine's, say) is
/// not noticed.
pub fn watchdog() -> Option<JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let period = (interval / 2).max(Duration::from_millis(100));
    tracing::info!(interval = ?interval, "pinging the systemd watchdog");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    }))
}
