# A fleet of NixOS instances that converge to the FlakeHub output named by
# one SSM parameter. The image runs the agent once per boot
# (nixos-ami-agent.service). Instances follow later changes of the
# parameter only if the configuration they apply sets
# `services.nixos-ami-agent.watch.enable = true`: that enables
# nixos-ami-agent-run.timer, which re-runs the agent `watch.interval`
# (15min by default) after boot and after each run, plus a random delay of
# up to `watch.randomizedDelay`. The image does not enable it. With
# push_rollouts (rollouts.tf), a change of the parameter also starts a
# State Manager association that runs the agent on the fleet's instances,
# with rate control.

data "aws_partition" "current" {}

locals {
  name      = "nixos-fleet-${var.fleet}"
  partition = data.aws_partition.current.partition

  # The AMI comes from your own publication: `nixos-ami-publish upload
  # --ssm-parameter-prefix P` writes each region's AMI id to
  # P/<system>/latest. `resolve:ssm:` makes EC2 read it at every launch, so
  # new instances start from the newest image without a Terraform change.
  image_id = "resolve:ssm:${var.ami_parameter}"

  parameter_name = coalesce(var.parameter_name, "/fleets/${var.fleet}/target")
}

# The fleet's target: a FlakeHub output reference.
resource "aws_ssm_parameter" "target" {
  name   = local.parameter_name
  type   = var.parameter_type
  key_id = var.parameter_kms_key_arn
  value  = var.flake_ref

  # The value is the fleet's target, which rollouts change (`aws ssm
  # put-parameter --overwrite`): Terraform only creates the parameter with
  # an initial value and never sets it back.
  lifecycle {
    ignore_changes = [value]

    precondition {
      condition     = var.parameter_kms_key_arn == null || var.parameter_type == "SecureString"
      error_message = "parameter_kms_key_arn is only for parameter_type = \"SecureString\"."
    }
  }
}

# The instance role. `determinate-nixd login aws` needs no permission at all
# (FlakeHub checks the caller's identity with STS GetCallerIdentity); the
# agent needs to read the fleet's parameter.
resource "aws_iam_role" "fleet" {
  name = local.name
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
    Statement = concat(
      [{
        Sid      = "ReadFleetTarget"
        Effect   = "Allow"
        Action   = ["ssm:GetParameter"]
        Resource = aws_ssm_parameter.target.arn
      }],
      # A SecureString under a customer-managed key; SSM decrypts with the
      # parameter's ARN as encryption context. The AWS-managed aws/ssm key
      # needs nothing here.
      var.parameter_kms_key_arn == null ? [] : [{
        Sid      = "DecryptFleetTarget"
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = var.parameter_kms_key_arn
        Condition = {
          StringEquals = {
            "kms:EncryptionContext:PARAMETER_ARN" = aws_ssm_parameter.target.arn
          }
        }
      }],
    )
  })
}

# The agent reports each run's outcome on its own instance to SSM
# Compliance (type Custom:NixOSAmiAgent; `report-compliance` in its config,
# on in the AMI profile), which `nixos-ami-agent fleet status` and the
# console read. PutComplianceItems accepts instance ARNs as resources (the
# Service Authorization Reference lists instance and managed-instance,
# both optional, with ec2:SourceInstanceARN as a condition key), but no
# policy can name "the instance making the call" as the resource, so this
# is "*", as in AmazonSSMManagedInstanceCore, which also grants it.
resource "aws_iam_role_policy" "report_outcome" {
  name = "report-run-outcome"
  role = aws_iam_role.fleet.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid      = "ReportRunOutcome"
      Effect   = "Allow"
      Action   = ["ssm:PutComplianceItems"]
      Resource = "*"
    }]
  })
}

# No SSH: Session Manager and Run Command are how an operator reaches an
# instance (`nixos-ami-agent doctor`, `status`). The amazon-image profile
# runs the SSM agent.
resource "aws_iam_role_policy_attachment" "ssm_managed_instance_core" {
  count      = var.attach_ssm_managed_instance_core ? 1 : 0
  role       = aws_iam_role.fleet.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "fleet" {
  name = local.name
  role = aws_iam_role.fleet.name
}

resource "aws_launch_template" "fleet" {
  name_prefix   = "${local.name}-"
  image_id      = local.image_id
  instance_type = var.instance_type
  user_data     = local.user_data_b64

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
      Name  = local.name
      Fleet = var.fleet
    }
  }

  lifecycle {
    # EC2's limit, before base64.
    precondition {
      condition     = local.user_data_bytes <= 16384
      error_message = "The user data is longer than EC2's 16 KB: shorten user_data_scripts."
    }
  }
}

resource "aws_autoscaling_group" "fleet" {
  count = var.create_autoscaling_group ? 1 : 0

  name                = local.name
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

  lifecycle {
    precondition {
      condition     = length(var.subnet_ids) > 0
      error_message = "subnet_ids is empty: the Auto Scaling group needs at least one subnet (or set create_autoscaling_group = false)."
    }
    precondition {
      condition     = var.min_size <= var.desired_capacity && var.desired_capacity <= var.max_size
      error_message = "Needs min_size <= desired_capacity <= max_size."
    }
  }
}
