//! IMDSv2 client: session token with TTL, reused until near expiry and
//! replaced after any 401; retries what heals within the step's budget.
//! Never falls back to IMDSv1 (unauthenticated GETs).

use crate::retry::{self, Attempt, Backoff, RetryError};
use reqwest::StatusCode;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

const TOKEN_PATH: &str = "/latest/api/token";
const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
/// Six hours, the maximum: one token covers any run.
const TOKEN_TTL: u64 = 21_600;
/// Replace a token this long before it expires, so it cannot lapse in flight.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// IMDS answers in milliseconds; a reply slower than this is a hang.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// User data is at most 16 KiB; anything far larger is not IMDS.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImdsError {
    #[error(
        "IMDS refused a session token (403): the instance metadata service is disabled for this \
         instance; enable it (http-endpoint=enabled) so the agent can read user data"
    )]
    Disabled,
    #[error("IMDS {what}: {reason}")]
    Rejected { what: String, reason: String },
    #[error("IMDS has no {what} (404)")]
    Missing { what: String },
    #[error("IMDS {what}: {interrupted}")]
    Interrupted {
        what: String,
        interrupted: crate::stop::Interrupted,
    },
    #[error("IMDS {what}: gave up after {attempts} attempts in {:.1}s: {last}", elapsed.as_secs_f64())]
    Exhausted {
        what: String,
        last: String,
        attempts: u32,
        elapsed: Duration,
    },
}

struct Token {
    value: String,
    renew_at: Instant,
}

pub struct Imds {
    http: reqwest::Client,
    base: String,
    token: Mutex<Option<Token>>,
    backoff: Backoff,
}

/// One attempt's failure, before the retry loop decides.
#[derive(Debug)]
enum Fault {
    /// May heal: connection refused, timeouts, 5xx, a 401 on a stale token.
    Transient(String),
    Disabled,
    Rejected(String),
    Stopped(crate::stop::Interrupted),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Transient(s) | Fault::Rejected(s) => f.write_str(s),
            Fault::Disabled => f.write_str("IMDS disabled (403)"),
            Fault::Stopped(i) => write!(f, "{i}"),
        }
    }
}

type Step<T> = Result<T, Attempt<Fault>>;

