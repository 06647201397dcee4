//! The command line: `upload`, `prune`, `smoke-test`, each a struct with
//! `run`, and the one place that maps outcomes to exit codes.

use crate::ec2::{Principal, Sharing};
use crate::{prune, smoke, upload};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

pub const OK: u8 = 0;
pub const FAILED: u8 = 1;
pub const USAGE: u8 = 64;
pub const DATAERR: u8 = 65;
pub const UNAVAILABLE: u8 = 69;
pub const INTERRUPTED: u8 = 130;

const EXIT_CODES: &str = "\
Exit codes:
  0    done
  1    partly done: a region failed (the others are listed), the smoke
       test's agent reported a failure or no outcome, a prune failed
  64   bad command line
  65   bad input, nothing created: image-info.json or its disk, a name
       that exists for another image
  69   AWS refused or could not be reached (credentials, permissions,
       throttling past the retry budget)
  130  interrupted (the smoke test's instance is terminated first)";

const AFTER_HELP: &str = "\
Credentials come from the AWS SDK's default chain: AWS_PROFILE or the
environment, SSO, GitHub Actions' OIDC role (aws-actions/configure-aws-credentials),
an instance role. The region is --source-region/--region, else AWS_REGION.

Examples:
  nix build .#diskImages.x86_64-linux.aws
  nixos-ami-publish upload --image-info result/nix-support/image-info.json \\
    --prefix my-org/nixos/ --run-id \"$GITHUB_RUN_ID\" --regions all \\
    --deprecate-after 90d --ssm-parameter-prefix /my-org/nixos-amis
  nixos-ami-publish smoke-test --image ami-0123456789abcdef0 --region eu-west-1 \\
    --user-data examples/user-data.toml
  nixos-ami-publish prune --prefix my-org/nixos/ --grace-period 30d --yes
";

#[derive(Debug, Parser)]
#[command(
    name = "nixos-ami-publish",
    version,
    about = "Publishes the NixOS AMIs this flake builds: EBS-direct snapshot, AMI, copies, sharing, SSM parameters; prunes them; smoke-tests them"
)]
#[command(after_help = format!("{AFTER_HELP}\n{EXIT_CODES}"))]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload a disk image and publish it as an AMI in one or more regions.
    Upload(UploadArgs),
    /// Deregister AMIs of a prefix deprecated longer than a grace period.
    Prune(PruneArgs),
    /// Launch one instance, wait for the agent's outcome line, terminate it.
    SmokeTest(SmokeArgs),
    /// Upload one disk file to a new EBS snapshot, nothing else (what
    /// `upload` does first). Hidden: the benchmark's entry point (it
    /// measures the uploader alone, against a local EBS endpoint) and a
    /// debugging aid; it is not idempotent, every run makes a snapshot.
    #[command(hide = true)]
    Snapshot(SnapshotArgs),
}

fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (like 90d, 12h, 30m)"))?;
    if d > Duration::from_secs(10 * 365 * 86400) {
        return Err("longer than ten years".into());
    }
    Ok(d)
}

fn regions(s: &str) -> Result<upload::Regions, String> {
    if s == "all" {
        return Ok(upload::Regions::All);
    }
    let list: Vec<String> = s.split(',').map(|r| r.trim().to_owned()).collect();
    for r in &list {
        region(r)?;
    }
    Ok(upload::Regions::List(list))
}

