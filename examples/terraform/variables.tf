variable "fleet" {
  description = "Name of the fleet: names the role, instance profile, launch template and Auto Scaling group (nixos-fleet-<fleet>) and, unless parameter_name is set, the SSM parameter /fleets/<fleet>/target."
  type        = string

  validation {
    # IAM role names are at most 64 characters; SSM path components allow
    # no more than these characters.
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$", var.fleet))
    error_message = "fleet must be 1 to 40 letters, digits, `_`, `.` or `-`, starting with a letter or digit."
  }
}

variable "flake_ref" {
  description = "The fleet's first target, a FlakeHub output reference (my-org/my-flake/0.1#nixosConfigurations.web). Only the parameter's initial value: later rollouts change the parameter (`aws ssm put-parameter --overwrite`), and Terraform ignores changes of this variable."
  type        = string

  validation {
    # A first check; `nixos-ami-agent validate --ssm-value` has the full
    # rules.
    condition     = can(regex("^(https://flakehub\\.com/f/)?[A-Za-z0-9_][A-Za-z0-9._-]*/[A-Za-z0-9_][A-Za-z0-9._-]*/[A-Za-z0-9.*+^~=<>,_-]+#[A-Za-z0-9_'\"+-][A-Za-z0-9._'\"+-]*$", var.flake_ref))
    error_message = "flake_ref must be a FlakeHub output reference, ORG/FLAKE/VERSION#ATTR_PATH, e.g. my-org/my-flake/0.1#nixosConfigurations.web (publish a GitHub flake to FlakeHub first)."
  }
}

variable "subnet_ids" {
  description = "Subnets of the Auto Scaling group (required unless create_autoscaling_group = false). The instances need a route to FlakeHub, its cache and SSM (NAT or public IP; VPC endpoints for SSM)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for s in var.subnet_ids : can(regex("^subnet-[0-9a-f]+$", s))])
    error_message = "subnet_ids must be subnet ids (subnet-0123456789abcdef0)."
  }
}

variable "ami_parameter" {
  description = "SSM parameter holding the AMI id: <--ssm-parameter-prefix>/<system>/latest of your `nixos-ami-publish upload` (pick an instance_type of that system's architecture)."
  type        = string
  default     = "/nixos-amis/x86_64-linux/latest"

  validation {
    condition     = can(regex("^/.+/(x86_64|aarch64)-linux/[^/]+$", var.ami_parameter))
    error_message = "ami_parameter must look like /PREFIX/x86_64-linux/latest (as nixos-ami-publish writes it)."
  }
}

variable "instance_type" {
  description = "EC2 instance type; its architecture must match the AMI's (t3.small: x86_64-linux, t4g.small: aarch64-linux)."
  type        = string
  default     = "t3.small"

  validation {
    condition     = can(regex("^[a-z0-9-]+\\.[a-z0-9-]+$", var.instance_type))
    error_message = "instance_type must be an EC2 instance type such as t3.small."
  }
}

variable "parameter_name" {
  description = "Name of the fleet's SSM parameter; null for /fleets/<fleet>/target."
  type        = string
  default     = null

  validation {
    # SSM's naming rules: a hierarchy starts with `/`, no name starts with
    # `aws` or `ssm` (any case), and these characters only.
    condition = var.parameter_name == null ? true : (
      can(regex("^(/[A-Za-z0-9_.-]+)+$", var.parameter_name))
      && !can(regex("^/(?i)(aws|ssm)", var.parameter_name))
      && length(var.parameter_name) <= 1011
    )
    error_message = "parameter_name must be a path such as /fleets/web/target (leading `/`, letters, digits, `_ . -`), not starting with /aws or /ssm in any case."
  }
}

variable "parameter_type" {
  description = "Type of the SSM parameter: String, or SecureString to keep the target out of sight (the agent always asks SSM to decrypt)."
  type        = string
  default     = "String"

  validation {
    condition     = contains(["String", "SecureString"], var.parameter_type)
    error_message = "parameter_type must be String or SecureString."
  }
}

variable "parameter_kms_key_arn" {
  description = "ARN of the customer-managed KMS key of a SecureString parameter (the role may then decrypt with it, for this parameter only); null for the AWS-managed aws/ssm key."
  type        = string
  default     = null

  validation {
    condition     = var.parameter_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/.+$", var.parameter_kms_key_arn))
    error_message = "parameter_kms_key_arn must be a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)."
  }
}

variable "reboot" {
  description = "The agent's reboot setting in the user data: never, if-needed or always (a TOML value of the parameter may override it)."
  type        = string
  default     = "if-needed"

  validation {
    condition     = contains(["never", "if-needed", "always"], var.reboot)
    error_message = "reboot must be never, if-needed or always."
  }
}