impl Imds {
    pub fn new(base: &str, backoff: Backoff) -> Self {
        let http = reqwest::Client::builder()
            // IMDS is link-local: a proxy from the environment must never
            // see the token or the user data.
            .no_proxy()
            // Nor may a redirect: it would send the session token to
            // another host and take its reply for the instance's data.
            // IMDS never redirects; a 3xx is refused as it is.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(ATTEMPT_TIMEOUT)
            .build()
            .expect("a plain-HTTP reqwest client always builds");
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: Mutex::new(None),
            backoff,
        }
    }

    /// `GET /latest/user-data`; `None` when the instance has none (404).
    pub async fn user_data(&self) -> Result<Option<Vec<u8>>, ImdsError> {
        self.get("/latest/user-data", "user data").await
    }

    pub async fn instance_id(&self) -> Result<String, ImdsError> {
        self.get_text("/latest/meta-data/instance-id", "instance id")
            .await
    }

    pub async fn region(&self) -> Result<String, ImdsError> {
        self.get_text("/latest/meta-data/placement/region", "region")
            .await
    }

    /// The instance profile's role name; `None` when no profile is
    /// attached (404).
    pub async fn role_name(&self) -> Result<Option<String>, ImdsError> {
        let what = "instance profile";
        let Some(bytes) = self
            .get("/latest/meta-data/iam/security-credentials/", what)
            .await?
        else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        Ok(text
            .lines()
            .next()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty()))
    }

    /// For `doctor` only: does IMDS still answer an unauthenticated
    /// (IMDSv1) request? The agent itself never makes one to get data.
    /// `None` when the probe is inconclusive.
    pub async fn imdsv1_allowed(&self) -> Option<bool> {
        let reply = self
            .http
            .get(format!("{}/latest/meta-data/instance-id", self.base))
            .timeout(ATTEMPT_TIMEOUT)
            .send()
            .await
            .ok()?;
        match reply.status() {
            StatusCode::OK => Some(true),
            StatusCode::UNAUTHORIZED => Some(false),
            _ => None,
        }
    }

    async fn get_text(&self, path: &str, what: &str) -> Result<String, ImdsError> {
        let bytes = self
            .get(path, what)
            .await?
            .ok_or_else(|| ImdsError::Missing { what: what.into() })?;
        let text = String::from_utf8(bytes).map_err(|_| ImdsError::Rejected {
            what: what.into(),
            reason: "reply is not UTF-8".into(),
        })?;
        let text = text.trim();
        // Instance ids and regions: letters, digits, `-`, `.`, `_` only.
        if text.is_empty()
            || text.len() > 256
            || !text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(ImdsError::Rejected {
                what: what.into(),
                reason: "reply is not a plain identifier".into(),
            });
        }
        Ok(text.to_owned())
    }

    pub async fn get(&self, path: &str, what: &str) -> Result<Option<Vec<u8>>, ImdsError> {
        // No program runs here: an attempt in flight ends with a stop.
        let r = retry::retry(&self.backoff, &format!("IMDS {what}"), |t| async move {
            match crate::stop::or_stop(self.attempt(path, t)).await {
                Ok(r) => r,
                Err(i) => Err(Attempt::Fail(Fault::Stopped(i))),
            }
        })
        .await;
        r.map_err(|e| match e {
            RetryError::Stopped(interrupted)
            | RetryError::Permanent(Fault::Stopped(interrupted)) => ImdsError::Interrupted {
                what: what.into(),
                interrupted,
            },
            RetryError::Permanent(Fault::Disabled) => ImdsError::Disabled,
            RetryError::Permanent(f) => ImdsError::Rejected {
                what: what.into(),
                reason: f.to_string(),
            },
            RetryError::Exhausted {
                last,
                attempts,
                elapsed,
            } => ImdsError::Exhausted {
                what: what.into(),
                last: last.to_string(),
                attempts,
                elapsed,
            },
        })
    }

    async fn attempt(&self, path: &str, t: retry::Try) -> Step<Option<Vec<u8>>> {
        let timeout = ATTEMPT_TIMEOUT
            .min(t.remaining())
            .max(Duration::from_millis(1));
        let (token, fresh) = self.token(timeout).await?;
        let reply = self
            .http
            .get(format!("{}{path}", self.base))
            .header(TOKEN_HEADER, token)
            .timeout(timeout)
            .send()
            .await
            .map_err(transport)?;
        let status = reply.status();
        match status {
            StatusCode::OK => Ok(Some(body(reply).await?)),
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::UNAUTHORIZED => {
                *self.token.lock().await = None;
                // A cached token expired or was revoked: fetch a new one at
                // once. If even a brand-new token is refused, back off.
                let after = (!fresh).then_some(Duration::ZERO);
                Err(Attempt::Retry {
                    error: Fault::Transient("401: session token rejected".into()),
                    after,
                })
            }
            s => Err(classify(&format!("HTTP {s}"), s, retry_after(&reply))),
        }
    }

    /// The cached token, or a new one; `true` when it was just fetched.
    async fn token(&self, timeout: Duration) -> Step<(String, bool)> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref().filter(|t| Instant::now() < t.renew_at) {
            return Ok((t.value.clone(), false));
        }
        let reply = self
            .http
            .put(format!("{}{TOKEN_PATH}", self.base))
            .header(TTL_HEADER, TOKEN_TTL.to_string())
            .timeout(timeout)
            .send()
            .await
            .map_err(transport)?;
        match reply.status() {
            StatusCode::OK => {}
            StatusCode::FORBIDDEN => return Err(Attempt::Fail(Fault::Disabled)),
            s => {
                return Err(classify(
                    &format!("token: HTTP {s}"),
                    s,
                    retry_after(&reply),
                ));
            }
        }
        // What IMDS says it granted; never more than the six hours asked
        // for, whatever the header says (a huge value would overflow the
        // clock below).
        let ttl = reply
            .headers()
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(TOKEN_TTL)
            .min(TOKEN_TTL);
        let value = String::from_utf8(body(reply).await?)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or(Attempt::retry(Fault::Transient(
                "token: reply is not a token".into(),
            )))?;
        let lifetime = Duration::from_secs(ttl)
            .saturating_sub(TOKEN_MARGIN)
            .max(Duration::from_secs(1));
        *cached = Some(Token {
            value: value.clone(),
            renew_at: Instant::now() + lifetime,
        });
        Ok((value, true))
    }
}

fn classify(what: &str, status: StatusCode, after: Option<Duration>) -> Attempt<Fault> {
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        Attempt::Retry {
            error: Fault::Transient(what.to_owned()),
            after,
        }
    } else {
        Attempt::Fail(Fault::Rejected(format!("unexpected {what}")))
    }
}

fn retry_after(reply: &reqwest::Response) -> Option<Duration> {
    let v = reply
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Connection refused, reset, timeouts: IMDS may not be up yet.
fn transport(e: reqwest::Error) -> Attempt<Fault> {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "connection failed"
    };
    Attempt::retry(Fault::Transient(format!("{kind}: {}", error_chain(&e))))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let msg = inner.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = inner.source();
    }
    s
}

async fn body(mut reply: reqwest::Response) -> Step<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = reply.chunk().await.map_err(transport)? {
        if out.len() + chunk.len() > MAX_BODY {
            return Err(Attempt::Fail(Fault::Rejected(format!(
                "reply larger than {} KiB",
                MAX_BODY / 1024
            ))));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
