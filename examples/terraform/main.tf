# A fleet of NixOS instances that converge to the FlakeHub output named by
# one SSM parameter. Change the parameter's value to roll the fleet (with
# the watch timer enabled in the image's configuration), or use a
# `name:label` selector for canaries.

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
    cloudinit = {
      source  = "hashicorp/cloudinit"
      version = ">= 2.3"
    }
  }
}

provider "aws" {
  region = var.region
}

data "aws_caller_identity" "current" {}

# The AMI comes from your own publication: `nixos-ami-publish upload
# --ssm-parameter-prefix P` writes each region's AMI id to
# P/<system>/latest. `resolve:ssm:` makes EC2 read it at every launch, so
# new instances start from the newest image without a Terraform change.
locals {
  image_id = "resolve:ssm:${var.ami_parameter}"
}

# The fleet's target: a FlakeHub output reference.
resource "aws_ssm_parameter" "target" {
  name  = "/fleets/${var.fleet}/target"
  type  = "String"
  value = var.flake_ref
}

# The instance role. `determinate-nixd login aws` needs no permission at all
# (FlakeHub checks the caller's identity with STS GetCallerIdentity); the
# agent needs to read the fleet's parameter, nothing else.
resource "aws_iam_role" "fleet" {
  name = "nixos-fleet-${var.fleet}"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_role_policy" "read_target" {
  name = "read-fleet-target"
  role = aws_iam_role.fleet.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect   = "Allow"
      Action   = ["ssm:GetParameter"]
      Resource = aws_ssm_parameter.target.arn
      # For a SecureString encrypted with a customer-managed key, also
      # allow kms:Decrypt on that key.
    }]
  })
}

resource "aws_iam_instance_profile" "fleet" {
  name = "nixos-fleet-${var.fleet}"
  role = aws_iam_role.fleet.name
}

locals {
  # The agent's settings as user data: the first line addresses it.
  user_data = <<-EOT
    #nixos-ami-agent
    ssm-parameter = "${aws_ssm_parameter.target.name}"
    reboot = "if-needed"
  EOT
}

resource "aws_launch_template" "fleet" {
  name_prefix   = "nixos-fleet-${var.fleet}-"
  image_id      = local.image_id
  instance_type = var.instance_type
  user_data     = base64encode(local.user_data)

  iam_instance_profile {
    arn = aws_iam_instance_profile.fleet.arn
  }

  # IMDSv2 only: the agent never uses IMDSv1, and nothing else should.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  tag_specifications {
    resource_type = "instance"
    tags = {
      Name  = "nixos-fleet-${var.fleet}"
      Fleet = var.fleet
    }
  }
}

resource "aws_autoscaling_group" "fleet" {
  name                = "nixos-fleet-${var.fleet}"
  min_size            = var.min_size
  max_size            = var.max_size
  desired_capacity    = var.desired_capacity
  vpc_zone_identifier = var.subnet_ids

  launch_template {
    id      = aws_launch_template.fleet.id
    version = aws_launch_template.fleet.latest_version
  }

  tag {
    key                 = "Fleet"
    value               = var.fleet
    propagate_at_launch = true
  }
}
