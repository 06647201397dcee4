//! sd_notify: `STATUS=` at each step so `systemctl status nixos-ami-agent`
//! shows what the run is doing, and `READY=1` when it ends (the unit is
//! `Type=notify`, so units ordered after it wait for the whole run). A
//! no-op outside systemd (`NOTIFY_SOCKET` unset).

use sd_notify::NotifyState;

pub fn status(text: &str) {
    send(&[NotifyState::Status(&one_line(text))]);
}

pub fn ready(text: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(&one_line(text))]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// The protocol is newline-separated `KEY=VALUE` lines: a newline in a
/// status would start a new assignment.
fn one_line(text: &str) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    line.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_one_bounded_line() {
        assert_eq!(one_line("failed: a\nREADY=1"), "failed: a READY=1");
        assert_eq!(one_line(&"x".repeat(500)).len(), 200);
    }
}
