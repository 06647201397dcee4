//! The AWS clients of one region, from the workspace's shared set-up
//! (`nixos_ami_agent::aws`: rustls with ring, explicit timeouts, the SDK's
//! retries off), credentials from the SDK's default chain (environment,
//! profile, SSO, GitHub's OIDC web identity, an instance role), and the
//! one retry loop (`nixos_ami_agent::retry`) for what may heal:
//! throttling, 5xx, timeouts, network.

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use nixos_ami_agent::aws::{self as shared, ReplyLimit, ReplyTooLarge, SetupError};
use nixos_ami_agent::retry::{self, Attempt, Backoff, RetryError};
use std::future::Future;
use std::time::Duration;

/// DescribeImages and DescribeSnapshots pages can be large; nothing else
/// the tool reads is.
const EC2_REPLY_LIMIT: ReplyLimit = ReplyLimit(32 << 20);
const SMALL_REPLY_LIMIT: ReplyLimit = ReplyLimit(1 << 20);

#[derive(Clone)]
pub struct Clients {
    pub region: String,
    pub ec2: aws_sdk_ec2::Client,
    pub ebs: aws_sdk_ebs::Client,
    pub ssm: aws_sdk_ssm::Client,
}

impl Clients {
    pub async fn new(region: &str) -> Result<Self, SetupError> {
        let sdk = shared::sdk_config(&shared::Options {
            region,
            imds: None,
            // A 512 KiB block from a slow link; coldsnap's issue #437 is
            // what happens without bounds.
            attempt_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(60),
        })
        .await?;
        Ok(Self {
            region: region.to_owned(),
            ec2: aws_sdk_ec2::Client::from_conf(
                aws_sdk_ec2::config::Builder::from(&sdk)
                    .interceptor(EC2_REPLY_LIMIT)
                    .build(),
            ),
            ebs: aws_sdk_ebs::Client::from_conf(
                aws_sdk_ebs::config::Builder::from(&sdk)
                    .interceptor(SMALL_REPLY_LIMIT)
                    .build(),
            ),
            ssm: aws_sdk_ssm::Client::from_conf(
                aws_sdk_ssm::config::Builder::from(&sdk)
                    .interceptor(SMALL_REPLY_LIMIT)
                    .build(),
            ),
        })
    }
}

/// A failed call, with what was being done and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{region}: {what}: {detail}")]
pub struct CallError {
    pub region: String,
    pub what: String,
    /// The service's error code, when it sent one.
    pub code: Option<String>,
    pub detail: String,
}

/// One attempt's failure, classified.
#[derive(Debug, Clone)]
pub struct Fault {
    pub code: Option<String>,
    pub detail: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

const THROTTLING: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "SlowDown",
    "EC2ThrottledException",
    "PriorRequestNotComplete",
];

/// What may heal is retried: throttling, 5xx, timeouts, the network, a
/// reply that could not be read (not one that was too large).
pub fn classify<E>(e: SdkError<E, HttpResponse>) -> Attempt<Fault>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let detail = shared::describe(&e);
    let code = e.code().map(str::to_owned);
    let transient = match &e {
        SdkError::ServiceError(se) => {
            se.raw().status().is_server_error()
                || code.as_deref().is_some_and(|c| THROTTLING.contains(&c))
        }
        SdkError::ResponseError(_) => shared::find_in_chain::<ReplyTooLarge>(&e).is_none(),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => true,
        // No credentials yet (an expired SSO session does not heal; a web
        // identity being fetched does, within the budget).
        _ => detail.contains("credentials"),
    };
    let fault = Fault { code, detail };
    if transient {
        Attempt::retry(fault)
    } else {
        Attempt::Fail(fault)
    }
}

/// The same call until it works, a permanent error, or the budget is spent.
pub async fn call<T, F, Fut>(
    region: &str,
    what: &str,
    budget: Duration,
    mut op: F,
) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt<Fault>>>,
{
    let backoff = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(10),
        max_retry_after: Duration::from_secs(10),
        budget,
    };
    let label = format!("{region}: {what}");
    retry::retry(&backoff, &label, |_| op()).await.map_err(|e| {
        let (code, detail) = match e {
            RetryError::Permanent(f) => (f.code, f.detail),
            RetryError::Exhausted {
                last,
                attempts,
                elapsed,
            } => (
                last.code,
                format!(
                    "gave up after {attempts} attempts in {:.0}s: {}",
                    elapsed.as_secs_f64(),
                    last.detail
                ),
            ),
            RetryError::Stopped(i) => (None, i.to_string()),
        };
        CallError {
            region: region.to_owned(),
            what: what.to_owned(),
            code,
            detail,
        }
    })
}

/// The usual budget of one call; uploads of blocks have their own.
pub const CALL_BUDGET: Duration = Duration::from_secs(300);
