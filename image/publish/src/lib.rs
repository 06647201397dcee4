//! nixos-ami-publish: turns the disk image this flake builds
//! (`nix build .#diskImages.<system>.aws`, described by its
//! `nix-support/image-info.json`) into AMIs in an AWS account, and keeps
//! them: EBS-direct snapshot → registered AMI → copies in every region →
//! sharing → SSM parameters; pruning of deprecated AMIs; a smoke test that
//! boots one and waits for the agent's outcome line.
//!
//! The pure parts (what the image is, what to call things) are
//! [`image_info`], [`naming`] and [`disk`]; the effects go through
//! [`aws`] (the workspace's shared SDK set-up) into [`ebs`], [`ec2`] and
//! [`ssm`], strung together by [`upload`], [`prune`] and [`smoke`].

pub mod aws;
pub mod cli;
pub mod disk;
pub mod ebs;
pub mod ec2;
pub mod image_info;
pub mod naming;
pub mod progress;
pub mod prune;
pub mod smoke;
pub mod ssm;
pub mod upload;
