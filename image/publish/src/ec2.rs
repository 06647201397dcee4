//! The EC2 side: images and snapshots found by name and tag, registered,
//! copied, shared, deprecated, deregistered; regions; and the instance of
//! a smoke test. Every call goes through [`crate::aws::call`] (retried
//! when it may heal, bounded); waits poll with a deadline.

use crate::aws::{CALL_BUDGET, CallError, Clients, call, classify};
use crate::naming;
use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, Filter, Image,
    ImageState, ImdsSupportValues, LaunchPermission, LaunchPermissionModifications, OperationType,
    PermissionGroup, ResourceType, Snapshot, SnapshotAttributeName, SnapshotState, Tag,
    TagSpecification, TpmSupportValues, VolumeType,
};
use std::time::{Duration, Instant};

/// Who may launch the AMI (and create volumes from its snapshots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sharing {
    Private,
    Public,
    With(Vec<Principal>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Account(String),
    Organization(String),
    OrganizationalUnit(String),
}

impl Principal {
    /// A 12-digit account id, or an organization's or OU's ARN.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() == 12 && s.chars().all(|c| c.is_ascii_digit()) {
            return Ok(Principal::Account(s.to_owned()));
        }
        if let Some(rest) = s.strip_prefix("arn:")
            && rest.contains(":organizations::")
        {
            if rest.contains(":ou/") {
                return Ok(Principal::OrganizationalUnit(s.to_owned()));
            }
            if rest.contains(":organization/") {
                return Ok(Principal::Organization(s.to_owned()));
            }
        }
        Err(format!(
            "{:?} is neither a 12-digit account id nor an organization or OU ARN \
             (arn:aws:organizations::ACCOUNT:organization/o-… or …:ou/o-…/ou-…)",
            nixos_ami_agent::text::shown(s, 100)
        ))
    }
}

/// What this tool knows about an image it looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    pub id: String,
    pub name: String,
    pub state: String,
    pub tags: Vec<(String, String)>,
    /// From its block device mappings and from our tag.
    pub snapshots: Vec<String>,
    pub deprecation_time: Option<String>,
    pub architecture: Option<String>,
}

impl ImageSummary {
    fn of(i: &Image) -> Self {
        let tags: Vec<(String, String)> = i
            .tags()
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or_default().to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let mut snapshots: Vec<String> = i
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_owned))
            .collect();
        if let Some((_, v)) = tags.iter().find(|(k, _)| k == naming::SNAPSHOTS_TAG) {
            for s in v.split(',').filter(|s| !s.is_empty()) {
                if !snapshots.iter().any(|x| x == s) {
                    snapshots.push(s.to_owned());
                }
            }
        }
        Self {
            id: i.image_id().unwrap_or_default().to_owned(),
            name: i.name().unwrap_or_default().to_owned(),
            state: i.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
            tags,
            snapshots,
            deprecation_time: i.deprecation_time().map(str::to_owned),
            architecture: i.architecture().map(|a| a.as_str().to_owned()),
        }
    }

    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

