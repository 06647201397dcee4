# `terraform test` with a mock provider: nothing real is planned or
# applied, no credentials are needed. scripts/test runs it on a copy of
# the example with terraform.tfvars.example as terraform.tfvars: runs take
# their values from there unless they set them.

mock_provider "aws" {
  mock_data "aws_partition" {
    defaults = {
      partition = "aws"
    }
  }
  mock_resource "aws_iam_role" {
    defaults = {
      arn = "arn:aws:iam::123456789012:role/nixos-fleet-web"
    }
  }
  mock_resource "aws_iam_instance_profile" {
    defaults = {
      arn = "arn:aws:iam::123456789012:instance-profile/nixos-fleet-web"
    }
  }
  mock_resource "aws_launch_template" {
    defaults = {
      id = "lt-0123456789abcdef0"
    }
  }
  mock_resource "aws_ssm_parameter" {
    defaults = {
      arn = "arn:aws:ssm:eu-west-1:123456789012:parameter/fleets/web/target"
    }
  }
  mock_resource "aws_ssm_document" {
    defaults = {
      arn = "arn:aws:ssm:eu-west-1:123456789012:document/nixos-fleet-web-start-rollout"
    }
  }
  mock_resource "aws_ssm_association" {
    defaults = {
      association_id = "0123abcd-4567-89ab-cdef-0123456789ab"
    }
  }
}

# The two roles apart (the mock gives every aws_iam_role the same ARN).
override_resource {
  target = aws_iam_role.rollout
  values = {
    arn = "arn:aws:iam::123456789012:role/nixos-fleet-web-rollout"
  }
}

run "tfvars_example" {
  command = plan

  assert {
    condition     = length(aws_autoscaling_group.fleet) == 1 && aws_autoscaling_group.fleet[0].desired_capacity == 2
    error_message = "The example creates the Auto Scaling group."
  }
  assert {
    condition     = aws_ssm_parameter.target.name == "/fleets/web/target" && aws_ssm_parameter.target.type == "String"
    error_message = "The parameter is /fleets/<fleet>/target, a String."
  }
  assert {
    condition     = output.user_data == "#nixos-ami-agent\nssm-parameter = \"/fleets/web/target\"\nreboot = \"if-needed\"\n"
    error_message = "Plain user data naming the parameter, got ${output.user_data}"
  }
  assert {
    condition     = aws_launch_template.fleet.image_id == "resolve:ssm:/nixos-amis/x86_64-linux/latest"
    error_message = "The AMI comes from the publication's SSM parameter."
  }
  assert {
    condition     = aws_launch_template.fleet.metadata_options[0].http_tokens == "required"
    error_message = "IMDSv2 only."
  }
  assert {
    condition     = aws_iam_role_policy_attachment.ssm_managed_instance_core[0].policy_arn == "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
    error_message = "AmazonSSMManagedInstanceCore is attached."
  }
}

# Applied against the mock, so ARNs are known and the outputs computed.
run "outputs_and_policy" {
  variables {
    parameter_type        = "SecureString"
    parameter_kms_key_arn = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
  }

  assert {
    condition     = output.flakehub_principal == "arn:aws:iam::123456789012:assumed-role/nixos-fleet-web/i-*"
    error_message = "FlakeHub principal: ${output.flakehub_principal}"
  }
  assert {
    condition = jsondecode(aws_iam_role_policy.read_target.policy).Statement == [
      {
        Sid      = "ReadFleetTarget"
        Effect   = "Allow"
        Action   = ["ssm:GetParameter"]
        Resource = "arn:aws:ssm:eu-west-1:123456789012:parameter/fleets/web/target"
      },
      {
        Sid      = "DecryptFleetTarget"
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        Condition = {
          StringEquals = {
            "kms:EncryptionContext:PARAMETER_ARN" = "arn:aws:ssm:eu-west-1:123456789012:parameter/fleets/web/target"
          }
        }
      },
    ]
    error_message = "The inline policy reads this parameter and decrypts with its key, nothing else: ${aws_iam_role_policy.read_target.policy}"
  }
  assert {
    condition     = output.ssm_parameter == "/fleets/web/target" && output.role_name == "nixos-fleet-web" && output.instance_profile_name == "nixos-fleet-web"
    error_message = "Outputs for a caller."
  }
}

