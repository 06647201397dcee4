//! `prune`: deregisters the images of a prefix that have been deprecated
//! for longer than a grace period, and deletes their snapshots, in every
//! region; never one that an SSM parameter written by `upload` still
//! points at. Without `--yes` it only says what it would delete.

use crate::aws::Clients;
use crate::ec2::{self, ImageSummary};
use crate::naming;
use serde::Serialize;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone)]
pub struct Options {
    pub prefix: String,
    pub grace: Duration,
    /// `None`: every region enabled for the account.
    pub regions: Option<Vec<String>>,
    pub home_region: String,
    /// Also protect what parameters under this prefix point at (besides
    /// the ones `upload` tagged the image with).
    pub ssm_prefix: Option<String>,
    pub yes: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Pruned {
    pub region: String,
    pub image_id: String,
    pub name: String,
    pub deprecated: String,
    pub snapshots: Vec<String>,
    /// Kept: why (an SSM parameter points at it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<String>,
    pub deleted: bool,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Outcome {
    pub images: Vec<Pruned>,
    pub failed: std::collections::BTreeMap<String, String>,
}

pub async fn run(o: &Options) -> Result<Outcome, String> {
    if o.prefix.is_empty() {
        return Err("--prefix must not be empty: prune only what one prefix names".into());
    }
    let home = Clients::new(&o.home_region)
        .await
        .map_err(|e| e.to_string())?;
    let regions = match &o.regions {
        Some(r) => r.clone(),
        None => ec2::regions(&home).await.map_err(|e| e.to_string())?,
    };
    let mut out = Outcome::default();
    for region in regions {
        match prune_region(o, &region, &mut out).await {
            Ok(()) => {}
            Err(e) => {
                tracing::error!("{region}: {e}");
                out.failed.insert(region, e);
            }
        }
    }
    Ok(out)
}

fn expired(deprecated: &str, grace: Duration, now: SystemTime) -> Result<bool, String> {
    let at = humantime::parse_rfc3339_weak(deprecated.trim_end_matches('Z'))
        .or_else(|_| humantime::parse_rfc3339(deprecated))
        .map_err(|e| format!("deprecation time {deprecated:?} does not parse: {e}"))?;
    Ok(at + grace <= now)
}

async fn prune_region(o: &Options, region: &str, out: &mut Outcome) -> Result<(), String> {
    let c = Clients::new(region).await.map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    let pattern = format!("{}*", o.prefix);
    let images = ec2::images_named(&c, &pattern)
        .await
        .map_err(|e| e.to_string())?;
    for img in images.into_iter().filter(|i| i.name.starts_with(&o.prefix)) {
        let Some(deprecated) = img.deprecation_time.clone() else {
            continue;
        };
        if !expired(&deprecated, o.grace, now)? {
            continue;
        }
        let kept = protected(o, &c, &img).await?;
        let mut p = Pruned {
            region: region.to_owned(),
            image_id: img.id.clone(),
            name: img.name.clone(),
            deprecated,
            snapshots: vec![],
            kept: kept.clone(),
            deleted: false,
        };
        // Only snapshots this tool made: a double or an older image may
        // list others in its mappings.
        let snaps = ec2::snapshots(&c, &img.snapshots)
            .await
            .map_err(|e| e.to_string())?;
        p.snapshots = snaps
            .iter()
            .filter(|s| ec2::snapshot_tag(s, naming::MANAGED_BY.0) == Some(naming::MANAGED_BY.1))
            .filter_map(|s| s.snapshot_id().map(str::to_owned))
            .collect();
        if kept.is_none() && o.yes {
            ec2::deregister(&c, &img.id)
                .await
                .map_err(|e| e.to_string())?;
            for s in &p.snapshots {
                ec2::delete_snapshot(&c, s)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            p.deleted = true;
        }
        out.images.push(p);
    }
    Ok(())
}

/// An SSM parameter that still names the image: it stays.
async fn protected(o: &Options, c: &Clients, img: &ImageSummary) -> Result<Option<String>, String> {
    let mut names: Vec<String> = img
        .tag(naming::PARAMETERS_TAG)
        .map(|v| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if let Some(prefix) = &o.ssm_prefix {
        for n in ["x86_64-linux", "aarch64-linux"] {
            names.push(format!("{}/{n}/latest", prefix.trim_end_matches('/')));
        }
    }
    for n in names {
        if crate::ssm::get(c, &n)
            .await
            .map_err(|e| e.to_string())?
            .as_deref()
            == Some(img.id.as_str())
        {
            return Ok(Some(format!("SSM parameter {n} points at it")));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_with_grace() {
        let now = humantime::parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
        let day = Duration::from_secs(86400);
        assert!(expired("2026-11-01T00:00:00.000Z", day, now).unwrap());
        assert!(!expired("2026-11-30T12:00:00.000Z", day, now).unwrap());
        assert!(expired("2026-11-30T00:00:00Z", day, now).unwrap());
        assert!(expired("garbage", day, now).is_err());
    }
}
