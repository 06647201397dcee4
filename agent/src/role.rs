//! The instance role's credentials, read with the agent's own IMDS client
//! (IMDSv2 only, no redirects, replies capped at 1 MiB, the step's retry
//! budget) instead of the SDK's, which reads replies without a bound and
//! logs them whole when they do not parse. Nothing a reply holds reaches
//! an error message.

use crate::imds::Imds;
use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, future};
use serde::Deserialize;
use std::sync::Arc;

pub struct RoleCredentials {
    imds: Arc<Imds>,
}

impl std::fmt::Debug for RoleCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoleCredentials")
    }
}

impl RoleCredentials {
    pub fn new(imds: Arc<Imds>) -> Self {
        Self { imds }
    }

    async fn load(&self) -> Result<Credentials, CredentialsError> {
        let role = self
            .imds
            .role_name()
            .await
            .map_err(|e| CredentialsError::provider_error(format!("instance role credentials: {e}")))?
            .ok_or_else(|| {
                CredentialsError::not_loaded(
                    "instance role credentials: no instance profile is attached (IMDS names no role)",
                )
            })?;
        // IAM role names: letters, digits and +=,.@_- (at most 64).
        if role.len() > 64
            || !role
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
        {
            return Err(CredentialsError::provider_error(
                "instance role credentials: IMDS names a role that is not an IAM role name",
            ));
        }
        let body = self
            .imds
            .get(
                &format!("/latest/meta-data/iam/security-credentials/{role}"),
                "instance role credentials",
            )
            .await
            .map_err(|e| {
                CredentialsError::provider_error(format!("instance role credentials: {e}"))
            })?
            .ok_or_else(|| {
                CredentialsError::not_loaded(format!(
                    "instance role credentials: IMDS has none for the role {role}"
                ))
            })?;
        parse(&body).map_err(|why| {
            CredentialsError::provider_error(format!("instance role credentials: {why}"))
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Reply {
    code: String,
    access_key_id: String,
    secret_access_key: String,
    token: String,
    expiration: String,
}

/// The reply's JSON; an error never quotes it (it holds the secret key).
fn parse(body: &[u8]) -> Result<Credentials, String> {
    let r: Reply = serde_json::from_slice(body)
        .map_err(|_| "the reply is not the JSON IMDS sends for a role".to_owned())?;
    if r.code != "Success" {
        return Err(format!(
            "IMDS says {} instead of Success",
            crate::text::shown(&r.code, 40)
        ));
    }
    if r.access_key_id.is_empty() || r.secret_access_key.is_empty() {
        return Err("the reply has no access key".into());
    }
    let expires = humantime::parse_rfc3339_weak(r.expiration.trim().trim_end_matches('Z'))
        .map_err(|_| "the reply's Expiration is not a time".to_owned())?;
    Ok(Credentials::new(
        r.access_key_id,
        r.secret_access_key,
        Some(r.token),
        Some(expires),
        "nixos-ami-agent-imds",
    ))
}

impl ProvideCredentials for RoleCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.load())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_reply_and_never_quotes_it() {
        let ok = br#"{"Code":"Success","LastUpdated":"2026-11-25T00:00:00Z","Type":"AWS-HMAC","AccessKeyId":"ASIAX","SecretAccessKey":"SECRETKEY","Token":"TOKEN","Expiration":"2099-01-01T00:00:00Z"}"#;
        let c = parse(ok).unwrap();
        assert_eq!(c.access_key_id(), "ASIAX");
        assert_eq!(c.session_token(), Some("TOKEN"));
        for bad in [
            &br#"{"Code":"Success","AccessKeyId":"ASIAX","SecretAccessKey":"SECRETKEY","Token":"T","Expiration":"soon"}"#[..],
            br#"{"Code":"Failed","AccessKeyId":"ASIAX","SecretAccessKey":"SECRETKEY","Token":"T","Expiration":"2099-01-01T00:00:00Z"}"#,
            br#"{"Code":"Success","AccessKeyId":5,"SecretAccessKey":"SECRETKEY"}"#,
            b"SECRETKEY not json",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.contains("SECRETKEY") && !e.contains("ASIAX"), "{e}");
        }
    }
}
