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
use aws_smithy_http_client::tls::{Provider, TlsContext, TrustStore, rustls_provider::CryptoMode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::CertificateDer;
use std::collections::HashSet;
use std::time::Duration;

/// Fails (with the reason) when the system has no CA certificates: the
/// SDK's TLS set-up would otherwise fail only at the first request, with
/// an opaque certificate error (or a panic in debug builds).
pub async fn sdk_config(
    region: &str,
    imds_endpoint: &str,
    backoff: Backoff,
) -> Result<aws_config::SdkConfig, String> {
    let trust = system_trust_store()?;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .tls_context(
            TlsContext::builder()
                .with_trust_store(trust)
                .build()
                .map_err(|e| e.to_string())?,
        )
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
