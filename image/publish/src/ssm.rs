//! The AMI ids in SSM parameters, one set per region, like AWS's public
//! parameters for its own AMIs (`/aws/service/…/latest`): Terraform's
//! `data "aws_ssm_parameter"` and launch templates' `resolve:ssm:` find
//! the newest image without knowing its id.

use crate::aws::{CALL_BUDGET, CallError, Clients, call, classify};
use aws_sdk_ssm::types::ParameterType;

/// Writes `value` to `name` (creating or overwriting it), then reads it
/// back: the value must be what was written.
pub async fn put(c: &Clients, name: &str, value: &str, description: &str) -> Result<(), CallError> {
    call(
        &c.region,
        &format!("PutParameter {name}"),
        CALL_BUDGET,
        || async {
            c.ssm
                .put_parameter()
                .name(name)
                .value(value)
                .description(description)
                .r#type(ParameterType::String)
                .overwrite(true)
                .send()
                .await
                .map_err(classify)
        },
    )
    .await?;
    match get(c, name).await? {
        Some(v) if v == value => Ok(()),
        other => Err(CallError {
            region: c.region.clone(),
            what: format!("PutParameter {name}"),
            code: None,
            detail: format!(
                "reads back as {:?}, not {value}",
                other.map(|v| nixos_ami_agent::text::shown(&v, 100))
            ),
        }),
    }
}

/// The parameter's value; `None` when there is none.
pub async fn get(c: &Clients, name: &str) -> Result<Option<String>, CallError> {
    let r = call(
        &c.region,
        &format!("GetParameter {name}"),
        CALL_BUDGET,
        || async {
            c.ssm
                .get_parameter()
                .name(name)
                .send()
                .await
                .map_err(classify)
        },
    )
    .await;
    match r {
        Ok(out) => Ok(out.parameter.and_then(|p| p.value)),
        Err(e) if e.code.as_deref() == Some("ParameterNotFound") => Ok(None),
        Err(e) => Err(e),
    }
}
