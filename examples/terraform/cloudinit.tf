# The same settings as MIME multipart user data, as cloud-init tooling
# writes it: the agent takes the text/x-nixos-ami-agent part (settings) and
# text/x-shellscript parts (run once per instance) and leaves the rest to
# other tools. Use this launch template instead of the plain one when other
# parts are needed.

data "cloudinit_config" "fleet" {
  gzip          = true
  base64_encode = true

  part {
    content_type = "text/x-nixos-ami-agent"
    content      = local.user_data
  }

  part {
    content_type = "text/x-shellscript"
    filename     = "announce.sh"
    content      = <<-EOT
      #!/bin/sh
      echo "fleet ${var.fleet} instance booted" > /dev/console
    EOT
  }
}

resource "aws_launch_template" "fleet_mime" {
  name_prefix   = "nixos-fleet-${var.fleet}-mime-"
  image_id      = local.image_id
  instance_type = var.instance_type
  user_data     = data.cloudinit_config.fleet.rendered

  iam_instance_profile {
    arn = aws_iam_instance_profile.fleet.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
}
