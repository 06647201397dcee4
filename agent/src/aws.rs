//! The AWS SDK set-up every client shares (SSM for the target, STS for
//! `doctor`): rustls with ring, credentials from the default chain with
//! the instance-role provider on the agent's own IMDS endpoint, timeouts
//! sized to the step's budget, and the SDK's retries off so that the
//! agent's one retry loop owns the budget.
//!
//! And what the SDK does not bound on its own: the size of a reply it
//! reads ([`ReplyLimit`], an interceptor every client adds), and the text
//! of its errors ([`describe`]), which must never carry a reply's body (a
//! SecureString's decrypted value would be in it) nor grow with it.

use crate::imds::Imds;
use crate::retry::Backoff;
use crate::text;
use aws_config::BehaviorVersion;
use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::environment::credentials::EnvironmentVariableCredentialsProvider;
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::provider_config::ProviderConfig;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_ssm::config::Region;
use aws_sdk_ssm::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls::{Provider, TlsContext, TrustStore, rustls_provider::CryptoMode};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextMut;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::config_bag::ConfigBag;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http_body_util::BodyExt as _;
use rustls_pki_types::CertificateDer;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    /// The SDK's TLS set-up would otherwise fail only at the first
    /// request, with an opaque certificate error (or a panic in debug
    /// builds).
    #[error("no CA certificates found ({0})")]
    NoCaCertificates(String),
    #[error("the IMDS endpoint {endpoint} is not usable by the AWS SDK: {reason}")]
    ImdsEndpoint { endpoint: String, reason: String },
}

/// What differs between the programs that share this set-up.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    pub region: &'a str,
    /// The agent's own IMDS endpoint and retry policy, for the instance
    /// role's credentials, read by the agent's own IMDS client (see
    /// [`crate::role`]); static credentials from the environment still
    /// come first. `None`: the SDK's default credential chain as it is
    /// (environment, profile, web identity, SSO, the instance role), for
    /// tools run by operators or CI.
    pub imds: Option<(&'a str, Backoff)>,
    /// One attempt; a hung attempt must leave time for the next one.
    pub attempt_timeout: Duration,
    /// One operation, all attempts (the SDK's own retries are off).
    pub operation_timeout: Duration,
}

impl<'a> Options<'a> {
    /// The agent's: timeouts sized to a step's retry budget.
    pub fn agent(region: &'a str, imds_endpoint: &'a str, backoff: Backoff) -> Self {
        let attempt = (backoff.budget / 3).clamp(Duration::from_secs(1), Duration::from_secs(10));
        Self {
            region,
            imds: Some((imds_endpoint, Backoff::imds(backoff.budget))),
            attempt_timeout: attempt,
            operation_timeout: attempt,
        }
    }
}

/// The SDK configuration every client of the workspace is built from:
/// rustls with ring and the system's CA certificates read once, explicit
/// timeouts (the SDK has none for reading a reply), the SDK's retries off
/// (each caller's one retry loop owns the budget).
pub async fn sdk_config(o: &Options<'_>) -> Result<aws_config::SdkConfig, SetupError> {
    let trust = system_trust_store().map_err(SetupError::NoCaCertificates)?;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .tls_context(
            TlsContext::builder()
                .with_trust_store(trust)
                .build()
                .map_err(|e| SetupError::NoCaCertificates(e.to_string()))?,
        )
        .build_https();
    let region = Region::new(o.region.to_owned());
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3).min(o.attempt_timeout))
        .operation_attempt_timeout(o.attempt_timeout)
        .operation_timeout(o.operation_timeout)
        .build();
    let credentials = match o.imds {
        Some((endpoint, backoff)) => SharedCredentialsProvider::new(
            CredentialsProviderChain::first_try(
                "Environment",
                EnvironmentVariableCredentialsProvider::new(),
            )
            .or_else(
                "InstanceRole",
                crate::role::RoleCredentials::new(Arc::new(Imds::new(endpoint, backoff))),
            ),
        ),
        None => {
            let provider = ProviderConfig::without_region()
                .with_http_client(http.clone())
                .with_region(Some(region.clone()));
            SharedCredentialsProvider::new(
                DefaultCredentialsChain::builder()
                    .configure(provider)
                    .region(region.clone())
                    .build()
                    .await,
            )
        }
    };
    Ok(aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .region(region)
        .credentials_provider(credentials)
        .retry_config(RetryConfig::disabled())
        .timeout_config(timeouts)
        .load()
        .await)
}

/// Caps the body of every reply an SDK client reads: the SDK itself reads
/// a whole reply into memory, however large or endless it is. A reply
/// over the limit fails the attempt with [`ReplyTooLarge`] (in the error's
/// source chain), a permanent fault: no AWS API the agent calls answers
/// with more than a few KiB.
#[derive(Debug, Clone, Copy)]
pub struct ReplyLimit(pub usize);

/// SSM's GetParameter and STS's GetCallerIdentity answer with far less.
pub const REPLY_LIMIT: ReplyLimit = ReplyLimit(64 << 10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the reply is larger than {} KiB", limit / 1024)]
pub struct ReplyTooLarge {
    pub limit: usize,
}

impl Intercept for ReplyLimit {
    fn name(&self) -> &'static str {
        "ReplyLimit"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let limit = self.0;
        let response = context.response_mut();
        if response
            .body()
            .content_length()
            .is_some_and(|n| n > limit as u64)
        {
            return Err(Box::new(ReplyTooLarge { limit }));
        }
        let body = response.take_body();
        // Counted as it is read: a chunked or endless reply stops here.
        *response.body_mut() = SdkBody::from_body_1_x(
            http_body_util::Limited::new(body, limit).map_err(move |e| -> BoxError {
                if e.is::<http_body_util::LengthLimitError>() {
                    Box::new(ReplyTooLarge { limit })
                } else {
                    e
                }
            }),
        );
        Ok(())
    }
}

