variable "region" {
  type    = string
  default = "eu-west-1"
}

variable "architecture" {
  description = "x86_64 or arm64 (the AMI's architecture; pick a matching instance_type)"
  type        = string
  default     = "x86_64"

  validation {
    condition     = contains(["x86_64", "arm64"], var.architecture)
    error_message = "architecture must be x86_64 or arm64."
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
