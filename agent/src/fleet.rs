//! `fleet status`, the effects: what SSM holds about a fleet, read with
//! the operator's own credentials (the SDK's default chain, as
//! `nixos-ami-publish` uses). The judgement is
//! `nixos_ami_agent_core::fleet`.
//!
//! Calls: `ListResourceComplianceSummaries` (50 instances a page, the
//! whole fleet), `DescribeInstanceInformation` with a tag filter (with
//! `--tag`), `GetParameter` without decryption (with `--parameter`), and
//! `ListComplianceItems` for at most [`MAX_DETAILS`] instances (one per
//! group and those not converged). Each is retried when throttled.

use crate::aws;
use crate::retry::{self, Backoff, RetryError};
use aws_sdk_ssm::types::{
    ComplianceQueryOperatorType, ComplianceStatus, ComplianceStringFilter,
    InstanceInformationStringFilter, ParameterType,
};
use nixos_ami_agent_core::compliance::{COMPLIANCE_TYPE, ITEM_ID};
use nixos_ami_agent_core::fleet::{self, Details, Parameter, Summary};
use std::collections::HashMap;
use std::time::Duration;

pub const MAX_DETAILS: usize = 50;

/// What failed, and whether trying again later may help.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FleetError {
    pub message: String,
    pub transient: bool,
}

pub struct Query<'a> {
    pub region: &'a str,
    pub parameter: Option<&'a str>,
    pub tag: Option<(&'a str, &'a str)>,
}

/// The agent's reports, not other compliance types'.
fn ours() -> ComplianceStringFilter {
    ComplianceStringFilter::builder()
        .key("ComplianceType")
        .values(COMPLIANCE_TYPE)
        .r#type(ComplianceQueryOperatorType::Equal)
        .build()
}

pub struct Fleet {
    client: aws_sdk_ssm::Client,
    backoff: Backoff,
}

impl Fleet {
    pub async fn new(region: &str) -> Result<Self, FleetError> {
        let sdk = aws::sdk_config(&aws::Options {
            region,
            imds: None,
            attempt_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(30),
        })
        .await
        .map_err(|e| FleetError {
            message: e.to_string(),
            transient: false,
        })?;
        Ok(Self {
            client: aws_sdk_ssm::Client::from_conf(
                aws_sdk_ssm::config::Builder::from(&sdk)
                    .interceptor(aws::REPLY_LIMIT)
                    .build(),
            ),
            backoff: Backoff::with_budget(Duration::from_secs(60)),
        })
    }

