//! Progress of a long upload: a bar on a terminal (indicatif), a log line
//! every few seconds otherwise (CI logs, the journal), never both.

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    label: String,
    total: u64,
    done: AtomicU64,
    sent: AtomicU64,
    bar: Option<ProgressBar>,
    last_log: Mutex<Instant>,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Self {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} blocks, {per_sec}, eta {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            b.set_message(label.to_owned());
            b
        });
        Self {
            label: label.to_owned(),
            total,
            done: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            bar,
            last_log: Mutex::new(Instant::now()),
        }
    }

    /// One block dealt with: sent, or skipped (all zeros).
    pub fn block(&self, sent: bool) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let sent = if sent {
            self.sent.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.sent.load(Ordering::Relaxed)
        };
        match &self.bar {
            Some(b) => b.set_position(done),
            None => {
                let mut last = self.last_log.lock().expect("not poisoned");
                if last.elapsed() >= LOG_EVERY {
                    *last = Instant::now();
                    tracing::info!(
                        "{}: {done}/{} blocks ({}%), {sent} sent",
                        self.label,
                        self.total,
                        done * 100 / self.total.max(1)
                    );
                }
            }
        }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
