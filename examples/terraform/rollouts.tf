# Push rollouts (push_rollouts = true, the default): a change of the
# fleet's parameter reaches the running instances within minutes instead
# of at their next boot or watch-timer run, at a rate you choose, and a
# failing instance stops it.
#
#   the parameter is updated or relabelled
#   -> EventBridge rule: source aws.ssm, "Parameter Store Change" of this
#      parameter (operation Update or LabelParameterVersion)
#   -> Automation runbook <name>-start-rollout, one step:
#      ssm:StartAssociationsOnce
#   -> State Manager association <name>-converge: the Command document
#      ssm-documents/NixOSAmiAgent-Converge.yaml (the agent's own unit,
#      `systemctl start --wait nixos-ami-agent-run.service`, exiting with
#      the agent's exit code) on the instances tagged Fleet = <fleet>,
#      rollout_max_concurrency at a time; rollout_max_errors failures are
#      allowed, the next one stops it ("0": the first failure stops it).
#
# Why a runbook in between: EventBridge cannot start an association. Its
# Systems Manager targets are Run Command (a document sent to instances by
# tag, with no MaxConcurrency or MaxErrors: the whole fleet at once,
# failing or not) and Automation. A runbook whose one step calls
# StartAssociationsOnce keeps the rate control on the association, which
# also runs on instances that join the fleet later and records each
# instance's result as Association compliance. Events are delivered on a
# best-effort basis: the watch timer (services.nixos-ami-agent.watch.enable
# in the configuration the fleet runs), slow, stays the safety net.
#
# Every instance runs the document, also where the change is not for it:
# an instance whose user data names a label (`/fleets/web/target:canary`)
# or another parameter finds nothing to do. Each run reads the parameter
# once (GetParameter, 40 TPS per account and region by default): a sweep
# calls it at about rollout_max_concurrency / (seconds a run takes) per
# second. Runs that find nothing to do take seconds: above a few hundred
# instances, set an absolute rollout_max_concurrency (e.g. "50") rather
# than a percentage.
#
# The instances need the SSM Agent's own permissions to run associations
# (AmazonSSMManagedInstanceCore, attached by default).

locals {
  # The parameter's ARN: arn:PARTITION:ssm:REGION:ACCOUNT:parameter/NAME.
  region     = split(":", aws_ssm_parameter.target.arn)[3]
  account_id = split(":", aws_ssm_parameter.target.arn)[4]
}

# The document, as in the repository. A module from git
# (`//examples/terraform`) has the whole repository at hand.
resource "aws_ssm_document" "converge" {
  count = var.push_rollouts ? 1 : 0

  name            = "NixOSAmiAgent-Converge-${var.fleet}"
  document_type   = "Command"
  document_format = "YAML"
  target_type     = "/AWS::EC2::Instance"
  content         = file("${path.module}/../../ssm-documents/NixOSAmiAgent-Converge.yaml")
}

resource "aws_ssm_association" "converge" {
  count = var.push_rollouts ? 1 : 0

  name             = aws_ssm_document.converge[0].name
  association_name = "${local.name}-converge"

  # The tag the launch template (and the Auto Scaling group) puts on
  # every instance of the fleet.
  targets {
    key    = "tag:Fleet"
    values = [var.fleet]
  }

  max_concurrency     = var.rollout_max_concurrency
  max_errors          = var.rollout_max_errors
  compliance_severity = var.rollout_compliance_severity
  # Without a schedule the association runs when created or changed, on
  # instances that join the fleet, and when the rule below starts it.
  schedule_expression = var.rollout_schedule
}

# Started by EventBridge with the role below, which it also assumes.
resource "aws_ssm_document" "start_rollout" {
  count = var.push_rollouts ? 1 : 0

  name            = "${local.name}-start-rollout"
  document_type   = "Automation"
  document_format = "JSON"
  content = jsonencode({
    schemaVersion = "0.3"
    description   = "Starts a State Manager association once (the fleet's rollout), for an EventBridge rule."
    assumeRole    = "{{ AutomationAssumeRole }}"
    parameters = {
      AssociationId = {
        type           = "String"
        description    = "The association to start."
        allowedPattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
      }
      AutomationAssumeRole = {
        type        = "String"
        description = "The role the automation runs with."
      }
    }
    mainSteps = [{
      name   = "startAssociation"
      action = "aws:executeAwsApi"
      inputs = {
        Service        = "ssm"
        Api            = "StartAssociationsOnce"
        AssociationIds = ["{{ AssociationId }}"]
      }
    }]
  })
}

resource "aws_cloudwatch_event_rule" "rollout" {
  count = var.push_rollouts ? 1 : 0

  name        = "${local.name}-rollout"
  description = "Starts the rollout of fleet ${var.fleet} when its parameter ${local.parameter_name} changes."
  event_pattern = jsonencode({
    source        = ["aws.ssm"]
    "detail-type" = ["Parameter Store Change"]
    detail = {
      name      = [local.parameter_name]
      operation = ["Update", "LabelParameterVersion"]
    }
  })
}

resource "aws_cloudwatch_event_target" "rollout" {
  count = var.push_rollouts ? 1 : 0

  rule      = aws_cloudwatch_event_rule.rollout[0].name
  target_id = "start-rollout"
  # arn:PARTITION:ssm:REGION:ACCOUNT:automation-definition/NAME:VERSION
  arn      = "${replace(aws_ssm_document.start_rollout[0].arn, ":document/", ":automation-definition/")}:$DEFAULT"
  role_arn = aws_iam_role.rollout[0].arn
  input = jsonencode({
    AssociationId        = [aws_ssm_association.converge[0].association_id]
    AutomationAssumeRole = [aws_iam_role.rollout[0].arn]
  })
}

# EventBridge assumes it to start the runbook; the runbook assumes it to
# start the association.
resource "aws_iam_role" "rollout" {
  count = var.push_rollouts ? 1 : 0

  name = "${local.name}-rollout"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = ["events.amazonaws.com", "ssm.amazonaws.com"] }
      Action    = "sts:AssumeRole"
      Condition = { StringEquals = { "aws:SourceAccount" = local.account_id } }
    }]
  })
}

resource "aws_iam_role_policy" "rollout" {
  count = var.push_rollouts ? 1 : 0

  name = "start-rollout"
  role = aws_iam_role.rollout[0].id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid    = "StartRunbook"
        Effect = "Allow"
        Action = ["ssm:StartAutomationExecution"]
        Resource = [
          "${replace(aws_ssm_document.start_rollout[0].arn, ":document/", ":automation-definition/")}:*",
          aws_ssm_document.start_rollout[0].arn,
          "arn:${local.partition}:ssm:${local.region}:${local.account_id}:automation-execution/*",
        ]
      },
      {
        Sid      = "RunbookAssumesThisRole"
        Effect   = "Allow"
        Action   = ["iam:PassRole"]
        Resource = aws_iam_role.rollout[0].arn
        Condition = {
          StringEquals = { "iam:PassedToService" = "ssm.amazonaws.com" }
        }
      },
      {
        Sid      = "StartAssociation"
        Effect   = "Allow"
        Action   = ["ssm:StartAssociationsOnce"]
        Resource = "arn:${local.partition}:ssm:${local.region}:${local.account_id}:association/${aws_ssm_association.converge[0].association_id}"
      },
    ]
  })
}