    pub async fn status(&self, q: &Query<'_>) -> Result<fleet::View, FleetError> {
        let summaries = self.summaries().await?;
        let tagged = match q.tag {
            Some((k, v)) => Some(self.tagged(k, v).await?),
            None => None,
        };
        let parameter = match q.parameter {
            Some(name) => Some(self.parameter(name).await?),
            None => None,
        };
        let listed = fleet::listed(&summaries, parameter.as_ref(), tagged.as_deref());
        // Titles and targets only: without them the view still stands.
        let mut details = HashMap::new();
        for id in fleet::wanted_details(&listed, MAX_DETAILS) {
            match self.details(&id).await {
                Ok(Some(d)) => {
                    details.insert(id, d);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("reasons and targets not shown: {e}");
                    break;
                }
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Ok(fleet::view(fleet::Inputs {
            summaries: &summaries,
            parameter: parameter.as_ref(),
            tagged: tagged.as_deref(),
            details: &details,
            now,
        }))
    }

    async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, FleetError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, retry::Attempt<String>>>,
    {
        // On an instance, credentials may be late (the role's come from
        // IMDS); on an operator's machine, missing ones stay missing.
        let op = || {
            let fut = op();
            async move {
                match fut.await {
                    Err(retry::Attempt::Retry { error, .. }) if error.contains("credentials") => {
                        Err(retry::Attempt::Fail(format!(
                            "{error}; no AWS credentials: set AWS_PROFILE, run `aws sso login`, or \
                             export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                        )))
                    }
                    other => other,
                }
            }
        };
        retry::retry(&self.backoff, what, |_| op())
            .await
            .map_err(|e| match e {
                RetryError::Permanent(m) => FleetError {
                    message: format!("{what}: {m}"),
                    transient: false,
                },
                RetryError::Exhausted {
                    last,
                    attempts,
                    elapsed,
                } => FleetError {
                    message: format!(
                        "{what}: gave up after {attempts} attempts in {:.0}s: {last}",
                        elapsed.as_secs_f64()
                    ),
                    transient: true,
                },
                RetryError::Stopped(i) => FleetError {
                    message: format!("{what}: {i}"),
                    transient: true,
                },
            })
    }

    async fn summaries(&self) -> Result<Vec<Summary>, FleetError> {
        let filter = ours();
        let mut out = vec![];
        let mut token: Option<String> = None;
        loop {
            let page = self
                .call("SSM ListResourceComplianceSummaries", || {
                    let req = self
                        .client
                        .list_resource_compliance_summaries()
                        .filters(filter.clone())
                        .max_results(50)
                        .set_next_token(token.clone());
                    async move {
                        req.send().await.map_err(|e| {
                            aws::attempt(e, "you need ssm:ListResourceComplianceSummaries")
                        })
                    }
                })
                .await?;
            for item in page.resource_compliance_summary_items() {
                let (Some(id), Some(exec)) = (item.resource_id(), item.execution_summary()) else {
                    continue;
                };
                out.push(Summary {
                    instance_id: crate::text::shown(id, 100),
                    compliant: item.status() == Some(&ComplianceStatus::Compliant),
                    severity: item
                        .overall_severity()
                        .map_or("UNSPECIFIED", |s| s.as_str())
                        .to_owned(),
                    reported_at: exec.execution_time().as_secs_f64(),
                    execution_id: crate::text::shown(exec.execution_id().unwrap_or_default(), 120),
                });
            }
            token = page.next_token().map(str::to_owned);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    async fn tagged(&self, key: &str, value: &str) -> Result<Vec<String>, FleetError> {
        let filter = InstanceInformationStringFilter::builder()
            .key(format!("tag:{key}"))
            .values(value)
            .build()
            .map_err(|e| FleetError {
                message: e.to_string(),
                transient: false,
            })?;
        let mut out = vec![];
        let mut token: Option<String> = None;
        loop {
            let page = self
                .call("SSM DescribeInstanceInformation", || {
                    let req = self
                        .client
                        .describe_instance_information()
                        .filters(filter.clone())
                        .max_results(50)
                        .set_next_token(token.clone());
                    async move {
                        req.send().await.map_err(|e| {
                            aws::attempt(e, "you need ssm:DescribeInstanceInformation")
                        })
                    }
                })
                .await?;
            out.extend(
                page.instance_information_list()
                    .iter()
                    .filter_map(|i| i.instance_id().map(|id| crate::text::shown(id, 100))),
            );
            token = page.next_token().map(str::to_owned);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    /// Without decryption: a SecureString is shown as its placeholder,
    /// and the operator needs no kms:Decrypt.
    async fn parameter(&self, name: &str) -> Result<Parameter, FleetError> {
        let out = self
            .call("SSM GetParameter", || {
                let req = self
                    .client
                    .get_parameter()
                    .name(name)
                    .with_decryption(false);
                async move {
                    req.send()
                        .await
                        .map_err(|e| aws::attempt(e, "you need ssm:GetParameter"))
                }
            })
            .await?;
        let p = out.parameter().ok_or_else(|| FleetError {
            message: format!("SSM parameter {name}: the reply holds no parameter"),
            transient: false,
        })?;
        let value = if p.r#type() == Some(&ParameterType::SecureString) {
            crate::redact::Redactor::placeholder(name)
        } else {
            crate::text::shown(p.value().unwrap_or_default().trim(), 500)
        };
        Ok(Parameter {
            name: name.to_owned(),
            version: p.version(),
            value,
        })
    }

    async fn details(&self, instance_id: &str) -> Result<Option<Details>, FleetError> {
        let filter = ours();
        let out = self
            .call("SSM ListComplianceItems", || {
                let req = self
                    .client
                    .list_compliance_items()
                    .resource_ids(instance_id)
                    .resource_types(nixos_ami_agent_core::compliance::RESOURCE_TYPE)
                    .filters(filter.clone())
                    .max_results(50);
                async move {
                    req.send()
                        .await
                        .map_err(|e| aws::attempt(e, "you need ssm:ListComplianceItems"))
                }
            })
            .await?;
        Ok(out
            .compliance_items()
            .iter()
            .find(|i| i.id() == Some(ITEM_ID))
            .map(|i| {
                let detail = |k: &str| {
                    i.details()
                        .and_then(|d| d.get(k))
                        .map(|v| crate::text::shown(v, 500))
                };
                Details {
                    title: crate::text::shown(i.title().unwrap_or_default(), 500),
                    target: detail("Target"),
                    store_path: detail("StorePath"),
                }
            }))
    }
}
