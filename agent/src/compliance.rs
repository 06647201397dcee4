//! Reports each run's outcome to SSM Compliance on this instance
//! (`PutComplianceItems`, type `Custom:NixOSAmiAgent`; what is reported is
//! decided in `nixos_ami_agent_core::compliance`). On with `[agent]
//! report-compliance = true` (the AMI profile's default).
//!
//! Reporting is a side channel: a failure is logged and never changes the
//! run's result or exit code. It is retried within the retry budget when
//! it may heal (throttling, 5xx, network), and what it sends comes from
//! the state file, which never holds a SecureString's value.

use crate::aws;
use crate::config::Config;
use crate::imds::Imds;
use crate::retry::{self, Attempt, Backoff, RetryError};
use crate::state::{State, Store};
use aws_sdk_ssm::primitives::DateTime;
use aws_sdk_ssm::types::{
    ComplianceExecutionSummary, ComplianceItemEntry, ComplianceSeverity, ComplianceStatus,
    ComplianceUploadType,
};
use nixos_ami_agent_core::compliance::{self as core, Report, Run};

/// A finished run's report, to send after its outcome is out.
pub struct Pending {
    pub imds: Imds,
    pub endpoint: String,
    pub store: Store,
    /// The `started` of the record the run saved in the state.
    pub started: String,
    pub result: &'static str,
    pub exit_code: u8,
    pub message: String,
}

impl Pending {
    /// The run's lock is released by now: the state read back is this
    /// run's only if its record is still the last (another run may have
    /// started; it reports for itself).
    pub async fn send(self, config: &Config) {
        report(
            config,
            &self.imds,
            &self.endpoint,
            &self.store,
            Outcome {
                started: &self.started,
                result: self.result,
                exit_code: self.exit_code,
                message: &self.message,
            },
        )
        .await;
    }
}

/// How the run ended, as the history records it.
pub struct Outcome<'a> {
    /// The `started` of the record this run saved in the state.
    pub started: &'a str,
    pub result: &'a str,
    pub exit_code: u8,
    /// The run's own message (the failure's, when it failed), with a
    /// SecureString target already shown as its placeholder.
    pub message: &'a str,
}

pub async fn report(config: &Config, imds: &Imds, endpoint: &str, store: &Store, o: Outcome<'_>) {
    if !config.agent.report_compliance {
        return;
    }
    if crate::stop::requested().is_some() {
        tracing::info!("compliance: not reported, the run was stopped");
        return;
    }
    let state = match store.read() {
        Ok(Some(s)) => s,
        Ok(None) | Err(_) => {
            tracing::info!("compliance: not reported, the state could not be read back");
            return;
        }
    };
    // The record this run saved, not an earlier run's.
    if state.last_run.as_ref().map(|r| r.started.as_str()) != Some(o.started) {
        tracing::info!("compliance: not reported, the state holds another run's record");
        return;
    }
    let Some(report) = build(config, &state, &o) else {
        return;
    };
    // The instance's own region: the one it is a managed node in.
    let region = match imds.region().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("compliance: not reported: {e}");
            return;
        }
    };
    let backoff = Backoff::with_budget(config.agent.retry_budget);
    match put(&state.instance_id, &report, &region, endpoint, backoff).await {
        Ok(()) => tracing::info!(
            compliance = report.status.as_str(),
            "compliance: reported {} to SSM ({})",
            report.status.as_str(),
            core::COMPLIANCE_TYPE
        ),
        Err(e) => tracing::warn!(
            "compliance: the outcome could not be reported to SSM, the run's result stands: {e}"
        ),
    }
}

fn build(config: &Config, state: &State, o: &Outcome<'_>) -> Option<Report> {
    let run = state.last_run.as_ref()?;
    let running = crate::system::canonical(&config.agent.current_system)
        .map(|p| p.to_string_lossy().into_owned());
    let target = run.target.as_ref();
    let health = run.health.as_ref().and_then(|h| {
        serde_json::to_value(h.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
    });
    let finished = run.finished.clone().unwrap_or_else(crate::state::now);
    Some(core::report(&Run {
        result: o.result,
        exit_code: o.exit_code,
        message: o.message,
        target: target.map(|t| t.flake.as_str()),
        ssm_parameter: target.and_then(|t| t.ssm_parameter.as_deref()),
        ssm_version: target.and_then(|t| t.ssm_version),
        action: run.action.map(|a| a.as_str()),
        store_path: run.store_path.as_deref(),
        running: running.as_deref(),
        health: health.as_deref(),
        finished: &finished,
        agent_version: env!("CARGO_PKG_VERSION"),
    }))
}

async fn put(
    instance_id: &str,
    report: &Report,
    region: &str,
    endpoint: &str,
    backoff: Backoff,
) -> Result<(), String> {
    let sdk = aws::sdk_config(&aws::Options::agent(region, endpoint, backoff))
        .await
        .map_err(|e| e.to_string())?;
    let client = aws_sdk_ssm::Client::from_conf(
        aws_sdk_ssm::config::Builder::from(&sdk)
            .interceptor(aws::REPLY_LIMIT)
            .build(),
    );
    let item = ComplianceItemEntry::builder()
        .id(core::ITEM_ID)
        .title(&report.title)
        .severity(ComplianceSeverity::from(report.severity.as_str()))
        .status(ComplianceStatus::from(report.status.as_str()))
        .set_details(Some(
            report
                .details
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        ))
        .build()
        .map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now();
    let summary = ComplianceExecutionSummary::builder()
        .execution_time(DateTime::from(now))
        .execution_id(&report.execution_id)
        .execution_type(core::EXECUTION_TYPE)
        .build()
        .map_err(|e| e.to_string())?;
    let r = retry::retry(&backoff, "SSM PutComplianceItems", |_| {
        let (client, item, summary) = (client.clone(), item.clone(), summary.clone());
        async move {
            let sent = client
                .put_compliance_items()
                .resource_id(instance_id)
                .resource_type(core::RESOURCE_TYPE)
                .compliance_type(core::COMPLIANCE_TYPE)
                .execution_summary(summary)
                .items(item)
                .upload_type(ComplianceUploadType::Complete)
                .send();
            match crate::stop::or_stop(sent).await {
                Ok(Ok(_)) => Ok(()),
                // Early in the first boot the SSM agent may not have
                // registered the instance yet: that heals.
                Ok(Err(e))
                    if e.as_service_error().and_then(|se| se.meta().code())
                        == Some("InvalidResourceId") =>
                {
                    Err(Attempt::retry(format!(
                        "{}; not a managed node (yet): is the SSM agent running, and does the \
                         instance role have AmazonSSMManagedInstanceCore?",
                        aws::describe(&e)
                    )))
                }
                Ok(Err(e)) => Err(aws::attempt(
                    e,
                    "the instance role needs ssm:PutComplianceItems",
                )),
                Err(i) => Err(Attempt::Fail(i.to_string())),
            }
        }
    })
    .await;
    r.map_err(|e| match e {
        RetryError::Permanent(e) => e,
        RetryError::Exhausted {
            last,
            attempts,
            elapsed,
        } => format!(
            "gave up after {attempts} attempts in {:.1}s: {last}",
            elapsed.as_secs_f64()
        ),
        RetryError::Stopped(i) => i.to_string(),
    })
}
