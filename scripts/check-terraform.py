#!/usr/bin/env python3
"""Checks examples/terraform.

Everywhere, without Terraform (python-hcl2): every file parses, the example
keeps what its README promises (among them the push rollouts of
rollouts.tf: the repository's Command document, an association with rate
control on the fleet's tag, an EventBridge rule on the fleet's parameter;
and the instance role's ssm:PutComplianceItems), and its plain user data
and the tfvars example's target pass the agent's own `validate`.

With RENDERED, a JSON file that scripts/test has Terraform write (a root
module calling the example for several fleets; per fleet the user data
Terraform built and what it was built from): each fleet's user data passes
`validate` and holds exactly the settings and scripts it was given.

usage: check-terraform.py AGENT_BINARY [RENDERED]
"""
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

import hcl2

EXAMPLE = "examples/terraform"
EC2_USER_DATA_MAX = 16 * 1024
MANAGED_CORE = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"

agent = sys.argv[1]
rendered = sys.argv[2] if len(sys.argv) > 2 else None


def load(path):
    with open(path) as f:
        return hcl2.load(f)  # raises on a syntax error


docs = {p: load(p) for p in sorted(glob.glob(f"{EXAMPLE}/*.tf"))}
tests = {p: load(p) for p in sorted(glob.glob(f"{EXAMPLE}/tests/*.tftest.hcl"))}
tfvars = load(f"{EXAMPLE}/terraform.tfvars.example")
print(f"parsed {len(docs)} .tf files, {len(tests)} test files, terraform.tfvars.example")
assert tests, "examples/terraform/tests: the terraform test suite is missing"


def unquote(s):
    return s[1:-1] if isinstance(s, str) and len(s) >= 2 and s[0] == s[-1] == '"' else s


def normalise(v):
    """Labels and strings as Terraform means them, without the quotes and
    bookkeeping keys python-hcl2 keeps."""
    if isinstance(v, dict):
        return {unquote(k): normalise(x) for k, x in v.items() if not k.startswith("__")}
    if isinstance(v, list):
        return [normalise(x) for x in v]
    return unquote(v)


def heredoc(s):
    """`<<-EOT ... EOT`: the body, with the common indentation removed."""
    m = re.fullmatch(r"<<-?(\w+)\n(.*?)\n\s*\1", s, re.S)
    assert m, f"not a heredoc: {s!r}"
    lines = m.group(2).split("\n")
    indent = min(len(l) - len(l.lstrip()) for l in lines if l.strip())
    return "\n".join(l[indent:] for l in lines) + "\n"


def blocks(kind):
    for doc in docs.values():
        for entry in doc.get(kind, []):
            yield normalise(entry)


def labelled(kind, rtype):
    """{name: body} of every `kind "rtype" "name"` block."""
    out = {}
    for entry in blocks(kind):
        out.update(entry.get(rtype, {}))
    return out


def one(kind, rtype):
    found = labelled(kind, rtype)
    assert len(found) == 1, f"expected one {kind} {rtype}, found {sorted(found)}"
    return next(iter(found.values()))


def local(name):
    values = [l[name] for l in blocks("locals") if name in l]
    assert len(values) == 1, f"local.{name}: {values}"
    return values[0]