pub fn tags(pairs: &[(String, String)]) -> Vec<Tag> {
    pairs
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// Our images whose name matches `pattern` (EC2's wildcards).
pub async fn images_named(c: &Clients, pattern: &str) -> Result<Vec<ImageSummary>, CallError> {
    let mut out = vec![];
    let mut token: Option<String> = None;
    loop {
        let page = call(&c.region, "DescribeImages", CALL_BUDGET, || async {
            c.ec2
                .describe_images()
                .owners("self")
                .filters(filter("name", pattern))
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(classify)
        })
        .await?;
        out.extend(page.images().iter().map(ImageSummary::of));
        token = page.next_token().map(str::to_owned);
        if token.is_none() {
            return Ok(out);
        }
    }
}

/// Our image of exactly this name (EC2 keeps names unique per account
/// and region).
pub async fn image_named(c: &Clients, name: &str) -> Result<Option<ImageSummary>, CallError> {
    Ok(images_named(c, name)
        .await?
        .into_iter()
        .find(|i| i.name == name && i.state != "deregistered"))
}

pub async fn image(c: &Clients, id: &str) -> Result<Option<ImageSummary>, CallError> {
    let out = call(&c.region, "DescribeImages", CALL_BUDGET, || async {
        c.ec2
            .describe_images()
            .image_ids(id)
            .send()
            .await
            .map_err(classify)
    })
    .await?;
    Ok(out.images().first().map(ImageSummary::of))
}

/// Our snapshots tagged with this name.
pub async fn snapshots_named(c: &Clients, name: &str) -> Result<Vec<Snapshot>, CallError> {
    let out = call(&c.region, "DescribeSnapshots", CALL_BUDGET, || async {
        c.ec2
            .describe_snapshots()
            .owner_ids("self")
            .filters(filter("tag:Name", name))
            .send()
            .await
            .map_err(classify)
    })
    .await?;
    Ok(out.snapshots().to_vec())
}

pub async fn snapshots(c: &Clients, ids: &[String]) -> Result<Vec<Snapshot>, CallError> {
    if ids.is_empty() {
        return Ok(vec![]);
    }
    let out = call(&c.region, "DescribeSnapshots", CALL_BUDGET, || async {
        c.ec2
            .describe_snapshots()
            .set_snapshot_ids(Some(ids.to_vec()))
            .send()
            .await
            .map_err(classify)
    })
    .await;
    match out {
        Ok(o) => Ok(o.snapshots().to_vec()),
        // Some of them are gone already.
        Err(e) if e.code.as_deref() == Some("InvalidSnapshot.NotFound") => Ok(vec![]),
        Err(e) => Err(e),
    }
}

pub fn snapshot_tag<'a>(s: &'a Snapshot, key: &str) -> Option<&'a str> {
    s.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

pub async fn delete_snapshot(c: &Clients, id: &str) -> Result<(), CallError> {
    let r = call(
        &c.region,
        &format!("DeleteSnapshot {id}"),
        CALL_BUDGET,
        || async {
            c.ec2
                .delete_snapshot()
                .snapshot_id(id)
                .send()
                .await
                .map_err(classify)
        },
    )
    .await;
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.code.as_deref() == Some("InvalidSnapshot.NotFound") => Ok(()),
        Err(e) => Err(e),
    }
}

async fn poll<T, F, Fut>(
    region: &str,
    what: &str,
    limit: Duration,
    mut check: F,
) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Result<T, String>, CallError>>,
{
    let start = Instant::now();
    let mut delay = Duration::from_secs(1);
    loop {
        match check().await? {
            Ok(v) => return Ok(v),
            Err(state) if start.elapsed() >= limit => {
                return Err(CallError {
                    region: region.into(),
                    what: what.into(),
                    code: None,
                    detail: format!("still {state} after {}s", start.elapsed().as_secs()),
                });
            }
            Err(_) => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(15));
    }
}

fn failed(region: &str, what: &str, detail: String) -> CallError {
    CallError {
        region: region.into(),
        what: what.into(),
        code: None,
        detail,
    }
}

pub async fn wait_snapshot_completed(
    c: &Clients,
    id: &str,
    limit: Duration,
) -> Result<(), CallError> {
    let what = format!("waiting for snapshot {id}");
    poll(&c.region, &what, limit, || async {
        let s = snapshots(c, &[id.to_owned()]).await?;
        match s.first().and_then(|s| s.state()) {
            Some(SnapshotState::Completed) => Ok(Ok(())),
            Some(SnapshotState::Error) => Err(failed(
                &c.region,
                &what,
                format!(
                    "the snapshot failed: {}",
                    s.first()
                        .and_then(|s| s.state_message())
                        .unwrap_or("no reason given")
                ),
            )),
            Some(other) => Ok(Err(other.as_str().to_owned())),
            None => Ok(Err("not visible yet".into())),
        }
    })
    .await
}

