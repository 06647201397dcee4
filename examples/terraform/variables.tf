variable "region" {
  type    = string
  default = "eu-west-1"
}

variable "ami_parameter" {
  description = "SSM parameter holding the AMI id: <--ssm-parameter-prefix>/<system>/latest of your `nixos-ami-publish upload` (pick an instance_type of that system's architecture)"
  type        = string
  default     = "/nixos-amis/x86_64-linux/latest"

  validation {
    condition     = can(regex("^/.+/(x86_64|aarch64)-linux/[^/]+$", var.ami_parameter))
    error_message = "ami_parameter must look like /PREFIX/x86_64-linux/latest (as nixos-ami-publish writes it)."
  }
}

variable "fleet" {
  description = "Name of the fleet; names the SSM parameter /fleets/<fleet>/target"
  type        = string
}

variable "flake_ref" {
  description = "FlakeHub output reference the fleet converges to, e.g. my-org/my-flake/0.1#nixosConfigurations.web"
  type        = string
}

variable "instance_type" {
  type    = string
  default = "t3.small"
}

variable "subnet_ids" {
  type = list(string)
}

variable "min_size" {
  type    = number
  default = 1
}

variable "max_size" {
  type    = number
  default = 3
}

variable "desired_capacity" {
  type    = number
  default = 2
}
