//! The AWS SDK set-up every client shares (SSM for the target, STS for
//! `doctor`): rustls with ring, credentials from the default chain with
//! the instance-role provider on the agent's own IMDS endpoint, timeouts
//! sized to the step's budget, and the SDK's retries off so that the
//! agent's one retry loop owns the budget.

use crate::retry::Backoff;
use aws_config::BehaviorVersion;
use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::provider_config::ProviderConfig;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ssm::config::Region;
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use std::time::Duration;

/// Fails (with the reason) when the system has no CA certificates: the
/// SDK's TLS set-up would otherwise fail only at the first request, with
/// an opaque certificate error (or a panic in debug builds).
pub async fn sdk_config(
    region: &str,
    imds_endpoint: &str,
    backoff: Backoff,
) -> Result<aws_config::SdkConfig, String> {
    let roots = rustls_native_certs::load_native_certs();
    if roots.certs.is_empty() {
        return Err(match roots.errors.first() {
            Some(e) => e.to_string(),
            None => "the system's certificate store is empty".into(),
        });
    }
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let region = Region::new(region.to_owned());
    // A hung attempt must leave budget for the next one.
    let attempt = (backoff.budget / 3).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3).min(attempt))
        .operation_attempt_timeout(attempt)
        .operation_timeout(attempt)
        .build();
    let provider = ProviderConfig::without_region()
        .with_http_client(http.clone())
        .with_region(Some(region.clone()));
    let imds = aws_config::imds::Client::builder()
        .configure(&provider)
        .endpoint(imds_endpoint)
        .expect("the IMDS endpoint was validated with the config")
        .build();
    let credentials = DefaultCredentialsChain::builder()
        .configure(provider)
        .region(region.clone())
        .imds_client(imds)
        .build()
        .await;
    Ok(aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .region(region)
        .credentials_provider(credentials)
        .retry_config(RetryConfig::disabled())
        .timeout_config(timeouts)
        .load()
        .await)
}