pub async fn wait_image_available(
    c: &Clients,
    id: &str,
    limit: Duration,
) -> Result<ImageSummary, CallError> {
    let what = format!("waiting for image {id}");
    poll(&c.region, &what, limit, || async {
        match image(c, id).await? {
            Some(i) if i.state == ImageState::Available.as_str() => Ok(Ok(i)),
            Some(i)
                if matches!(
                    i.state.as_str(),
                    "failed" | "error" | "invalid" | "deregistered"
                ) =>
            {
                Err(failed(
                    &c.region,
                    &what,
                    format!("the image is {}", i.state),
                ))
            }
            Some(i) => Ok(Err(i.state)),
            None => Ok(Err("not visible yet".into())),
        }
    })
    .await
}

/// What RegisterImage gets.
pub struct Registration<'a> {
    pub name: &'a str,
    pub description: &'a str,
    pub architecture: &'a str,
    pub boot_mode: &'a str,
    pub root_device_name: &'a str,
    /// (device, snapshot, volume GiB) per disk, the root device first.
    pub disks: Vec<(String, String, u64)>,
    pub volume_type: &'a str,
    pub ena_support: bool,
    pub sriov_net_support: &'a str,
    pub imds_support: &'a str,
    pub tpm: bool,
    pub tags: Vec<(String, String)>,
}

pub async fn register(c: &Clients, r: &Registration<'_>) -> Result<String, CallError> {
    let mappings: Vec<BlockDeviceMapping> = r
        .disks
        .iter()
        .map(|(device, snapshot, gib)| {
            BlockDeviceMapping::builder()
                .device_name(device)
                .ebs(
                    EbsBlockDevice::builder()
                        .snapshot_id(snapshot)
                        .volume_size(*gib as i32)
                        .volume_type(VolumeType::from(r.volume_type))
                        .delete_on_termination(true)
                        .build(),
                )
                .build()
        })
        .collect();
    let out = call(&c.region, "RegisterImage", CALL_BUDGET, || async {
        let mut req = c
            .ec2
            .register_image()
            .name(r.name)
            .description(r.description)
            .architecture(ArchitectureValues::from(r.architecture))
            .boot_mode(BootModeValues::from(r.boot_mode))
            .root_device_name(r.root_device_name)
            .virtualization_type("hvm")
            .ena_support(r.ena_support)
            .sriov_net_support(r.sriov_net_support)
            .imds_support(ImdsSupportValues::from(r.imds_support))
            .set_block_device_mappings(Some(mappings.clone()))
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Image)
                    .set_tags(Some(tags(&r.tags)))
                    .build(),
            );
        if r.tpm {
            req = req.tpm_support(TpmSupportValues::V20);
        }
        req.send().await.map_err(classify)
    })
    .await?;
    out.image_id.ok_or_else(|| {
        failed(
            &c.region,
            "RegisterImage",
            "no image id in the reply".into(),
        )
    })
}

/// Adds the tags (CreateTags), for what was made before they could be set
/// atomically, or by a service that ignored them.
pub async fn tag(
    c: &Clients,
    resources: &[String],
    pairs: &[(String, String)],
) -> Result<(), CallError> {
    if resources.is_empty() || pairs.is_empty() {
        return Ok(());
    }
    call(&c.region, "CreateTags", CALL_BUDGET, || async {
        c.ec2
            .create_tags()
            .set_resources(Some(resources.to_vec()))
            .set_tags(Some(tags(pairs)))
            .send()
            .await
            .map_err(classify)
    })
    .await
    .map(|_| ())
}

pub async fn copy(
    target: &Clients,
    source_region: &str,
    source_image: &str,
    name: &str,
    description: &str,
    pairs: &[(String, String)],
) -> Result<String, CallError> {
    let token = naming::token(&[name, source_image, &target.region]);
    let out = call(&target.region, "CopyImage", CALL_BUDGET, || async {
        target
            .ec2
            .copy_image()
            .source_region(source_region)
            .source_image_id(source_image)
            .name(name)
            .description(description)
            .client_token(&token)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Image)
                    .set_tags(Some(tags(pairs)))
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Snapshot)
                    .set_tags(Some(tags(pairs)))
                    .build(),
            )
            .send()
            .await
            .map_err(classify)
    })
    .await?;
    out.image_id.ok_or_else(|| {
        failed(
            &target.region,
            "CopyImage",
            "no image id in the reply".into(),
        )
    })
}

