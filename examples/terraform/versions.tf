# Only hashicorp/aws, and no provider configuration: this directory is a
# root configuration (region and credentials from the environment) and a
# module (the caller configures the provider; a module that configured its
# own could not be used with count or for_each).
terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}
