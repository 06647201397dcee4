#!/usr/bin/env python3
"""Checks examples/terraform without Terraform (not installable here): every
file parses as HCL (python-hcl2), the example keeps what the README
promises, and its user data passes the agent's own `validate`.

usage: check-terraform.py AGENT_BINARY
"""
import glob
import json
import re
import subprocess
import sys
import tempfile

import hcl2

agent = sys.argv[1]
docs = {}
for path in sorted(glob.glob("examples/terraform/*.tf")):
    with open(path) as f:
        docs[path] = hcl2.load(f)  # raises on a syntax error
print(f"parsed {len(docs)} files")


def unquote(s):
    return s[1:-1] if isinstance(s, str) and len(s) >= 2 and s[0] == s[-1] == '"' else s


def normalise(v):
    """Labels and strings as Terraform means them, without the quotes
    python-hcl2 keeps."""
    if isinstance(v, dict):
        return {unquote(k): normalise(x) for k, x in v.items() if not k.startswith("__")}
    if isinstance(v, list):
        return [normalise(x) for x in v]
    return unquote(v)


def heredoc(s):
    """`<<-EOT ... EOT`: the body, with the common indentation removed."""
    m = re.fullmatch(r"<<-?(\w+)\n(.*?)\n\s*\1", s, re.S)
    if not m:
        return s
    lines = m.group(2).split("\n")
    indent = min(len(l) - len(l.lstrip()) for l in lines if l.strip())
    return "\n".join(l[indent:] for l in lines) + "\n"


def blocks(kind):
    for doc in docs.values():
        for entry in doc.get(kind, []):
            yield normalise(entry)


def resources(rtype):
    for entry in blocks("resource"):
        if rtype in entry:
            yield from entry[rtype].values()


# The AMI of your own publication, through the SSM parameter
# nixos-ami-publish writes; never someone else's image without the agent.
assert not any("aws_ami" in b for b in blocks("data")), "no aws_ami data source"
image_id = next(l["image_id"] for l in blocks("locals") if "image_id" in l)
assert image_id == "resolve:ssm:${var.ami_parameter}", image_id
default = next(v["ami_parameter"]["default"] for v in blocks("variable") if "ami_parameter" in v)
assert re.fullmatch(r"/.+/(x86_64|aarch64)-linux/latest", default), default

templates = list(resources("aws_launch_template"))
assert len(templates) == 2, templates
for t in templates:
    assert t["image_id"] == "${local.image_id}", t["image_id"]
    meta = t["metadata_options"][0]
    assert unquote(meta["http_tokens"]) == "required", meta
    assert "iam_instance_profile" in t

policy = next(resources("aws_iam_role_policy"))["policy"]
assert "ssm:GetParameter" in policy and "*" not in policy.split("Action")[1].split("]")[0], policy
assert next(resources("aws_autoscaling_group"))
outputs = {k for o in blocks("output") for k in o}
assert {"role_arn", "flakehub_principal"} <= outputs, outputs

# The user data, with Terraform's interpolation done by hand.
user_data = heredoc(next(l["user_data"] for l in blocks("locals") if "user_data" in l))
user_data = user_data.replace("${aws_ssm_parameter.target.name}", "/fleets/example/target")
assert "${" not in user_data, user_data
with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
    f.write(user_data)
    f.flush()
    subprocess.run([agent, "validate", f.name], check=True)
print("examples/terraform: ok")