run "plain_string_parameter_needs_no_kms" {
  assert {
    condition     = length(jsondecode(aws_iam_role_policy.read_target.policy).Statement) == 1
    error_message = "No kms:Decrypt without a customer-managed key."
  }
}

run "launch_template_only" {
  command = plan
  variables {
    create_autoscaling_group         = false
    subnet_ids                       = []
    attach_ssm_managed_instance_core = false
  }

  assert {
    condition     = length(aws_autoscaling_group.fleet) == 0 && length(aws_iam_role_policy_attachment.ssm_managed_instance_core) == 0
    error_message = "No Auto Scaling group, no managed policy."
  }
}

run "mime_user_data" {
  command = plan
  variables {
    parameter_name = "/teams/web/fleet-target"
    reboot         = "never"
    user_data_scripts = {
      "b.sh" = "#!/bin/sh\necho b\n"
      "a.sh" = "#!/bin/sh\necho a"
    }
  }

  assert {
    condition = output.user_data == join("\n", [
      "Content-Type: multipart/mixed; boundary=\"==nixos-ami-agent-boundary==\"",
      "MIME-Version: 1.0",
      "",
      "--==nixos-ami-agent-boundary==",
      "Content-Type: text/x-nixos-ami-agent; charset=\"utf-8\"",
      "",
      "ssm-parameter = \"/teams/web/fleet-target\"",
      "reboot = \"never\"",
      "",
      "--==nixos-ami-agent-boundary==",
      "Content-Type: text/x-shellscript; charset=\"utf-8\"",
      "Content-Disposition: attachment; filename=\"a.sh\"",
      "",
      "#!/bin/sh",
      "echo a",
      "--==nixos-ami-agent-boundary==",
      "Content-Type: text/x-shellscript; charset=\"utf-8\"",
      "Content-Disposition: attachment; filename=\"b.sh\"",
      "",
      "#!/bin/sh",
      "echo b",
      "",
      "--==nixos-ami-agent-boundary==--",
      "",
    ])
    error_message = "MIME user data, scripts in name order, got ${output.user_data}"
  }
}

run "user_data_over_16_kb" {
  command = plan
  variables {
    # Over 16 KB in bytes, not in characters: é is two bytes.
    user_data_scripts = { "big.sh" = "#!/bin/sh\n# ${replace(format("%8100s", ""), " ", "é")}" }
  }
  expect_failures = [aws_launch_template.fleet]
}

run "autoscaling_group_without_subnets" {
  command = plan
  variables {
    subnet_ids = []
  }
  expect_failures = [aws_autoscaling_group.fleet]
}

run "sizes_out_of_order" {
  command = plan
  variables {
    min_size         = 3
    desired_capacity = 2
  }
  expect_failures = [aws_autoscaling_group.fleet]
}

run "kms_key_of_a_plain_string" {
  command = plan
  variables {
    parameter_kms_key_arn = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
  }
  expect_failures = [aws_ssm_parameter.target]
}

run "hierarchy_without_leading_slash" {
  command = plan
  variables {
    parameter_name = "fleets/web/target"
  }
  expect_failures = [var.parameter_name]
}

run "name_starting_with_aws" {
  command = plan
  variables {
    parameter_name = "/AWS/fleet"
  }
  expect_failures = [var.parameter_name]
}

run "name_starting_with_ssm" {
  command = plan
  variables {
    parameter_name = "/ssmfleet/target"
  }
  expect_failures = [var.parameter_name]
}

run "github_flake_ref" {
  command = plan
  variables {
    flake_ref = "github:my-org/web-fleet#nixosConfigurations.web"
  }
  expect_failures = [var.flake_ref]
}

# An exact version is a reference like any other (the agent reads a
# value that is a valid reference as one, `=` and all): the validation
# accepts it. (The parameter keeps the value of the earlier runs' state:
# ignore_changes.)
run "exact_version_as_a_bare_value" {
  command = plan
  variables {
    flake_ref = "my-org/web-fleet/=0.1.2#nixosConfigurations.web"
  }
  assert {
    condition     = var.flake_ref == "my-org/web-fleet/=0.1.2#nixosConfigurations.web"
    error_message = "The validation accepts an exact version."
  }
}