pub async fn share(c: &Clients, image: &ImageSummary, sharing: &Sharing) -> Result<(), CallError> {
    let (launch, accounts): (Vec<LaunchPermission>, Vec<String>) = match sharing {
        Sharing::Private => return Ok(()),
        Sharing::Public => (
            vec![
                LaunchPermission::builder()
                    .group(PermissionGroup::All)
                    .build(),
            ],
            vec![],
        ),
        Sharing::With(who) => (
            who.iter()
                .map(|p| match p {
                    Principal::Account(a) => LaunchPermission::builder().user_id(a).build(),
                    Principal::Organization(o) => {
                        LaunchPermission::builder().organization_arn(o).build()
                    }
                    Principal::OrganizationalUnit(u) => LaunchPermission::builder()
                        .organizational_unit_arn(u)
                        .build(),
                })
                .collect(),
            who.iter()
                .filter_map(|p| match p {
                    Principal::Account(a) => Some(a.clone()),
                    _ => None,
                })
                .collect(),
        ),
    };
    call(
        &c.region,
        &format!("ModifyImageAttribute {}", image.id),
        CALL_BUDGET,
        || async {
            c.ec2
                .modify_image_attribute()
                .image_id(&image.id)
                .launch_permission(
                    LaunchPermissionModifications::builder()
                        .set_add(Some(launch.clone()))
                        .build(),
                )
                .send()
                .await
                .map_err(classify)
        },
    )
    .await?;
    // Snapshots: public, or the accounts (organizations cannot be given a
    // snapshot; launching a shared AMI does not need it).
    for snapshot in &image.snapshots {
        if *sharing != Sharing::Public && accounts.is_empty() {
            break;
        }
        // The form both EC2 and its doubles read: OperationType with
        // GroupNames or UserIds.
        let r = call(
            &c.region,
            &format!("ModifySnapshotAttribute {snapshot}"),
            CALL_BUDGET,
            || async {
                let req = c
                    .ec2
                    .modify_snapshot_attribute()
                    .snapshot_id(snapshot)
                    .attribute(SnapshotAttributeName::CreateVolumePermission)
                    .operation_type(OperationType::Add);
                let req = match sharing {
                    Sharing::Public => req.group_names("all"),
                    _ => req.set_user_ids(Some(accounts.clone())),
                };
                req.send().await.map_err(classify)
            },
        )
        .await;
        if let Err(e) = r {
            // Block public access for snapshots, for example: the AMI is
            // shared all the same.
            tracing::warn!("{}: snapshot {snapshot} not shared: {e}", c.region);
        }
    }
    Ok(())
}

pub async fn deprecate(
    c: &Clients,
    image: &str,
    at: std::time::SystemTime,
) -> Result<(), CallError> {
    let when = aws_smithy_types::DateTime::from(at);
    call(
        &c.region,
        &format!("EnableImageDeprecation {image}"),
        CALL_BUDGET,
        || async {
            c.ec2
                .enable_image_deprecation()
                .image_id(image)
                .deprecate_at(when)
                .send()
                .await
                .map_err(classify)
        },
    )
    .await
    .map(|_| ())
}

pub async fn deregister(c: &Clients, image: &str) -> Result<(), CallError> {
    call(
        &c.region,
        &format!("DeregisterImage {image}"),
        CALL_BUDGET,
        || async {
            c.ec2
                .deregister_image()
                .image_id(image)
                .send()
                .await
                .map_err(classify)
        },
    )
    .await
    .map(|_| ())
}

/// The regions enabled for the account, from `c`'s region.
pub async fn regions(c: &Clients) -> Result<Vec<String>, CallError> {
    let out = call(&c.region, "DescribeRegions", CALL_BUDGET, || async {
        c.ec2.describe_regions().send().await.map_err(classify)
    })
    .await?;
    let mut r: Vec<String> = out
        .regions()
        .iter()
        .filter_map(|r| r.region_name().map(str::to_owned))
        .collect();
    r.sort();
    Ok(r)
}