def agent_validate(text, *flags):
    """The agent's verdict on one document, as its --json reports it."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write(text)
        f.flush()
        run = subprocess.run(
            [agent, "validate", "--json", *flags, f.name], capture_output=True, text=True
        )
    [result] = json.loads(run.stdout)
    assert run.returncode == 0 and result["valid"], (text, run.stdout, run.stderr)
    return result


# Only hashicorp/aws, and no provider configuration: it must validate with
# the aws provider alone and work as a module (with count and for_each).
providers = {}
for t in blocks("terraform"):
    for rp in t.get("required_providers", []):
        providers.update(rp)
assert set(providers) == {"aws"}, f"required_providers other than aws: {sorted(providers)}"
assert providers["aws"]["source"] == "hashicorp/aws", providers
assert not list(blocks("provider")), "a provider block: the example must work as a module"
for kind in ("data", "resource"):
    for entry in blocks(kind):
        for rtype in entry:
            assert rtype.startswith("aws_"), f"{kind} {rtype}: only the aws provider"

# The AMI of your own publication, through the SSM parameter
# nixos-ami-publish writes; never someone else's image without the agent.
assert not labelled("data", "aws_ami"), "no aws_ami data source"
assert local("image_id") == "resolve:ssm:${var.ami_parameter}", local("image_id")
variables = {k: v for b in blocks("variable") for k, v in b.items()}
default = variables["ami_parameter"]["default"]
assert re.fullmatch(r"/.+/(x86_64|aarch64)-linux/latest", default), default

# One launch template, always; IMDSv2 only; the user data checked for size.
template = one("resource", "aws_launch_template")
assert "count" not in template and "for_each" not in template, template
assert template["image_id"] == "${local.image_id}", template["image_id"]
assert template["metadata_options"][0]["http_tokens"] == "required", template
assert "iam_instance_profile" in template
assert template["user_data"] == "${local.user_data_b64}", template["user_data"]
conditions = [p["condition"] for l in template.get("lifecycle", []) for p in l.get("precondition", [])]
assert f"${{local.user_data_bytes <= {EC2_USER_DATA_MAX}}}" in conditions, conditions

group = one("resource", "aws_autoscaling_group")
assert group["count"] == "${var.create_autoscaling_group ? 1 : 0}", group.get("count")
assert group["launch_template"][0]["id"] == "${aws_launch_template.fleet.id}", group

# Terraform creates the fleet's parameter but never sets its value back:
# rollouts change it with `aws ssm put-parameter --overwrite`.
parameter = one("resource", "aws_ssm_parameter")
ignored = [i for l in parameter.get("lifecycle", []) for i in l.get("ignore_changes", [])]
assert "value" in ignored, f"aws_ssm_parameter: lifecycle.ignore_changes lacks value: {ignored}"

# The inline policy reads the fleet's parameter (and decrypts it with its
# customer-managed key), nothing else.
policies = labelled("resource", "aws_iam_role_policy")
FLEET_ROLE = "${aws_iam_role.fleet.id}"
assert policies["read_target"]["role"] == FLEET_ROLE, policies["read_target"]
policy = policies["read_target"]["policy"]
assert re.search(
    r'Action = \["ssm:GetParameter"\], Resource = aws_ssm_parameter\.target\.arn\}', policy
), policy
assert re.search(r'Action = \["kms:Decrypt"\], Resource = var\.parameter_kms_key_arn,', policy), policy
assert '"kms:EncryptionContext:PARAMETER_ARN" = aws_ssm_parameter.target.arn' in policy, policy
assert "*" not in policy, f"a wildcard in the fleet's inline policy: {policy}"

# The agent reports each run's outcome on its own instance (SSM Compliance,
# PutComplianceItems): the instance role may, whatever else is attached.
# That statement is the only "*" in the instance role's own policies.
fleet_policies = {n: p["policy"] for n, p in policies.items() if p.get("role") == FLEET_ROLE}
reporting = [n for n, p in fleet_policies.items() if '"ssm:PutComplianceItems"' in p]
assert reporting, f"no policy of the instance role allows ssm:PutComplianceItems: {sorted(fleet_policies)}"
for n, p in fleet_policies.items():
    assert "count" not in policies[n], f"aws_iam_role_policy.{n}: the instance role's policies are unconditional"
    if "*" in p:
        assert re.fullmatch(
            r'\$\{jsonencode\(\{Version = "2012-10-17", Statement = \[\{Sid = "\w+", Effect = "Allow", '
            r'Action = \["ssm:PutComplianceItems"\], Resource = "\*"\}\]\}\)\}',
            p,
        ), f"aws_iam_role_policy.{n}: a wildcard beyond ssm:PutComplianceItems: {p}"

# Session Manager and Run Command instead of SSH, in every partition.
attachment = one("resource", "aws_iam_role_policy_attachment")
assert attachment["policy_arn"] == MANAGED_CORE, attachment
assert local("partition") == "${data.aws_partition.current.partition}", local("partition")

# Every variable documented and typed; only the fleet and its first target
# are required.
for name, v in variables.items():
    assert v.get("description"), f"variable {name}: no description"
    assert v.get("type"), f"variable {name}: no type"
required = {name for name, v in variables.items() if "default" not in v}
assert required == {"fleet", "flake_ref"}, required
for name in ("fleet", "flake_ref", "parameter_name", "subnet_ids", "user_data_scripts"):
    assert variables[name].get("validation"), f"variable {name}: no validation"

# Push rollouts: when the parameter changes, EventBridge starts (through
# a one-step runbook) a State Manager association that runs the
# repository's Command document on the fleet's instances, with rate
# control. Each piece exists exactly when push_rollouts is true.
PUSH = "${var.push_rollouts ? 1 : 0}"
assert variables["push_rollouts"]["type"] == "bool", variables["push_rollouts"]
assert isinstance(variables["push_rollouts"].get("default"), bool), variables["push_rollouts"]
documents = labelled("resource", "aws_ssm_document")
association = one("resource", "aws_ssm_association")
rule = one("resource", "aws_cloudwatch_event_rule")
target = one("resource", "aws_cloudwatch_event_target")
rollout_role = labelled("resource", "aws_iam_role")["rollout"]
for what, r in [("aws_ssm_document.converge", documents["converge"]),
                ("aws_ssm_document.start_rollout", documents["start_rollout"]),
                ("aws_ssm_association", association), ("aws_cloudwatch_event_rule", rule),
                ("aws_cloudwatch_event_target", target), ("aws_iam_role.rollout", rollout_role),
                ("aws_iam_role_policy.rollout", policies["rollout"])]:
    assert r.get("count") == PUSH, f"{what}: count is not {PUSH}: {r.get('count')}"

# The Command document is the repository's file, read as it is.
converge = documents["converge"]
assert (converge["document_type"], converge["document_format"]) == ("Command", "YAML"), converge
m = re.fullmatch(r'\$\{file\("\$\{path\.module\}/([^"]+)"\)\}', converge["content"])
assert m, f"aws_ssm_document.converge: content is not file(\"${{path.module}}/...\"): {converge['content']}"
document_file = os.path.normpath(os.path.join(EXAMPLE, m.group(1)))
assert document_file.startswith("ssm-documents" + os.sep) and document_file.endswith(".yaml"), document_file
assert os.path.isfile(document_file), f"aws_ssm_document.converge reads {document_file}, which does not exist"

# The association runs it on the fleet's tag, with rate control.
assert association["name"] == "${aws_ssm_document.converge[0].name}", association
[targets] = association["targets"]
assert targets["key"] == "tag:Fleet" and targets["values"] == ["${var.fleet}"], targets
fleet_tags = template["tag_specifications"][0]["tags"]
assert fleet_tags.get("Fleet") == "${var.fleet}", f"the launch template does not tag Fleet = var.fleet: {fleet_tags}"
assert association.get("max_concurrency") == "${var.rollout_max_concurrency}", association
assert association.get("max_errors") == "${var.rollout_max_errors}", association
assert association.get("compliance_severity"), "aws_ssm_association: no compliance_severity"
# "0": the first failure (a failing canary) stops the rollout.
assert variables["rollout_max_errors"]["default"] == "0", variables["rollout_max_errors"]
assert re.fullmatch(r"[1-9][0-9]*|[1-9][0-9]?%|100%", variables["rollout_max_concurrency"]["default"])
for name in ("rollout_max_concurrency", "rollout_max_errors", "rollout_schedule"):
    assert variables[name].get("validation"), f"variable {name}: no validation"

# The rule fires on changes of this fleet's parameter, and starts the
# runbook, which starts this association.
pattern = rule["event_pattern"]
for needle in ['source = ["aws.ssm"]', '"detail-type" = ["Parameter Store Change"]',
               "name = [local.parameter_name]", '"Update"']:
    assert needle in pattern, f"aws_cloudwatch_event_rule: event_pattern lacks {needle}: {pattern}"
assert target["rule"] == "${aws_cloudwatch_event_rule.rollout[0].name}", target
assert ":automation-definition/" in target["arn"] and "aws_ssm_document.start_rollout[0].arn" in target["arn"], target
assert target["role_arn"] == "${aws_iam_role.rollout[0].arn}", target
assert "AssociationId = [aws_ssm_association.converge[0].association_id]" in target["input"], target
runbook = documents["start_rollout"]
assert runbook["document_type"] == "Automation", runbook
assert 'Api = "StartAssociationsOnce"' in runbook["content"], runbook["content"]
assert '"events.amazonaws.com"' in rollout_role["assume_role_policy"], rollout_role
for action in ("ssm:StartAutomationExecution", "iam:PassRole", "ssm:StartAssociationsOnce"):
    assert f'"{action}"' in policies["rollout"]["policy"], f"aws_iam_role_policy.rollout lacks {action}"
assert "association/${aws_ssm_association.converge[0].association_id}" in policies["rollout"]["policy"]

outputs = {k for o in blocks("output") for k in o}
wanted = {
    "launch_template_id",
    "autoscaling_group_name",
    "role_name",
    "role_arn",
    "instance_profile_name",
    "ssm_parameter",
    "flakehub_principal",
    "user_data",
    "converge_document_name",
    "rollout_association_id",
}
assert wanted <= outputs, f"outputs missing: {sorted(wanted - outputs)}"

# What the comments say about the watch timer: the image does not enable
# it, the target configuration's services.nixos-ami-agent.watch.enable does.
for path in docs:
    with open(path) as f:
        comments = " ".join(l.split("#", 1)[1] for l in f if l.lstrip().startswith("#"))
    if "timer" in comments:
        assert "watch.enable" in comments, f"{path}: a timer comment without watch.enable"
        assert not re.search(r"timer enabled in the image", comments), path

# The tfvars example: declared variables only, every required one, and a
# first target the agent accepts as a parameter value.
given = set(normalise(tfvars))
assert given <= set(variables), f"terraform.tfvars.example: undeclared {sorted(given - set(variables))}"
assert required | {"subnet_ids"} <= given, f"terraform.tfvars.example lacks {sorted(required - given)}"
agent_validate(normalise(tfvars)["flake_ref"] + "\n", "--ssm-value")

with open(f"{EXAMPLE}/README.md") as f:
    readme = f.read()
for needle in [*sorted(required), "subnet_ids", "terraform.tfvars.example", "put-parameter", "--overwrite",
               "ignore_changes", "AmazonSSMManagedInstanceCore", "watch.enable", 'source = "',
               "push_rollouts", "rollout_max_concurrency", "rollout_max_errors", "NixOSAmiAgent-Converge",
               "ssm:PutComplianceItems", "start-associations-once"]:
    assert needle in readme, f"examples/terraform/README.md does not mention {needle}"

# The plain user data, with Terraform's interpolation done by hand.
settings = heredoc(local("agent_settings"))
values = {"local.parameter_name": "/fleets/example/target", "var.reboot": variables["reboot"]["default"]}
settings = re.sub(r"\$\{jsonencode\(([\w.]+)\)\}", lambda m: json.dumps(values[m.group(1)]), settings)
user_data = local("user_data")
plain = '"#nixos-ami-agent\\n${local.agent_settings}"'
assert plain in user_data, user_data
user_data = "#nixos-ami-agent\n" + settings
assert "${" not in user_data, user_data
result = agent_validate(user_data)
assert result["kind"] == "#nixos-ami-agent TOML settings", result
assert result["settings"] == {"ssm-parameter": "/fleets/example/target", "reboot": "if-needed"}, result
print("examples/terraform (HCL): ok")

if rendered:
    with open(rendered) as f:
        fleets = json.load(f)
    assert len(fleets) >= 2, fleets
    kinds = set()
    for name, fleet in sorted(fleets.items()):
        user_data = fleet["user_data"]
        size = len(user_data.encode())
        assert size <= EC2_USER_DATA_MAX, (name, size)
        result = agent_validate(user_data)
        want = {"ssm-parameter": fleet["ssm_parameter"], "reboot": fleet["reboot"]}
        assert result["settings"] == want, (name, result, want)
        scripts = [
            re.fullmatch(r"part \d+ \((\S+)\) \((\d+) bytes, sha256 ([0-9a-f]{64})\)", s).groups()
            for s in result["scripts"]
        ]
        given = [
            (n, str(len(s.encode())), hashlib.sha256(s.encode()).hexdigest())
            for n, s in sorted(fleet["scripts"].items())
        ]
        assert scripts == given, (name, scripts, given)
        kind = "MIME multipart" if given else "#nixos-ami-agent TOML settings"
        assert result["kind"] == kind and not result["ignored"], (name, result)
        kinds.add(kind)
        agent_validate(fleet["flake_ref"] + "\n", "--ssm-value")
        print(f"  fleet {name}: {result['kind']}, {len(scripts)} scripts, {size} bytes: valid")
    assert len(kinds) == 2, f"the rendered fleets cover only {kinds}"
    print(f"{os.path.relpath(rendered)}: ok")
