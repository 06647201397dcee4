//! The fleet's SSM parameter: one `GetParameter` (with decryption) through
//! aws-sdk-ssm, credentials from the SDK's default chain (on EC2, the
//! instance role through IMDS). The SDK's own retries are off so that the
//! agent's one retry loop owns the step's budget.

use crate::aws::{self, ReplyTooLarge, SetupError};
use crate::retry::{self, Attempt, Backoff, RetryError};
use crate::settings::ParameterName;
use crate::text;
use aws_sdk_ssm::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ssm::operation::get_parameter::GetParameterError;
use aws_sdk_ssm::types::ParameterType;
use std::time::Duration;

const NEEDS: &str = "the instance role needs ssm:GetParameter on this parameter, \
                     and kms:Decrypt on its KMS key if it is a SecureString";

/// A parameter's value. Not `Display`/`Debug`: a SecureString must never
/// reach a log line by accident.
pub struct Value(String);

impl Value {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

pub struct Parameter {
    pub value: Value,
    pub version: i64,
    /// SecureString: its value is secret everywhere.
    pub secure: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SsmError {
    #[error(
        "SSM parameter {name} was not found in {region} ({code}): create it, or fix `ssm-parameter`"
    )]
    NotFound {
        name: String,
        region: String,
        code: String,
    },
    #[error("access to SSM parameter {name} in {region} was denied ({code}): {NEEDS}")]
    Denied {
        name: String,
        region: String,
        code: String,
    },
    #[error("SSM parameter {name} in {region}: {message}")]
    Rejected {
        name: String,
        region: String,
        message: String,
    },
    #[error(
        "no CA certificates found ({detail}): the agent cannot verify AWS's TLS certificates to read \
         SSM parameter {name}; install CA certificates (NixOS: security.pki), or point SSL_CERT_FILE \
         at a bundle"
    )]
    NoCaCertificates { name: String, detail: String },
    #[error("SSM parameter {name}: {reason}")]
    Setup { name: String, reason: String },
    #[error("SSM parameter {name}: {interrupted}")]
    Interrupted {
        name: String,
        interrupted: crate::stop::Interrupted,
    },
    #[error("SSM parameter {name} in {region}: gave up after {attempts} attempts in {:.1}s: {last}", elapsed.as_secs_f64())]
    Exhausted {
        name: String,
        region: String,
        last: String,
        attempts: u32,
        elapsed: Duration,
    },
}

enum Fault {
    NotFound(String),
    Denied(String),
    Rejected(String),
    Transient(String),
    Stopped(crate::stop::Interrupted),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::NotFound(s) | Fault::Denied(s) | Fault::Rejected(s) | Fault::Transient(s) => {
                f.write_str(s)
            }
            Fault::Stopped(i) => write!(f, "{i}"),
        }
    }
}

pub struct Ssm {
    client: aws_sdk_ssm::Client,
    region: String,
    backoff: Backoff,
}

impl Ssm {
    /// `imds_endpoint` is the agent's effective IMDS endpoint, given to the
    /// SDK's instance-role provider so both clients talk to the same place.
    /// The SSM endpoint follows the SDK's `AWS_ENDPOINT_URL_SSM` /
    /// `AWS_ENDPOINT_URL`.
    pub async fn new(
        name: &ParameterName,
        region: &str,
        imds_endpoint: &str,
        backoff: Backoff,
    ) -> Result<Self, SsmError> {
        let sdk = aws::sdk_config(&aws::Options::agent(region, imds_endpoint, backoff))
            .await
            .map_err(|e| match e {
                SetupError::NoCaCertificates(detail) => SsmError::NoCaCertificates {
                    name: name.as_str().to_owned(),
                    detail,
                },
                e => SsmError::Setup {
                    name: name.as_str().to_owned(),
                    reason: e.to_string(),
                },
            })?;
        let config = aws_sdk_ssm::config::Builder::from(&sdk)
            .interceptor(aws::REPLY_LIMIT)
            .build();
        Ok(Self {
            client: aws_sdk_ssm::Client::from_conf(config),
            region: region.to_owned(),
            backoff,
        })
    }