run "script_without_interpreter" {
  command = plan
  variables {
    user_data_scripts = { "setup.sh" = "echo hello" }
  }
  expect_failures = [var.user_data_scripts]
}

run "fleet_name_too_long_for_iam" {
  command = plan
  variables {
    fleet = "a-fleet-name-that-is-far-too-long-for-iam-roles"
  }
  expect_failures = [var.fleet]
}

# The instance role may report each run's outcome to SSM Compliance, with
# or without push rollouts.
run "instances_report_their_outcome" {
  command = plan
  variables {
    push_rollouts = false
  }

  assert {
    condition = jsondecode(aws_iam_role_policy.report_outcome.policy).Statement == [{
      Sid      = "ReportRunOutcome"
      Effect   = "Allow"
      Action   = ["ssm:PutComplianceItems"]
      Resource = "*"
    }]
    error_message = "The instance role may call ssm:PutComplianceItems: ${aws_iam_role_policy.report_outcome.policy}"
  }
  assert {
    condition     = aws_iam_role_policy.report_outcome.role == aws_iam_role.fleet.id
    error_message = "The compliance policy is the instance role's."
  }
  assert {
    condition = (length(aws_ssm_document.converge) + length(aws_ssm_association.converge) + length(aws_ssm_document.start_rollout)
      + length(aws_cloudwatch_event_rule.rollout) + length(aws_cloudwatch_event_target.rollout) + length(aws_iam_role.rollout)
    + length(aws_iam_role_policy.rollout)) == 0
    error_message = "push_rollouts = false creates none of the rollout resources."
  }
}