fn region(r: &str) -> Result<String, String> {
    if r.is_empty()
        || r.len() > 32
        || !r
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!("{r:?} is not a region name like eu-west-1"));
    }
    Ok(r.to_owned())
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// `result/nix-support/image-info.json` of `nix build .#diskImages.<system>.aws`.
    #[arg(long, value_name = "PATH")]
    pub image_info: PathBuf,
    /// Prefix of the AMI name, `<prefix><label>-<system>.<run-id>`
    /// (e.g. determinate/nixos/epoch-1/).
    #[arg(long)]
    pub prefix: String,
    /// Ends the name; the same run id reuses what an earlier run made.
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,
    /// Where the snapshot is uploaded and the AMI registered.
    #[arg(long, env = "AWS_REGION", value_parser = region, value_name = "REGION")]
    pub source_region: String,
    /// `all` (every region enabled for the account) or a comma-separated
    /// list; the source region is always included.
    #[arg(long, value_parser = regions, value_name = "all|R1,R2,...")]
    pub regions: Option<upload::Regions>,
    /// A region whose failure is reported but does not fail the command.
    #[arg(long = "best-effort-region", value_parser = region, value_name = "REGION")]
    pub best_effort: Vec<String>,
    /// Anyone may launch the AMI.
    #[arg(long, conflicts_with = "share_with")]
    pub public: bool,
    /// An account id, organization ARN or OU ARN that may launch it.
    #[arg(long, value_name = "ID-or-ARN", value_parser = Principal::parse)]
    pub share_with: Vec<Principal>,
    /// Deprecate the AMIs this long from now (EC2 hides deprecated AMIs
    /// from searches; `prune` deletes them later).
    #[arg(long, value_parser = duration, value_name = "DURATION")]
    pub deprecate_after: Option<Duration>,
    /// Register with NitroTPM (x86_64 images booting with UEFI only).
    #[arg(long)]
    pub tpm: bool,
    /// Write each region's AMI id to `<P>/<system>/latest` and
    /// `<P>/<system>/<label>`.
    #[arg(long, value_name = "P")]
    pub ssm_parameter_prefix: Option<String>,
    /// The flake revision the image was built from, as a tag.
    #[arg(long, value_name = "REV")]
    pub flake_revision: Option<String>,
    /// Say what would be created; create nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// One JSON object on stdout (region → image and snapshot ids).
    #[arg(long)]
    pub json: bool,
    /// Blocks in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: u16,
    /// How long an AMI may take to become available, per region.
    #[arg(long, value_parser = duration, default_value = "60m", value_name = "DURATION")]
    pub wait: Duration,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[arg(long)]
    pub prefix: String,
    /// How long an AMI stays after its deprecation time.
    #[arg(long, value_parser = duration, default_value = "0s", value_name = "DURATION")]
    pub grace_period: Duration,
    /// Comma-separated; every region enabled for the account by default.
    #[arg(long, value_parser = regions, value_name = "all|R1,R2,...")]
    pub regions: Option<upload::Regions>,
    /// Where the region list is read from.
    #[arg(long, env = "AWS_REGION", value_parser = region, value_name = "REGION")]
    pub home_region: String,
    /// Also keep what `<P>/<system>/latest` points at.
    #[arg(long, value_name = "P")]
    pub ssm_parameter_prefix: Option<String>,
    /// Delete; without it, only say what would be deleted.
    #[arg(long)]
    pub yes: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SmokeArgs {
    /// An AMI id, or the name of one of this account's AMIs.
    #[arg(long, value_name = "NAME-or-ID")]
    pub image: String,
    #[arg(long, env = "AWS_REGION", value_parser = region)]
    pub region: String,
    /// Default: t3.small (x86_64) or t4g.small (arm64).
    #[arg(long, value_name = "TYPE")]
    pub instance_type: Option<String>,
    /// User data for the instance (what the agent acts on).
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// How long to wait for the agent's outcome line.
    #[arg(long, value_parser = duration, default_value = "20m", value_name = "DURATION")]
    pub timeout: Duration,
    #[arg(long, value_parser = duration, default_value = "15s", hide = true)]
    pub poll_interval: Duration,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// A raw or VHD disk file.
    #[arg(long, value_name = "PATH")]
    pub disk: PathBuf,
    #[arg(long, env = "AWS_REGION", value_parser = region)]
    pub region: String,
    /// Blocks in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: u16,
    /// Send zero blocks too (what upload-ami's EBS-direct mode does), for
    /// comparison.
    #[arg(long)]
    pub all_blocks: bool,
    #[arg(long)]
    pub json: bool,
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

impl Cli {
    pub async fn run(self) -> u8 {
        match self.command {
            Command::Upload(a) => a.run().await,
            Command::Prune(a) => a.run().await,
            Command::SmokeTest(a) => a.run().await,
            Command::Snapshot(a) => a.run().await,
        }
    }
}

impl UploadArgs {
    async fn run(self) -> u8 {
        let sharing = if self.public {
            Sharing::Public
        } else if !self.share_with.is_empty() {
            Sharing::With(self.share_with.clone())
        } else {
            Sharing::Private
        };
        let o = upload::Options {
            image_info: self.image_info,
            prefix: self.prefix,
            run_id: self.run_id,
            source_region: self.source_region,
            regions: self.regions.unwrap_or(upload::Regions::Source),
            best_effort: self.best_effort,
            sharing,
            deprecate_after: self.deprecate_after,
            tpm: self.tpm,
            ssm_prefix: self.ssm_parameter_prefix,
            revision: self.flake_revision,
            dry_run: self.dry_run,
            workers: self.workers.into(),
            wait: self.wait,
            parallel_regions: 4,
        };
        let (outcome, code) = match upload::run(&o).await {
            Ok(out) => (Some(out), OK),
            Err(upload::UploadFailure::Partial { failed, outcome }) => {
                tracing::error!("{failed}");
                (Some(*outcome), FAILED)
            }
            Err(upload::UploadFailure::Input(e)) => {
                tracing::error!("{e}");
                (None, DATAERR)
            }
            Err(upload::UploadFailure::Aws(e)) => {
                tracing::error!("{e}");
                (None, UNAVAILABLE)
            }
        };
        if let Some(out) = outcome {
            if self.json {
                print_json(&out);
            } else {
                for s in &out.steps {
                    println!("{s}");
                }
                for (r, img) in &out.regions {
                    println!("{r}: {} ({})", img.image_id, img.snapshot_ids.join(", "));
                }
                for (r, why) in out.best_effort_failed.iter().chain(&out.failed) {
                    println!("{r}: FAILED: {why}");
                }
            }
        }
        code
    }
}

impl PruneArgs {
    async fn run(self) -> u8 {
        let o = prune::Options {
            prefix: self.prefix,
            grace: self.grace_period,
            regions: match self.regions {
                Some(upload::Regions::List(l)) => Some(l),
                _ => None,
            },
            home_region: self.home_region,
            ssm_prefix: self.ssm_parameter_prefix,
            yes: self.yes,
        };
        match prune::run(&o).await {
            Ok(out) => {
                if self.json {
                    print_json(&out);
                } else {
                    for p in &out.images {
                        let what = match (&p.kept, p.deleted) {
                            (Some(why), _) => format!("kept: {why}"),
                            (None, true) => "deleted".into(),
                            (None, false) => "would delete (pass --yes)".into(),
                        };
                        println!(
                            "{}: {} {} (deprecated {}, snapshots {}): {what}",
                            p.region,
                            p.image_id,
                            p.name,
                            p.deprecated,
                            p.snapshots.join(", ")
                        );
                    }
                    if out.images.is_empty() {
                        println!("nothing deprecated long enough under {}", o.prefix);
                    }
                }
                if out.failed.is_empty() { OK } else { FAILED }
            }
            Err(e) => {
                tracing::error!("{e}");
                UNAVAILABLE
            }
        }
    }
}

impl SmokeArgs {
    async fn run(self) -> u8 {
        let o = smoke::Options {
            image: self.image,
            region: self.region,
            instance_type: self.instance_type,
            user_data: self.user_data,
            timeout: self.timeout,
            poll: self.poll_interval,
        };
        match smoke::run(&o).await {
            Ok(out) => {
                if self.json {
                    print_json(&out);
                } else if let Some(l) = &out.line {
                    println!("{l}");
                }
                if out.exit_code == Some(0) { OK } else { FAILED }
            }
            Err(e) => {
                tracing::error!("{e}");
                match e {
                    smoke::SmokeError::Input(_) => DATAERR,
                    smoke::SmokeError::Aws(_) => UNAVAILABLE,
                    smoke::SmokeError::Timeout { .. } => FAILED,
                    smoke::SmokeError::Interrupted { .. } => INTERRUPTED,
                }
            }
        }
    }
}

impl SnapshotArgs {
    async fn run(self) -> u8 {
        let disk = match crate::disk::Disk::open(&self.disk) {
            Ok(d) => std::sync::Arc::new(d),
            Err(e) => {
                tracing::error!("{e}");
                return DATAERR;
            }
        };
        let gib = match disk.volume_gib() {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("{}: cannot be read: {e}", self.disk.display());
                return DATAERR;
            }
        };
        let clients = match crate::aws::Clients::new(&self.region).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}");
                return UNAVAILABLE;
            }
        };
        let source = self.disk.display().to_string();
        let request = crate::ebs::Request {
            disk,
            volume_gib: gib,
            description: format!("{source} (nixos-ami-publish snapshot)"),
            tags: vec![
                (
                    crate::naming::MANAGED_BY.0.to_owned(),
                    crate::naming::MANAGED_BY.1.to_owned(),
                ),
                (crate::naming::SOURCE_TAG.to_owned(), source.clone()),
            ],
            client_token: crate::naming::token(&[&source, &format!("{:016x}", fastrand::u64(..))]),
            workers: self.workers.into(),
            all_blocks: self.all_blocks,
        };
        match crate::ebs::upload(&clients, &request).await {
            Ok(up) => {
                if self.json {
                    print_json(&serde_json::json!({
                        "snapshot_id": up.snapshot_id,
                        "volume_gib": gib,
                        "blocks": up.blocks,
                        "blocks_sent": up.blocks_sent,
                    }));
                } else {
                    println!(
                        "{} ({} of {} blocks sent)",
                        up.snapshot_id, up.blocks_sent, up.blocks
                    );
                }
                OK
            }
            Err(e @ crate::ebs::UploadError::Read { .. }) => {
                tracing::error!("{e}");
                DATAERR
            }
            Err(e) => {
                tracing::error!("{e}");
                UNAVAILABLE
            }
        }
    }
}
