//! `smoke-test`: launches one instance of an AMI, waits (bounded) for the
//! agent's outcome line on its console (`nixos-ami-agent: run finished at
//! …: OUTCOME (exit N): …`, see the agent's `run::outcome_line`), and
//! terminates it: always, also on failure, timeout, SIGTERM or Ctrl-C.

use crate::aws::{CALL_BUDGET, CallError, Clients, call, classify};
use crate::ec2;
use aws_sdk_ec2::types::{
    HttpTokensState, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, InstanceType,
    ResourceType, TagSpecification,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Options {
    pub image: String,
    pub region: String,
    pub instance_type: Option<String>,
    pub user_data: Option<PathBuf>,
    pub timeout: Duration,
    pub poll: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    pub instance_id: String,
    pub image_id: String,
    /// The agent's outcome line, as the console showed it.
    pub line: Option<String>,
    /// The exit code the line reports.
    pub exit_code: Option<i32>,
    pub terminated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SmokeError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Aws(#[from] CallError),
    #[error("no outcome line on the console of {instance} within {}s (the agent did not finish a run, or the console is not readable); it was terminated", timeout.as_secs())]
    Timeout { instance: String, timeout: Duration },
    #[error("interrupted by {signal}; the instance {instance} was terminated")]
    Interrupted {
        instance: String,
        signal: &'static str,
    },
}

/// The last outcome line in a console log, and its exit code.
pub fn outcome_line(console: &str) -> Option<(String, i32)> {
    let re =
        regex_lite::Regex::new(r"nixos-ami-agent: run finished at \S+: [a-z ]+ \(exit (\d+)\)")
            .expect("a valid pattern");
    console
        .lines()
        .filter_map(|l| {
            let m = re.captures(l)?;
            let code = m.get(1)?.as_str().parse().ok()?;
            // From a serial console: shown escaped, never as typed.
            Some((
                nixos_ami_agent::text::shown(l.trim_end_matches('\r'), 600),
                code,
            ))
        })
        .last()
}

pub async fn run(o: &Options) -> Result<Outcome, SmokeError> {
    let c = Clients::new(&o.region)
        .await
        .map_err(|e| SmokeError::Input(e.to_string()))?;
    let image = resolve_image(&c, &o.image).await?;
    let instance_type = o.instance_type.clone().unwrap_or_else(|| {
        match image.architecture.as_deref() {
            Some("arm64") => "t4g.small",
            _ => "t3.small",
        }
        .to_owned()
    });
    let user_data = match &o.user_data {
        Some(p) => {
            let bytes =
                std::fs::read(p).map_err(|e| SmokeError::Input(format!("{}: {e}", p.display())))?;
            if bytes.len() > 16 << 10 {
                return Err(SmokeError::Input(format!(
                    "{}: EC2 user data is at most 16 KiB",
                    p.display()
                )));
            }
            Some(STANDARD.encode(bytes))
        }
        None => None,
    };
    let token = crate::naming::token(&[&image.id, &format!("{:x}", fastrand::u64(..))]);
    let out = call(&c.region, "RunInstances", CALL_BUDGET, || async {
        c.ec2
            .run_instances()
            .image_id(&image.id)
            .instance_type(InstanceType::from(instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .client_token(&token)
            .set_user_data(user_data.clone())
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(
                        aws_sdk_ec2::types::Tag::builder()
                            .key("Name")
                            .value(format!("nixos-ami-publish smoke test of {}", image.name))
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .map_err(classify)
    })
    .await?;
    let instance = out
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .ok_or_else(|| SmokeError::Input("RunInstances returned no instance".into()))?
        .to_owned();
    tracing::info!(
        "{}: launched {instance} ({instance_type}) from {}",
        c.region,
        image.id
    );

    // Whatever happens next, the instance is terminated.
    let waited = tokio::select! {
        r = wait_for_line(&c, &instance, o) => r,
        signal = interrupted() => Err(SmokeError::Interrupted { instance: instance.clone(), signal }),
    };
    let terminated = terminate(&c, &instance).await;
    match (&waited, &terminated) {
        (_, Err(e)) => tracing::error!(
            "{}: {instance} could not be terminated: {e}; terminate it yourself",
            c.region
        ),
        (_, Ok(())) => tracing::info!("{}: terminated {instance}", c.region),
    }
    let (line, code) = waited?;
    Ok(Outcome {
        instance_id: instance,
        image_id: image.id,
        line: Some(line),
        exit_code: Some(code),
        terminated: terminated.is_ok(),
    })
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = hup.recv() => "SIGHUP",
    }
}

async fn resolve_image(c: &Clients, image: &str) -> Result<ec2::ImageSummary, SmokeError> {
    let found = if image.starts_with("ami-") {
        ec2::image(c, image).await?
    } else {
        ec2::image_named(c, image).await?
    };
    found.ok_or_else(|| {
        SmokeError::Input(format!(
            "{}: no image {image:?} (an AMI id, or the name of one of this account's AMIs)",
            c.region
        ))
    })
}

async fn wait_for_line(
    c: &Clients,
    instance: &str,
    o: &Options,
) -> Result<(String, i32), SmokeError> {
    let start = Instant::now();
    while start.elapsed() < o.timeout {
        let out = call(&c.region, "GetConsoleOutput", CALL_BUDGET, || async {
            c.ec2
                .get_console_output()
                .instance_id(instance)
                .latest(true)
                .send()
                .await
                .map_err(classify)
        })
        .await?;
        let text = out
            .output()
            .and_then(|b| STANDARD.decode(b.trim()).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if let Some((line, code)) = outcome_line(&text) {
            tracing::info!("{}: {instance}: {line}", c.region);
            return Ok((line, code));
        }
        tokio::time::sleep(o.poll).await;
    }
    Err(SmokeError::Timeout {
        instance: instance.to_owned(),
        timeout: o.timeout,
    })
}

async fn terminate(c: &Clients, instance: &str) -> Result<(), CallError> {
    call(
        &c.region,
        &format!("TerminateInstances {instance}"),
        CALL_BUDGET,
        || async {
            c.ec2
                .terminate_instances()
                .instance_ids(instance)
                .send()
                .await
                .map_err(classify)
        },
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_last_outcome_line() {
        let console = "[  OK  ] Reached target Multi-User System.\r\n\
            nixos-ami-agent: run finished at 2026-11-29T10:00:00Z: failed (exit 75): IMDS …\r\n\
            nixos-ami-agent: run finished at 2026-11-29T10:00:09Z: applied (exit 0): applied o/f/1#x\r\n";
        let (line, code) = outcome_line(console).unwrap();
        assert_eq!(code, 0);
        assert!(line.ends_with("applied o/f/1#x"), "{line}");
        assert_eq!(outcome_line("nothing here\nnixos-ami-agent: started"), None);
        let (_, code) =
            outcome_line("nixos-ami-agent: run finished at T: nothing to do (exit 0): x").unwrap();
        assert_eq!(code, 0);
    }
}