variable "user_data_scripts" {
  description = "Shell scripts (file name => script starting with #!) the agent runs once per instance, before it applies the target; any script makes the user data MIME multi-part."
  type        = map(string)
  default     = {}

  validation {
    condition = alltrue([
      for name, script in var.user_data_scripts :
      can(regex("^[A-Za-z0-9._-]{1,64}$", name)) && startswith(script, "#!") && !strcontains(script, "==nixos-ami-agent-boundary==")
    ])
    error_message = "user_data_scripts: names of 1 to 64 letters, digits, `.`, `_` or `-`; each script starts with #! and does not contain the MIME boundary ==nixos-ami-agent-boundary==."
  }
}

variable "attach_ssm_managed_instance_core" {
  description = "Attach AmazonSSMManagedInstanceCore, so operators reach instances with Session Manager or Run Command. That policy also allows ssm:GetParameter on every parameter of the account: set false and grant your own if that is too broad."
  type        = bool
  default     = true
}

variable "create_autoscaling_group" {
  description = "Create the Auto Scaling group; false to use only the launch template (output launch_template_id)."
  type        = bool
  default     = true
}

variable "min_size" {
  description = "Auto Scaling group minimum size."
  type        = number
  default     = 1

  validation {
    condition     = var.min_size >= 0 && floor(var.min_size) == var.min_size
    error_message = "min_size must be a whole number >= 0."
  }
}

variable "max_size" {
  description = "Auto Scaling group maximum size."
  type        = number
  default     = 3

  validation {
    condition     = var.max_size >= 1 && floor(var.max_size) == var.max_size
    error_message = "max_size must be a whole number >= 1."
  }
}

variable "desired_capacity" {
  description = "Auto Scaling group desired capacity (between min_size and max_size)."
  type        = number
  default     = 2

  validation {
    condition     = var.desired_capacity >= 0 && floor(var.desired_capacity) == var.desired_capacity
    error_message = "desired_capacity must be a whole number >= 0."
  }
}

variable "push_rollouts" {
  description = "Push each change of the fleet's parameter to the running instances (rollouts.tf): the Command document ssm-documents/NixOSAmiAgent-Converge.yaml, a State Manager association running it on the instances tagged Fleet = <fleet> with rollout_max_concurrency and rollout_max_errors, and an EventBridge rule that starts the association when the parameter is updated or relabelled. The instances need the SSM Agent's permissions (AmazonSSMManagedInstanceCore, or your own with attach_ssm_managed_instance_core = false). false: instances follow the parameter at boot and with the watch timer only."
  type        = bool
  default     = true
}

variable "rollout_max_concurrency" {
  description = "How many instances run a pushed rollout at a time: a number (\"50\") or a percentage of the fleet (\"10%\"). Each run reads the parameter once; above a few hundred instances prefer a number that keeps GetParameter under SSM's 40 TPS (about max_concurrency / seconds per run)."
  type        = string
  default     = "10%"

  validation {
    # The aws provider's (and SSM's) MaxConcurrency pattern.
    condition     = can(regex("^([1-9][0-9]*|[1-9][0-9]%|[1-9]%|100%)$", var.rollout_max_concurrency))
    error_message = "rollout_max_concurrency must be a number from 1 (\"50\") or a percentage from 1% to 100% (\"10%\")."
  }
}

variable "rollout_max_errors" {
  description = "How many instances may fail a pushed rollout before State Manager stops it: \"0\" stops it at the first failure (a failing canary stops the rollout), \"3\" at the fourth; a number or a percentage of the fleet. Runs already under way finish."
  type        = string
  default     = "0"

  validation {
    # The aws provider's (and SSM's) MaxErrors pattern.
    condition     = can(regex("^([1-9][0-9]*|[0]|[1-9][0-9]%|[0-9]%|100%)$", var.rollout_max_errors))
    error_message = "rollout_max_errors must be a number from 0 (\"0\") or a percentage from 0% to 100% (\"5%\")."
  }
}

variable "rollout_compliance_severity" {
  description = "Severity of the association's compliance status when a run fails: CRITICAL, HIGH, MEDIUM, LOW or UNSPECIFIED."
  type        = string
  default     = "HIGH"

  validation {
    condition     = contains(["CRITICAL", "HIGH", "MEDIUM", "LOW", "UNSPECIFIED"], var.rollout_compliance_severity)
    error_message = "rollout_compliance_severity must be CRITICAL, HIGH, MEDIUM, LOW or UNSPECIFIED."
  }
}

variable "rollout_schedule" {
  description = "Also run the association on a schedule, as a rate-controlled safety net (\"rate(1 day)\", \"cron(0 3 ? * * *)\"); null: only when the parameter changes, when the association is created or changed, and on instances that join."
  type        = string
  default     = null

  validation {
    condition     = var.rollout_schedule == null || can(regex("^(rate|cron)\\(.+\\)$", var.rollout_schedule))
    error_message = "rollout_schedule must be a schedule expression: rate(...) or cron(...)."
  }
}
