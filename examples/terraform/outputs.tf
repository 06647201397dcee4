output "launch_template_id" {
  description = "The launch template, for your own Auto Scaling groups or `aws ec2 run-instances --launch-template`."
  value       = aws_launch_template.fleet.id
}

output "launch_template_latest_version" {
  description = "The launch template's latest version."
  value       = aws_launch_template.fleet.latest_version
}

output "autoscaling_group_name" {
  description = "The Auto Scaling group; null with create_autoscaling_group = false."
  value       = one(aws_autoscaling_group.fleet[*].name)
}

output "role_name" {
  description = "The instance role, to attach more policies to."
  value       = aws_iam_role.fleet.name
}

output "role_arn" {
  description = "The instance role."
  value       = aws_iam_role.fleet.arn
}

output "instance_profile_name" {
  description = "The instance profile (`--iam-instance-profile Name=...` for single instances)."
  value       = aws_iam_instance_profile.fleet.name
}

output "instance_profile_arn" {
  description = "The instance profile."
  value       = aws_iam_instance_profile.fleet.arn
}

# Register this under "ARNs" in the FlakeHub organisation's settings, so
# `determinate-nixd login aws` works for every instance of the fleet
# (`nixos-ami-agent doctor` on an instance prints the same).
output "flakehub_principal" {
  description = "The principal to register in the FlakeHub organisation."
  value       = "arn:${local.partition}:iam::${split(":", aws_iam_role.fleet.arn)[4]}:assumed-role/${aws_iam_role.fleet.name}/i-*"
}

output "ssm_parameter" {
  description = "The fleet's parameter: change its value to move the fleet."
  value       = aws_ssm_parameter.target.name
}

output "ssm_parameter_arn" {
  description = "The fleet's parameter, for IAM policies of those who roll out."
  value       = aws_ssm_parameter.target.arn
}

output "ami_parameter" {
  description = "The SSM parameter the launch template takes the AMI id from."
  value       = var.ami_parameter
}

output "user_data" {
  description = "The user data as EC2 gets it (before base64): check it with `terraform output -raw user_data | nixos-ami-agent validate -`."
  value       = local.user_data
}

output "agent_settings" {
  description = "The agent's TOML settings, for a text/x-nixos-ami-agent part of user data built elsewhere."
  value       = local.agent_settings
}

output "converge_document_name" {
  description = "The Command document that converges an instance now (`aws ssm send-command --document-name ...`); null without push_rollouts."
  value       = one(aws_ssm_document.converge[*].name)
}

output "rollout_association_id" {
  description = "The State Manager association that pushes rollouts (`aws ssm start-associations-once --association-ids ...`); null without push_rollouts."
  value       = one(aws_ssm_association.converge[*].association_id)
}

output "rollout_rule_name" {
  description = "The EventBridge rule that starts the association when the parameter changes (disable it to roll out by hand only); null without push_rollouts."
  value       = one(aws_cloudwatch_event_rule.rollout[*].name)
}