/// One line about an SDK error, bounded, that never quotes a reply's body:
/// the service's error code, HTTP status and (cut, escaped) message for a
/// service error; the status and size for a reply that could not be read
/// or parsed; the cause for a request that could not be sent. The SDK's
/// own rendering (`DisplayErrorContext`) appends the raw reply, body and
/// all: a SecureString's decrypted value when a 200 reply does not parse.
pub fn describe<E>(e: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    const MAX_MESSAGE: usize = 300;
    match e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or("unknown error");
            let message = se.err().message().unwrap_or("no message");
            format!(
                "{} (HTTP {status}): {}",
                text::shown(code, 100),
                text::shown(message, MAX_MESSAGE)
            )
        }
        SdkError::ResponseError(re) => {
            let raw = re.raw();
            let size = raw
                .body()
                .bytes()
                .map(|b| format!("{} bytes", b.len()))
                .unwrap_or_else(|| "body not read".into());
            if let Some(big) = find_in_chain::<ReplyTooLarge>(e) {
                format!("HTTP {} reply refused: {big}", raw.status().as_u16())
            } else {
                format!(
                    "the HTTP {} reply ({size}) could not be read or parsed",
                    raw.status().as_u16()
                )
            }
        }
        SdkError::TimeoutError(_) => "timed out".into(),
        SdkError::DispatchFailure(d) => {
            let kind = if d.is_timeout() {
                "timed out"
            } else if d.is_io() {
                "connection failed"
            } else {
                "the request could not be sent"
            };
            format!("{kind}: {}", text::shown(&chain(e), MAX_MESSAGE))
        }
        // Local: the request could not be built (no credentials yet, a bad
        // endpoint). Their messages name no reply.
        _ => text::shown(&chain(e), MAX_MESSAGE),
    }
}

/// One attempt's failure, for the retry loop: throttling, 5xx, timeouts
/// and the network may heal; a denial is permanent and gets `denied_hint`
/// (the permission the caller needs).
pub fn attempt<E>(e: SdkError<E, HttpResponse>, denied_hint: &str) -> crate::retry::Attempt<String>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    use crate::retry::Attempt;
    let detail = describe(&e);
    match &e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or_default();
            if crate::ssm::is_throttling(code) || status >= 500 {
                Attempt::retry(detail)
            } else if crate::ssm::is_denied(code) || status == 403 {
                Attempt::Fail(format!("{detail}; {denied_hint}"))
            } else {
                Attempt::Fail(detail)
            }
        }
        SdkError::ResponseError(_) if find_in_chain::<ReplyTooLarge>(&e).is_some() => {
            Attempt::Fail(detail)
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Attempt::retry(detail)
        }
        _ if detail.contains("credentials") => Attempt::retry(detail),
        _ => Attempt::Fail(detail),
    }
}

/// The error's sources, joined, without the raw reply `DisplayErrorContext`
/// adds.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = String::new();
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let msg = err.to_string();
        if !s.contains(&msg) {
            if !s.is_empty() {
                s.push_str(": ");
            }
            s.push_str(&msg);
        }
        cur = err.source();
    }
    s
}

/// The first error of type `T` in `e`'s source chain.
pub fn find_in_chain<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// The system's CA certificates (`SSL_CERT_FILE`/`SSL_CERT_DIR`, else the
/// distribution's bundle and directory), read once. Left to itself the SDK
/// reads them a second time: a walk over a few hundred files and PEM
/// blocks that cost a third of a no-op SSM run. Duplicates are dropped,
/// and so is any certificate that is not a usable trust anchor, because
/// the SDK's trust store panics on one.
fn system_trust_store() -> Result<TrustStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let pem = trust_anchors_pem(&found.certs);
    if pem.is_empty() {
        return Err(match found.errors.first() {
            Some(e) => e.to_string(),
            None if found.certs.is_empty() => "the system's certificate store is empty".into(),
            None => "none of the system's certificates is a usable trust anchor".into(),
        });
    }
    Ok(TrustStore::empty().with_pem_certificate(pem))
}

fn trust_anchors_pem(certs: &[CertificateDer<'_>]) -> String {
    let mut seen = HashSet::new();
    let mut pem = String::new();
    for cert in certs {
        if !seen.insert(cert.as_ref()) || webpki::anchor_from_trusted_cert(cert).is_err() {
            continue;
        }
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = STANDARD.encode(cert.as_ref());
        // Base64 is ASCII, so every 64-byte chunk is a whole str.
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    fn cert(name: &str) -> CertificateDer<'static> {
        rcgen::generate_simple_self_signed(vec![name.to_owned()])
            .unwrap()
            .cert
            .der()
            .clone()
    }

    fn parse(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn anchors_round_trip_through_pem_once_each() {
        let (a, b) = (cert("a.example"), cert("b.example"));
        let pem = trust_anchors_pem(&[a.clone(), b.clone(), a.clone()]);
        assert_eq!(parse(&pem), [a, b]);
        assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
    }

    /// The SDK's trust store panics on a certificate it cannot parse; a
    /// broken file in /etc/ssl/certs must not take the agent down.
    #[test]
    fn unusable_certificates_are_left_out() {
        let good = cert("good.example");
        let garbage = CertificateDer::from(b"\x30\x03\x02\x01\x00".to_vec());
        let pem = trust_anchors_pem(&[garbage, good.clone()]);
        assert_eq!(parse(&pem), [good]);
        assert!(trust_anchors_pem(&[CertificateDer::from(vec![0u8; 8])]).is_empty());
    }
}