    pub async fn get(&self, name: &ParameterName) -> Result<Parameter, SsmError> {
        let what = format!("SSM parameter {}", name.as_str());
        // No program runs here: an attempt in flight ends with a stop.
        let r = retry::retry(&self.backoff, &what, |_| async move {
            match crate::stop::or_stop(self.attempt(name)).await {
                Ok(r) => r,
                Err(i) => Err(Attempt::Fail(Fault::Stopped(i))),
            }
        })
        .await;
        let (n, region) = (name.as_str().to_owned(), self.region.clone());
        r.map_err(|e| match e {
            RetryError::Stopped(interrupted)
            | RetryError::Permanent(Fault::Stopped(interrupted)) => SsmError::Interrupted {
                name: n,
                interrupted,
            },
            RetryError::Permanent(Fault::NotFound(code)) => SsmError::NotFound {
                name: n,
                region,
                code,
            },
            RetryError::Permanent(Fault::Denied(code)) => SsmError::Denied {
                name: n,
                region,
                code,
            },
            RetryError::Permanent(f) => SsmError::Rejected {
                name: n,
                region,
                message: f.to_string(),
            },
            RetryError::Exhausted {
                last,
                attempts,
                elapsed,
            } => SsmError::Exhausted {
                name: n,
                region,
                last: last.to_string(),
                attempts,
                elapsed,
            },
        })
    }

    async fn attempt(&self, name: &ParameterName) -> Result<Parameter, Attempt<Fault>> {
        let out = self
            .client
            .get_parameter()
            .name(name.as_str())
            .with_decryption(true)
            .send()
            .await
            .map_err(classify)?;
        let p = out
            .parameter
            .ok_or_else(|| Attempt::Fail(Fault::Rejected("the reply holds no parameter".into())))?;
        // A reply about another parameter is not this parameter's value
        // (a misrouted or hostile endpoint).
        if let Some(got) = p.name.as_deref().filter(|got| !name.matches_reply(got)) {
            return Err(Attempt::Fail(Fault::Rejected(format!(
                "the reply names another parameter, {}",
                text::shown(got, 200)
            ))));
        }
        let secure = p.r#type == Some(ParameterType::SecureString);
        let value = p
            .value
            .ok_or_else(|| Attempt::Fail(Fault::Rejected("the parameter has no value".into())))?;
        Ok(Parameter {
            value: Value(value),
            version: p.version,
            secure,
        })
    }
}

fn classify(e: SdkError<GetParameterError>) -> Attempt<Fault> {
    // Bounded, and never the reply's body: a 200 that does not parse holds
    // the decrypted value of a SecureString.
    let detail = aws::describe(&e);
    match &e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = text::shown(se.err().code().unwrap_or("unknown error"), 100);
            match se.err() {
                GetParameterError::ParameterNotFound(_)
                | GetParameterError::ParameterVersionNotFound(_) => {
                    Attempt::Fail(Fault::NotFound(code))
                }
                GetParameterError::InvalidKeyId(_) => Attempt::Fail(Fault::Denied(code)),
                GetParameterError::InternalServerError(_) => Attempt::retry(Fault::Transient(code)),
                _ if is_throttling(&code) || status >= 500 => {
                    Attempt::retry(Fault::Transient(format!("{code} (HTTP {status})")))
                }
                _ if is_denied(&code) || status == 403 => Attempt::Fail(Fault::Denied(code)),
                _ => Attempt::Fail(Fault::Rejected(detail)),
            }
        }
        SdkError::ResponseError(_) if aws::find_in_chain::<ReplyTooLarge>(&e).is_some() => {
            Attempt::Fail(Fault::Rejected(detail))
        }
        // Network, timeouts, and credentials not yet available from IMDS
        // early in boot: all may heal.
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Attempt::retry(Fault::Transient(detail))
        }
        _ if detail.contains("credentials") => Attempt::retry(Fault::Transient(detail)),
        _ => Attempt::Fail(Fault::Rejected(detail)),
    }
}

pub(crate) fn is_throttling(code: &str) -> bool {
    matches!(
        code,
        "ThrottlingException"
            | "Throttling"
            | "TooManyRequestsException"
            | "RequestLimitExceeded"
            | "RequestThrottled"
    )
}

pub(crate) fn is_denied(code: &str) -> bool {
    matches!(
        code,
        "AccessDeniedException"
            | "AccessDenied"
            | "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "ExpiredTokenException"
            | "KMSAccessDeniedException"
            | "IncompleteSignature"
            | "InvalidSignatureException"
    )
}
