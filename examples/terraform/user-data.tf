# The instances' user data, built with plain Terraform (no cloudinit
# provider). By default the agent's settings after a `#nixos-ami-agent`
# line. With user_data_scripts, a MIME multi-part message as cloud-init
# tooling writes it: a text/x-nixos-ami-agent part (the settings) and one
# text/x-shellscript part per script, in the order of their names, which
# the agent runs once per instance. Check it with
# `terraform output -raw user_data | nixos-ami-agent validate -`.
locals {
  # TOML. jsonencode writes strings that TOML reads the same.
  agent_settings = <<-EOT
    ssm-parameter = ${jsonencode(local.parameter_name)}
    reboot = ${jsonencode(var.reboot)}
  EOT

  mime_boundary = "==nixos-ami-agent-boundary=="
  mime_parts = concat(
    ["Content-Type: text/x-nixos-ami-agent; charset=\"utf-8\"\n\n${local.agent_settings}"],
    [for name, script in var.user_data_scripts : join("\n", [
      "Content-Type: text/x-shellscript; charset=\"utf-8\"",
      "Content-Disposition: attachment; filename=\"${name}\"",
      "",
      script,
    ])],
  )
  # The newline before a boundary belongs to the boundary, not the part.
  user_data_mime = join("", concat(
    ["Content-Type: multipart/mixed; boundary=\"${local.mime_boundary}\"\nMIME-Version: 1.0\n"],
    [for part in local.mime_parts : "\n--${local.mime_boundary}\n${part}"],
    ["\n--${local.mime_boundary}--\n"],
  ))

  user_data = length(var.user_data_scripts) == 0 ? "#nixos-ami-agent\n${local.agent_settings}" : local.user_data_mime

  # Bytes, as EC2 counts them (length() counts characters).
  user_data_b64   = base64encode(local.user_data)
  user_data_bytes = length(local.user_data_b64) / 4 * 3 - length(regexall("=", local.user_data_b64))
}
