//! `upload`: image-info.json → snapshot(s) → AMI in the source region →
//! copies in the other regions → sharing, deprecation, SSM parameters.
//!
//! Idempotent by name, so a re-run after a crash (or SIGKILL) at any point
//! finishes the job: an AMI of the name is reused when this tool made it
//! from the same image file (else it is an error, nothing is touched); a
//! completed snapshot of the name from the same file is reused; a pending
//! or failed one (an upload that died) is deleted before a new upload;
//! copies are found by name in each region before one is started, and
//! carry a client token derived from the name and the source AMI.

use crate::aws::{CallError, Clients};
use crate::disk::Disk;
use crate::ebs;
use crate::ec2::{self, ImageSummary, Sharing};
use crate::image_info::ImageInfo;
use crate::naming;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Regions {
    /// Only the source region.
    Source,
    /// Every region enabled for the account.
    All,
    List(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub image_info: PathBuf,
    pub prefix: String,
    pub run_id: Option<String>,
    pub source_region: String,
    pub regions: Regions,
    pub best_effort: Vec<String>,
    pub sharing: Sharing,
    pub deprecate_after: Option<Duration>,
    pub tpm: bool,
    pub ssm_prefix: Option<String>,
    pub revision: Option<String>,
    pub dry_run: bool,
    pub workers: usize,
    /// How long an image may take to become available, per region.
    pub wait: Duration,
    /// At most this many regions at once.
    pub parallel_regions: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum UploadFailure {
    /// The input is wrong: nothing was created.
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Aws(String),
    /// Some regions have the AMI, others do not.
    #[error("{failed}")]
    Partial {
        failed: String,
        outcome: Box<Outcome>,
    },
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RegionImage {
    pub image_id: String,
    pub snapshot_ids: Vec<String>,
    /// Found (made by an earlier run), not made now.
    pub reused: bool,
}

#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct Outcome {
    pub name: String,
    pub source_region: String,
    pub dry_run: bool,
    /// What was done, or (dry run) what would be, one line each.
    pub steps: Vec<String>,
    pub regions: BTreeMap<String, RegionImage>,
    /// Region → why it has no AMI (or its AMI is incomplete).
    pub failed: BTreeMap<String, String>,
    /// The same for best-effort regions: reported, not fatal.
    pub best_effort_failed: BTreeMap<String, String>,
    pub ssm_parameters: Vec<String>,
}

/// What was read and checked before anything remote happens.
struct Prepared {
    info: ImageInfo,
    name: String,
    disks: Vec<(crate::image_info::Disk, Arc<Disk>, u64)>,
    parameters: Option<[String; 2]>,
    source_tag: String,
}

fn prepare(o: &Options) -> Result<Prepared, UploadFailure> {
    let input = |s: String| UploadFailure::Input(s);
    let info = ImageInfo::load(&o.image_info).map_err(|e| input(e.to_string()))?;
    let name = naming::ami_name(&o.prefix, &info, o.run_id.as_deref())
        .map_err(|e| input(e.to_string()))?;
    if o.tpm && !(info.system.architecture() == "x86_64" && info.boot_mode.as_str() == "uefi") {
        return Err(input(format!(
            "--tpm: NitroTPM needs an x86_64 image that boots with UEFI; {} boots with {}",
            info.system.as_str(),
            info.boot_mode.as_str()
        )));
    }
    let parameters = o
        .ssm_prefix
        .as_deref()
        .map(|p| naming::ssm_parameters(p, &info))
        .transpose()
        .map_err(|e| input(e.to_string()))?;
    let mut disks = vec![];
    for d in &info.disks {
        let disk = Disk::open(&d.file).map_err(|e| input(e.to_string()))?;
        if disk.size() != d.logical_bytes {
            return Err(input(format!(
                "{}: the {} disk {} holds {} bytes ({}), but `{}` says {}: not the image this file describes",
                info.path.display(),
                d.role,
                d.file.display(),
                disk.size(),
                disk.format().as_str(),
                if info.disks.len() > 1 {
                    format!("disks.{}.logical_bytes", d.role)
                } else {
                    "logical_bytes".into()
                },
                d.logical_bytes
            )));
        }
        let gib = disk
            .volume_gib()
            .map_err(|e| input(format!("{}: cannot be read: {e}", d.file.display())))?;
        disks.push((d.clone(), Arc::new(disk), gib));
    }
    let source_tag = info
        .disks
        .iter()
        .map(|d| d.file.display().to_string())
        .collect::<Vec<_>>()
        .join(",");
    Ok(Prepared {
        info,
        name,
        disks,
        parameters,
        source_tag,
    })
}

fn aws(e: impl std::fmt::Display) -> UploadFailure {
    UploadFailure::Aws(e.to_string())
}

pub async fn run(o: &Options) -> Result<Outcome, UploadFailure> {
    let p = prepare(o)?;
    let mut out = Outcome {
        name: p.name.clone(),
        source_region: o.source_region.clone(),
        dry_run: o.dry_run,
        ..Outcome::default()
    };
    let source = Clients::new(&o.source_region).await.map_err(aws)?;
    let targets: Vec<String> = match &o.regions {
        Regions::Source => vec![],
        Regions::All => ec2::regions(&source).await.map_err(aws)?,
        Regions::List(l) => l.clone(),
    }
    .into_iter()
    .filter(|r| *r != o.source_region)
    .collect();

    if o.dry_run {
        plan(o, &p, &source, &targets, &mut out).await?;
        return Ok(out);
    }

    let base_tags = tags(o, &p);
    let image = source_image(o, &p, &source, &base_tags, &mut out).await?;
    let source_image_id = image.id.clone();
    let mut images: Vec<(Clients, ImageSummary)> = vec![(source.clone(), image)];

    // Copies, a few regions at a time.
    let mut pending = targets.iter();
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.len() < o.parallel_regions.max(1) {
            let Some(region) = pending.next() else { break };
            let (region, name, src_region, src_id, tags, source_tag, wait) = (
                region.clone(),
                p.name.clone(),
                o.source_region.clone(),
                source_image_id.clone(),
                base_tags.clone(),
                p.source_tag.clone(),
                o.wait,
            );
            running.spawn(async move {
                let r = copy_to(
                    &region,
                    &name,
                    &src_region,
                    &src_id,
                    &tags,
                    &source_tag,
                    wait,
                )
                .await;
                (region, r)
            });
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        let (region, r) = done.map_err(|e| aws(format!("a copy stopped: {e}")))?;
        match r {
            Ok((clients, image, reused)) => {
                out.steps.push(format!(
                    "{region}: {} {}",
                    if reused {
                        "found the copy"
                    } else {
                        "copied to"
                    },
                    image.id
                ));
                images.push((clients, image));
            }
            Err(e) => record_failure(o, &mut out, &region, e.to_string()),
        }
    }

    // Sharing, deprecation, parameters: per region with an image.
    for (clients, image) in &images {
        if let Err(e) = finish_region(o, &p, clients, image, &mut out).await {
            record_failure(o, &mut out, &clients.region, e.to_string());
            continue;
        }
        out.regions.insert(
            clients.region.clone(),
            RegionImage {
                image_id: image.id.clone(),
                snapshot_ids: image.snapshots.clone(),
                reused: out
                    .steps
                    .iter()
                    .any(|s| s.starts_with(&format!("{}: found", clients.region))),
            },
        );
    }
    if let Some(names) = &p.parameters {
        out.ssm_parameters = names.to_vec();
    }
    if !out.failed.is_empty() {
        let failed = out
            .failed
            .iter()
            .map(|(r, why)| format!("{r}: {why}"))
            .collect::<Vec<_>>()
            .join("; ");
        let ok: Vec<&String> = out.regions.keys().collect();
        return Err(UploadFailure::Partial {
            failed: format!(
                "{} region(s) failed: {failed}. The AMI {} is in: {}",
                out.failed.len(),
                p.name,
                if ok.is_empty() {
                    "no region".into()
                } else {
                    ok.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                }
            ),
            outcome: Box::new(out),
        });
    }
    Ok(out)
}

fn record_failure(o: &Options, out: &mut Outcome, region: &str, why: String) {
    if o.best_effort.iter().any(|r| r == region) {
        tracing::warn!("{region} (best effort): {why}");
        out.best_effort_failed.insert(region.to_owned(), why);
    } else {
        tracing::error!("{region}: {why}");
        out.failed.insert(region.to_owned(), why);
    }
}

fn tags(o: &Options, p: &Prepared) -> Vec<(String, String)> {
    let mut t = vec![
        ("Name".to_owned(), p.name.clone()),
        (
            naming::MANAGED_BY.0.to_owned(),
            naming::MANAGED_BY.1.to_owned(),
        ),
        (naming::SOURCE_TAG.to_owned(), p.source_tag.clone()),
        (naming::LABEL_TAG.to_owned(), p.info.label.clone()),
    ];
    if let Some(rev) = &o.revision {
        t.push((naming::REVISION_TAG.to_owned(), rev.clone()));
    }
    t
}

/// Refuses an image of our name that this tool did not make from this
/// very image file: it is someone else's, or another build's.
fn check_ours(image: &ImageSummary, source_tag: &str, region: &str) -> Result<(), String> {
    match (
        image.tag(naming::MANAGED_BY.0),
        image.tag(naming::SOURCE_TAG),
    ) {
        (Some(m), Some(s)) if m == naming::MANAGED_BY.1 && s == source_tag => Ok(()),
        (Some(m), Some(s)) if m == naming::MANAGED_BY.1 => Err(format!(
            "{region}: the AMI {} ({}) exists already, made from another image ({s}, snapshot {}); \
             use another --run-id or --prefix, or deregister it",
            image.name,
            image.id,
            image.snapshots.join(", ")
        )),
        _ => Err(format!(
            "{region}: an AMI named {} ({}) exists already and was not made by nixos-ami-publish; \
             use another --run-id or --prefix",
            image.name, image.id
        )),
    }
}

async fn source_image(
    o: &Options,
    p: &Prepared,
    c: &Clients,
    base_tags: &[(String, String)],
    out: &mut Outcome,
) -> Result<ImageSummary, UploadFailure> {
    let region = c.region.as_str();
    if let Some(img) = ec2::image_named(c, &p.name).await.map_err(aws)? {
        check_ours(&img, &p.source_tag, region).map_err(UploadFailure::Input)?;
        out.steps
            .push(format!("{region}: found {} ({})", img.id, img.state));
        let img = ec2::wait_image_available(c, &img.id, o.wait)
            .await
            .map_err(aws)?;
        return Ok(img);
    }
    let mut registered = vec![];
    for (d, disk, gib) in &p.disks {
        let snapshot = snapshot_for(o, p, c, d, disk.clone(), *gib, out).await?;
        registered.push((d.device_name.clone(), snapshot, *gib));
    }
    let mut tags = base_tags.to_vec();
    tags.push((
        naming::SNAPSHOTS_TAG.to_owned(),
        registered
            .iter()
            .map(|(_, s, _)| s.as_str())
            .collect::<Vec<_>>()
            .join(","),
    ));
    let r = &p.info.registration;
    let description = format!(
        "NixOS {} ({}) with Determinate Nix and nixos-ami-agent",
        p.info.label,
        p.info.system.as_str()
    );
    let id = ec2::register(
        c,
        &ec2::Registration {
            name: &p.name,
            description: &description,
            architecture: p.info.system.architecture(),
            boot_mode: p.info.boot_mode.as_str(),
            root_device_name: &r.root_device_name,
            disks: registered,
            volume_type: &r.volume_type,
            ena_support: r.ena_support,
            sriov_net_support: &r.sriov_net_support,
            imds_support: &r.imds_support,
            tpm: o.tpm || r.tpm_support.is_some(),
            tags: tags.clone(),
        },
    )
    .await
    .map_err(aws)?;
    out.steps.push(format!("{region}: registered {id}"));
    // Tags again (harmless where RegisterImage set them): a double that
    // ignores TagSpecifications must not leave an untagged image.
    ec2::tag(c, std::slice::from_ref(&id), &tags)
        .await
        .map_err(aws)?;
    ec2::wait_image_available(c, &id, o.wait).await.map_err(aws)
}

/// A completed snapshot of this disk from an earlier run, or a new upload
/// (after deleting what an interrupted upload left).
async fn snapshot_for(
    o: &Options,
    p: &Prepared,
    c: &Clients,
    d: &crate::image_info::Disk,
    disk: Arc<Disk>,
    gib: u64,
    out: &mut Outcome,
) -> Result<String, UploadFailure> {
    let region = c.region.as_str();
    let source = d.file.display().to_string();
    for s in ec2::snapshots_named(c, &p.name).await.map_err(aws)? {
        let id = s.snapshot_id().unwrap_or_default().to_owned();
        if ec2::snapshot_tag(&s, DISK_TAG).is_some_and(|r| r != d.role) {
            continue;
        }
        let ours = ec2::snapshot_tag(&s, naming::MANAGED_BY.0) == Some(naming::MANAGED_BY.1);
        let same = ec2::snapshot_tag(&s, naming::SOURCE_TAG) == Some(source.as_str());
        let complete = ec2::snapshot_tag(&s, naming::COMPLETE_TAG) == Some("true");
        match s.state().map(|s| s.as_str()) {
            Some("completed") if ours && same && complete => {
                out.steps.push(format!("{region}: found the snapshot {id}"));
                return Ok(id);
            }
            Some("completed") if !ours || (complete && !same) => {
                return Err(UploadFailure::Input(format!(
                    "{region}: a snapshot named {} ({id}) exists already, from {}; use another --run-id or --prefix, or delete it",
                    p.name,
                    ec2::snapshot_tag(&s, naming::SOURCE_TAG).unwrap_or("another tool")
                )));
            }
            state if ours => {
                tracing::warn!(
                    "{region}: deleting {id} ({}), left by an upload that did not finish",
                    state.unwrap_or("unknown state")
                );
                ec2::delete_snapshot(c, &id).await.map_err(aws)?;
                out.steps
                    .push(format!("{region}: deleted the unfinished snapshot {id}"));
            }
            _ => {}
        }
    }
    let mut tags = tags(o, p);
    tags.push((DISK_TAG.to_owned(), d.role.clone()));
    // A fresh token per run: a retried StartSnapshot within this run
    // returns the same snapshot; an earlier run's pending snapshot was
    // deleted above and must not be handed back.
    let nonce = format!("{:016x}", fastrand::u64(..));
    let request = ebs::Request {
        disk,
        volume_gib: gib,
        description: format!("{} ({} disk)", p.name, d.role),
        tags,
        client_token: naming::token(&[&p.name, &d.role, &nonce]),
        workers: o.workers,
        all_blocks: false,
    };
    let up = ebs::upload(c, &request).await.map_err(aws)?;
    out.steps.push(format!(
        "{region}: uploaded {} ({} of {} blocks sent)",
        up.snapshot_id, up.blocks_sent, up.blocks
    ));
    Ok(up.snapshot_id)
}

/// Which disk of the image a snapshot holds (`root`, or `boot`).
pub const DISK_TAG: &str = "nixos-ami-publish:disk";

async fn copy_to(
    region: &str,
    name: &str,
    source_region: &str,
    source_image: &str,
    tags: &[(String, String)],
    source_tag: &str,
    wait: Duration,
) -> Result<(Clients, ImageSummary, bool), String> {
    let c = Clients::new(region).await.map_err(|e| e.to_string())?;
    let (id, reused) = match ec2::image_named(&c, name)
        .await
        .map_err(|e| e.to_string())?
    {
        Some(img) => {
            check_ours(&img, source_tag, region)?;
            (img.id, true)
        }
        None => {
            let description = format!("copy of {source_image} from {source_region}");
            let id = ec2::copy(&c, source_region, source_image, name, &description, tags)
                .await
                .map_err(|e| e.to_string())?;
            ec2::tag(&c, std::slice::from_ref(&id), tags)
                .await
                .map_err(|e| e.to_string())?;
            (id, false)
        }
    };
    let image = ec2::wait_image_available(&c, &id, wait)
        .await
        .map_err(|e| e.to_string())?;
    Ok((c, image, reused))
}

async fn finish_region(
    o: &Options,
    p: &Prepared,
    c: &Clients,
    image: &ImageSummary,
    out: &mut Outcome,
) -> Result<(), CallError> {
    let region = c.region.as_str();
    // The snapshots of a copy are only known now.
    if !image.snapshots.is_empty() {
        ec2::tag(
            c,
            std::slice::from_ref(&image.id),
            &[(naming::SNAPSHOTS_TAG.to_owned(), image.snapshots.join(","))],
        )
        .await?;
    }
    if o.sharing != Sharing::Private {
        ec2::share(c, image, &o.sharing).await?;
        out.steps
            .push(format!("{region}: shared {} ({:?})", image.id, o.sharing));
    }
    if let Some(after) = o.deprecate_after {
        let at = SystemTime::now() + after;
        ec2::deprecate(c, &image.id, at).await?;
        out.steps.push(format!(
            "{region}: {} deprecated from {}",
            image.id,
            humantime::format_rfc3339_seconds(at)
        ));
    }
    if let Some(names) = &p.parameters {
        for n in names {
            crate::ssm::put(c, n, &image.id, &format!("{} (nixos-ami-publish)", p.name)).await?;
        }
        ec2::tag(
            c,
            std::slice::from_ref(&image.id),
            &[(naming::PARAMETERS_TAG.to_owned(), names.join(","))],
        )
        .await?;
        out.steps
            .push(format!("{region}: {} → {}", names.join(", "), image.id));
    }
    Ok(())
}

/// `--dry-run`: what would be done, from what exists now; nothing is
/// created or changed.
async fn plan(
    o: &Options,
    p: &Prepared,
    source: &Clients,
    targets: &[String],
    out: &mut Outcome,
) -> Result<(), UploadFailure> {
    let region = source.region.as_str();
    match ec2::image_named(source, &p.name).await.map_err(aws)? {
        Some(img) => {
            check_ours(&img, &p.source_tag, region).map_err(UploadFailure::Input)?;
            out.steps.push(format!("{region}: would reuse {}", img.id));
        }
        None => {
            for (d, disk, gib) in &p.disks {
                out.steps.push(format!(
                    "{region}: would upload {} ({}, {} bytes) to a {gib} GiB snapshot",
                    d.file.display(),
                    disk.format().as_str(),
                    disk.size()
                ));
            }
            out.steps
                .push(format!("{region}: would register {}", p.name));
        }
    }
    for t in targets {
        out.steps
            .push(format!("{t}: would copy {} (unless a copy exists)", p.name));
    }
    if o.sharing != Sharing::Private {
        out.steps.push(format!("would share: {:?}", o.sharing));
    }
    if let Some(d) = o.deprecate_after {
        out.steps.push(format!(
            "would deprecate after {}",
            humantime::format_duration(d)
        ));
    }
    if let Some(names) = &p.parameters {
        out.steps
            .push(format!("would write {} in each region", names.join(", ")));
        out.ssm_parameters = names.to_vec();
    }
    Ok(())
}
