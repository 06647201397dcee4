//! Stopping a run on SIGTERM, SIGINT or SIGHUP, without leaving anything
//! behind: the signal is passed on to the program running (`fh apply` runs
//! in its own process group, so `kill` of the agent alone would orphan it
//! while the lock is released and the next run starts a second apply), the
//! agent waits for it (bounded, then SIGKILL), records the interruption,
//! and only then exits, with 75 (temporary: the next run redoes what this
//! one did not finish). Not by re-raising the signal: systemd counts a
//! death by SIGTERM as clean, so the boot unit would show a run that never
//! finished as a success, and `Restart=on-failure` would not retry it.
//!
//! `systemctl stop` signals the whole control group itself; this covers
//! every other sender (an operator's `kill`, a shutdown script, Ctrl-C).
//!
//! The stop is a flag every waiting place can see: [`crate::process::run`]
//! forwards it to its child, [`or_stop`] ends a network attempt, the retry
//! loop stops retrying, and the run starts nothing new.

use nix::sys::signal::Signal;
use std::future::Future;
use std::sync::LazyLock;
use tokio::sync::watch;

static STOP: LazyLock<watch::Sender<Option<Signal>>> = LazyLock::new(|| watch::channel(None).0);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted by {}", .0.as_str())]
pub struct Interrupted(pub Signal);

/// The signal the run was asked to stop by, if any.
pub fn requested() -> Option<Signal> {
    *STOP.borrow()
}

/// The first request wins; later ones change nothing.
pub fn request(signal: Signal) {
    STOP.send_if_modified(|s| {
        if s.is_none() {
            *s = Some(signal);
            true
        } else {
            false
        }
    });
}

/// Resolves once a stop is requested.
pub async fn wait() -> Signal {
    let mut rx = STOP.subscribe();
    loop {
        if let Some(s) = *rx.borrow_and_update() {
            return s;
        }
        if rx.changed().await.is_err() {
            // The sender lives as long as the process.
            std::future::pending::<()>().await;
        }
    }
}

/// `fut`, unless a stop comes first. Only for what runs no program (a
/// request over the network): a program must be stopped through
/// [`crate::process::run`], which passes the signal on and waits.
pub async fn or_stop<T>(fut: impl Future<Output = T>) -> Result<T, Interrupted> {
    if let Some(s) = requested() {
        return Err(Interrupted(s));
    }
    tokio::select! {
        r = fut => Ok(r),
        s = wait() => Err(Interrupted(s)),
    }
}

/// Turns SIGTERM, SIGINT and SIGHUP into a stop request (the first one;
/// later signals are logged and otherwise ignored while the run winds
/// down).
pub fn install() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    for (kind, sig) in [
        (SignalKind::terminate(), Signal::SIGTERM),
        (SignalKind::interrupt(), Signal::SIGINT),
        (SignalKind::hangup(), Signal::SIGHUP),
    ] {
        let mut stream = signal(kind)?;
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if requested().is_none() {
                    tracing::warn!(
                        "received {}: stopping the program that is running, then recording the interruption",
                        sig.as_str()
                    );
                    request(sig);
                } else {
                    tracing::warn!("received {} while stopping; still stopping", sig.as_str());
                }
            }
        });
    }
    Ok(())
}