# Applied against the mock, so the ARNs and the association ID are known.
run "push_rollouts" {
  assert {
    condition = (aws_ssm_document.converge[0].name == "NixOSAmiAgent-Converge-web"
      && aws_ssm_document.converge[0].document_type == "Command"
      && aws_ssm_document.converge[0].document_format == "YAML"
    && aws_ssm_document.converge[0].content == file("../../ssm-documents/NixOSAmiAgent-Converge.yaml"))
    error_message = "The Command document is the repository's ssm-documents/NixOSAmiAgent-Converge.yaml, as YAML."
  }
  assert {
    condition = (aws_ssm_association.converge[0].name == aws_ssm_document.converge[0].name
      && length(aws_ssm_association.converge[0].targets) == 1
      && aws_ssm_association.converge[0].targets[0].key == "tag:Fleet"
    && aws_ssm_association.converge[0].targets[0].values == tolist([aws_launch_template.fleet.tag_specifications[0].tags.Fleet]))
    error_message = "The association runs the document on the instances the launch template tags Fleet = web."
  }
  assert {
    condition = (aws_ssm_association.converge[0].max_concurrency == "10%"
      && aws_ssm_association.converge[0].max_errors == "0"
      && aws_ssm_association.converge[0].compliance_severity == "HIGH"
    && aws_ssm_association.converge[0].schedule_expression == null)
    error_message = "Defaults: 10% at a time, the first failure stops the rollout, HIGH, no schedule."
  }
  assert {
    condition = jsondecode(aws_cloudwatch_event_rule.rollout[0].event_pattern) == {
      source        = ["aws.ssm"]
      "detail-type" = ["Parameter Store Change"]
      detail = {
        name      = ["/fleets/web/target"]
        operation = ["Update", "LabelParameterVersion"]
      }
    }
    error_message = "The rule matches changes of the fleet's parameter: ${aws_cloudwatch_event_rule.rollout[0].event_pattern}"
  }
  assert {
    condition = (aws_cloudwatch_event_target.rollout[0].rule == aws_cloudwatch_event_rule.rollout[0].name
      && aws_cloudwatch_event_target.rollout[0].arn == "arn:aws:ssm:eu-west-1:123456789012:automation-definition/nixos-fleet-web-start-rollout:$DEFAULT"
    && aws_cloudwatch_event_target.rollout[0].role_arn == "arn:aws:iam::123456789012:role/nixos-fleet-web-rollout")
    error_message = "The rule starts the runbook, with the rollout role: ${aws_cloudwatch_event_target.rollout[0].arn}"
  }
  assert {
    condition = jsondecode(aws_cloudwatch_event_target.rollout[0].input) == {
      AssociationId        = ["0123abcd-4567-89ab-cdef-0123456789ab"]
      AutomationAssumeRole = ["arn:aws:iam::123456789012:role/nixos-fleet-web-rollout"]
    }
    error_message = "The runbook is given the association and its role: ${aws_cloudwatch_event_target.rollout[0].input}"
  }
  assert {
    condition = (jsondecode(aws_ssm_document.start_rollout[0].content).mainSteps == [{
      name   = "startAssociation"
      action = "aws:executeAwsApi"
      inputs = { Service = "ssm", Api = "StartAssociationsOnce", AssociationIds = ["{{ AssociationId }}"] }
      }]
    && aws_ssm_document.start_rollout[0].document_type == "Automation")
    error_message = "The runbook only starts the association."
  }
  assert {
    condition     = toset(jsondecode(aws_iam_role.rollout[0].assume_role_policy).Statement[0].Principal.Service) == toset(["events.amazonaws.com", "ssm.amazonaws.com"])
    error_message = "EventBridge and Automation assume the rollout role."
  }
  assert {
    condition = jsondecode(aws_iam_role_policy.rollout[0].policy).Statement == [
      {
        Sid    = "StartRunbook"
        Effect = "Allow"
        Action = ["ssm:StartAutomationExecution"]
        Resource = [
          "arn:aws:ssm:eu-west-1:123456789012:automation-definition/nixos-fleet-web-start-rollout:*",
          "arn:aws:ssm:eu-west-1:123456789012:document/nixos-fleet-web-start-rollout",
          "arn:aws:ssm:eu-west-1:123456789012:automation-execution/*",
        ]
      },
      {
        Sid       = "RunbookAssumesThisRole"
        Effect    = "Allow"
        Action    = ["iam:PassRole"]
        Resource  = "arn:aws:iam::123456789012:role/nixos-fleet-web-rollout"
        Condition = { StringEquals = { "iam:PassedToService" = "ssm.amazonaws.com" } }
      },
      {
        Sid      = "StartAssociation"
        Effect   = "Allow"
        Action   = ["ssm:StartAssociationsOnce"]
        Resource = "arn:aws:ssm:eu-west-1:123456789012:association/0123abcd-4567-89ab-cdef-0123456789ab"
      },
    ]
    error_message = "The rollout role starts this runbook and this association, nothing else: ${aws_iam_role_policy.rollout[0].policy}"
  }
  assert {
    condition     = output.converge_document_name == "NixOSAmiAgent-Converge-web" && output.rollout_association_id == "0123abcd-4567-89ab-cdef-0123456789ab" && output.rollout_rule_name == "nixos-fleet-web-rollout"
    error_message = "Rollout outputs."
  }
}

run "rollout_rate_control" {
  command = plan
  variables {
    rollout_max_concurrency     = "50"
    rollout_max_errors          = "2%"
    rollout_compliance_severity = "CRITICAL"
    rollout_schedule            = "rate(1 day)"
  }

  assert {
    condition = (aws_ssm_association.converge[0].max_concurrency == "50"
      && aws_ssm_association.converge[0].max_errors == "2%"
      && aws_ssm_association.converge[0].compliance_severity == "CRITICAL"
    && aws_ssm_association.converge[0].schedule_expression == "rate(1 day)")
    error_message = "The rate control is the caller's."
  }
}

run "no_concurrency" {
  command = plan
  variables {
    rollout_max_concurrency = "0"
  }
  expect_failures = [var.rollout_max_concurrency]
}

run "errors_not_a_number" {
  command = plan
  variables {
    rollout_max_errors = "one"
  }
  expect_failures = [var.rollout_max_errors]
}

run "schedule_not_an_expression" {
  command = plan
  variables {
    rollout_schedule = "daily"
  }
  expect_failures = [var.rollout_schedule]
}
