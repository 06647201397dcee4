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
