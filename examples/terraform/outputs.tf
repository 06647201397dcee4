output "role_arn" {
  description = "The instance role"
  value       = aws_iam_role.fleet.arn
}

# Register this under "ARNs" in the FlakeHub organisation's settings, so
# `determinate-nixd login aws` works for every instance of the fleet
# (`nixos-ami-agent doctor` on an instance prints the same).
output "flakehub_principal" {
  value = "arn:aws:iam::${data.aws_caller_identity.current.account_id}:assumed-role/${aws_iam_role.fleet.name}/i-*"
}

output "ssm_parameter" {
  description = "Change its value to move the fleet"
  value       = aws_ssm_parameter.target.name
}

output "ami_parameter" {
  description = "The SSM parameter the launch templates take the AMI id from"
  value       = var.ami_parameter
}
