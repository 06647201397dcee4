#!/usr/bin/env python3
"""Checks the SSM Command documents in ssm-documents/.

Each document must be what AWS documents for a schemaVersion 2.2 Command
document, checked with a JSON Schema written from the documentation:

- Top-level elements, parameters and their types and fields:
  https://docs.aws.amazon.com/systems-manager/latest/userguide/documents-syntax-data-elements-parameters.html
  (a Command document's parameters are String or StringList only: "Command
  type documents only support the String and StringList parameter types").
- schemaVersion 2.2, mainSteps (action, name, inputs) and `precondition`
  (StringEquals only; platformType Linux, MacOS or Windows):
  https://docs.aws.amazon.com/systems-manager/latest/userguide/documents-schemas-features.html
- The plugins, their inputs (aws:runShellScript: runCommand, a StringList;
  timeoutSeconds and workingDirectory, Strings) and the inputs every plugin
  takes (onFailure, onSuccess, finallyStep):
  https://docs.aws.amazon.com/systems-manager/latest/userguide/documents-command-ssm-plugin-reference.html

and what SSM Agent, which runs them, does with them (aws/amazon-ssm-agent):

- parameter names are `^[a-zA-Z0-9]+$` (agent/framework/docparser/
  parameters/parameters.go, paramNameRegex); `{{ name }}` is replaced in
  every string of the step;
- a timeoutSeconds outside 5..172800 is silently replaced by 3600
  (agent/plugins/pluginutil/pluginutil.go, ValidateExecutionTimeout), so
  it is an error here, for literals and for a referenced parameter's
  default;
- aws:runShellScript writes the runCommand lines joined by newlines to a
  file and runs it with `sh -c` (pluginutil.CreateScriptFile,
  pluginutil_unix.go): the joined lines are checked with `shellcheck -s sh`,
  every `{{ name }}` replaced by a plain word first.

Our own rules on top (stricter than AWS, for this repository): the file
name is the document name (CreateDocument's `^[a-zA-Z0-9_.-]{3,128}$`,
no reserved `aws`/`amazon`/`amzn` prefix); step names are unique and
`^[a-zA-Z0-9_.-]{1,128}$`; every aws:runShellScript step has the
precondition `StringEquals: [platformType, Linux]`; every reference names
a declared parameter and every parameter is referenced; a parameter's
default satisfies its own allowedValues/allowedPattern. YAML is read as
YAML 1.1 (`2.2` unquoted is a number, `yes` a boolean), as most YAML
parsers would, and duplicate keys are errors.

usage: check-ssm-documents.py [FILE_OR_DIR ...]   (default: ssm-documents)
       check-ssm-documents.py --self-test          (mutation checks: broken
                                                    copies must be refused)

Needs jsonschema and ruamel.yaml (both come with check-jsonschema:
target/tools/lint/bin/python, as scripts/test sets it up) and shellcheck.
"""
import copy
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
    import jsonschema
    from ruamel.yaml import YAML
except ImportError as e:  # pragma: no cover
    sys.exit(
        f"check-ssm-documents: {e}; run it with target/tools/lint/bin/python "
        "(pip install check-jsonschema, which brings jsonschema and ruamel.yaml)"
    )

DEFAULT_DIR = "ssm-documents"
PARAM_NAME = r"^[a-zA-Z0-9]+$"
STEP_NAME = r"^[a-zA-Z0-9_.-]{1,128}$"
DOCUMENT_NAME = re.compile(r"^[a-zA-Z0-9_.-]{3,128}$")
RESERVED_PREFIXES = ("aws", "amazon", "amzn")
TIMEOUT_MIN, TIMEOUT_MAX = 5, 172800
# `{{ name }}`, `{{ssm:name}}`: what SSM replaces.
REFERENCE = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")
PLACEHOLDER = "ssm_parameter_value"

PLUGINS = [
    "aws:applications",
    "aws:cloudWatch",
    "aws:configureDocker",
    "aws:configurePackage",
    "aws:domainJoin",
    "aws:downloadContent",
    "aws:psModule",
    "aws:refreshAssociation",
    "aws:runDockerAction",
    "aws:runDocument",
    "aws:runPowerShellScript",
    "aws:runShellScript",
    "aws:softwareInventory",
    "aws:updateAgent",
    "aws:updateSsmAgent",
]

REF_ONLY = {"type": "string", "pattern": r"^\{\{\s*[a-zA-Z0-9]+\s*\}\}$"}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "SSM Command document, schemaVersion 2.2",
    "type": "object",
    "required": ["schemaVersion", "mainSteps"],
    # runtimeConfig is schema 1.2 only; outputs, files, assumeRole are
    # Automation (0.3) elements.
    "additionalProperties": False,
    "properties": {
        "schemaVersion": {"const": "2.2"},
        "description": {"type": "string", "minLength": 1},
        "parameters": {
            "type": "object",
            "propertyNames": {"pattern": PARAM_NAME},
            "additionalProperties": {"$ref": "#/$defs/parameter"},
        },
        "mainSteps": {
            "type": "array",
            "minItems": 1,
            "items": {"$ref": "#/$defs/step"},
        },
    },
    "$defs": {
        "parameter": {
            "type": "object",
            "required": ["type"],
            "additionalProperties": False,
            "properties": {
                # The documented types are String, StringList, Integer,
                # Boolean, MapList and StringMap; a Command document takes
                # only the first two.
                "type": {"enum": ["String", "StringList"]},
                "description": {"type": "string"},
                "default": {
                    "oneOf": [
                        {"type": "string"},
                        {"type": "array", "items": {"type": "string"}},
                    ]
                },
                "allowedValues": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "string"},
                },
                "allowedPattern": {"type": "string", "minLength": 1},
                "displayType": {"enum": ["textfield", "textarea"]},
                "minItems": {"type": "integer", "minimum": 0},
                "maxItems": {"type": "integer", "minimum": 0},
                "minChars": {"type": "integer", "minimum": 0},
                "maxChars": {"type": "integer", "minimum": 0},
            },
            "allOf": [
                {
                    "if": {"properties": {"type": {"const": "String"}}},
                    "then": {"properties": {"default": {"type": "string"}}},
                },
                {
                    "if": {"properties": {"type": {"const": "StringList"}}},
                    "then": {
                        "properties": {
                            "default": {
                                "oneOf": [
                                    {"type": "array", "items": {"type": "string"}},
                                    # A Parameter Store reference.
                                    {"type": "string", "pattern": r"^\{\{\s*ssm:[^{}]+\}\}$"},
                                ]
                            }
                        }
                    },
                },
            ],
        },
        "step": {
            "type": "object",
            "required": ["action", "name", "inputs"],
            "additionalProperties": False,
            "properties": {
                "action": {"enum": PLUGINS},
                "name": {"type": "string", "pattern": STEP_NAME},
                "precondition": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["StringEquals"],
                    "properties": {
                        "StringEquals": {
                            "type": "array",
                            "minItems": 2,
                            "maxItems": 2,
                            "items": {"type": "string"},
                        }
                    },
                },
                "inputs": {"type": "object"},
            },
            "allOf": [
                {
                    "if": {"properties": {"action": {"const": "aws:runShellScript"}}},
                    "then": {
                        "required": ["precondition"],
                        "properties": {
                            "precondition": {
                                "properties": {
                                    "StringEquals": {
                                        "prefixItems": [
                                            {"const": "platformType"},
                                            {"const": "Linux"},
                                        ]
                                    }
                                }
                            },
                            "inputs": {"$ref": "#/$defs/runShellScriptInputs"},
                        },
                    },
                }
            ],
        },
        "runShellScriptInputs": {
            "type": "object",
            "required": ["runCommand"],
            "additionalProperties": False,
            "properties": {
                "runCommand": {
                    "oneOf": [
                        {"type": "array", "minItems": 1, "items": {"type": "string"}},
                        # A StringList parameter, whole.
                        REF_ONLY,
                    ]
                },
                "timeoutSeconds": {
                    "oneOf": [
                        {"type": "string", "pattern": r"^[0-9]+$"},
                        {"type": "integer"},
                        REF_ONLY,
                    ]
                },
                "workingDirectory": {"type": "string"},
                "onFailure": {"enum": ["exit", "successAndExit"]},
                "onSuccess": {"enum": ["exit"]},
                "finallyStep": {"type": "boolean"},
            },
        },
    },
}
jsonschema.Draft202012Validator.check_schema(SCHEMA)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def yaml_loader():
    y = YAML(typ="safe", pure=True)
    y.version = (1, 1)
    return y


def path_of(error):
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path) or "(top)"


def references(value):
    """Every `{{ name }}` in the strings of value."""
    if isinstance(value, str):
        yield from REFERENCE.findall(value)
    elif isinstance(value, list):
        for v in value:
            yield from references(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from references(v)


def shellcheck(script):
    """shellcheck's findings on one script (sh), or an empty string."""
    run = subprocess.run(
        ["shellcheck", "--shell=sh", "--format=gcc", "-"],
        input=script,
        capture_output=True,
        text=True,
    )
    if run.returncode == 0:
        return ""
    return (run.stdout + run.stderr).strip() or f"shellcheck exited {run.returncode}"


def check_document(path):
    """The problems of one document, as messages; empty when it is valid."""
    problems = []
    name = os.path.basename(path)
    stem, ext = os.path.splitext(name)
    if ext not in (".yaml", ".yml", ".json"):
        return [f"{path}: not a .yaml, .yml or .json document"]
    if not DOCUMENT_NAME.match(stem) or stem.lower().startswith(RESERVED_PREFIXES):
        problems.append(
            f"{path}: the file name is the document name: {stem!r} must match "
            f"{DOCUMENT_NAME.pattern} and not start with {'/'.join(RESERVED_PREFIXES)}"
        )
    try:
        with open(path) as f:
            text = f.read()
        doc = json.loads(text) if ext == ".json" else yaml_loader().load(text)
    except Exception as e:  # YAML or JSON syntax, duplicate keys
        return problems + [f"{path}: does not parse: {e}"]

    for error in sorted(VALIDATOR.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        message = error.message if len(error.message) <= 300 else error.message[:300] + " ..."
        problems.append(f"{path}: {path_of(error)}: {message}")
    if problems or not isinstance(doc, dict):
        return problems

    params = doc.get("parameters") or {}
    steps = doc["mainSteps"]

    # Every reference names a declared parameter (or Parameter Store), and
    # every parameter is used.
    used = set()
    for i, step in enumerate(steps):
        for ref in references(step):
            if ref.startswith(("ssm:", "ssm-secure:")):
                continue
            used.add(ref)
            if ref not in params:
                problems.append(f"{path}: mainSteps[{i}] ({step['name']}): {{{{ {ref} }}}} is not a declared parameter")
    for p in sorted(set(params) - used):
        problems.append(f"{path}: parameters.{p}: declared but never referenced")

    # Defaults within their own constraints.
    for p, spec in params.items():
        if "default" not in spec:
            continue
        values = spec["default"] if isinstance(spec["default"], list) else [spec["default"]]
        for v in values:
            if REFERENCE.fullmatch(v.strip()):
                continue
            if "allowedValues" in spec and v not in spec["allowedValues"]:
                problems.append(f"{path}: parameters.{p}: default {v!r} is not in allowedValues")
            if "allowedPattern" in spec:
                try:
                    if not re.fullmatch(spec["allowedPattern"], v):
                        problems.append(
                            f"{path}: parameters.{p}: default {v!r} does not match allowedPattern"
                        )
                except re.error as e:
                    problems.append(f"{path}: parameters.{p}: allowedPattern does not compile: {e}")

    names = [s["name"] for s in steps]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{path}: mainSteps: step name {n!r} is used more than once")

    for i, step in enumerate(steps):
        where = f"{path}: mainSteps[{i}] ({step['name']})"
        inputs = step["inputs"]
        if "timeoutSeconds" in inputs:
            t = inputs["timeoutSeconds"]
            ref = REFERENCE.fullmatch(t.strip()) if isinstance(t, str) else None
            if ref:
                spec = params.get(ref.group(1), {})
                t = spec.get("default")
                what = f"the default of {ref.group(1)}"
                if t is None:
                    problems.append(f"{where}: timeoutSeconds: {ref.group(1)} has no default")
            else:
                what = "timeoutSeconds"
            if t is not None and not (str(t).isdigit() and TIMEOUT_MIN <= int(t) <= TIMEOUT_MAX):
                problems.append(
                    f"{where}: {what} is {t!r}: SSM Agent replaces a timeout outside "
                    f"{TIMEOUT_MIN}..{TIMEOUT_MAX} seconds by 3600"
                )
        if step["action"] == "aws:runShellScript" and isinstance(inputs["runCommand"], list):
            script = "\n".join(inputs["runCommand"]) + "\n"
            script = REFERENCE.sub(PLACEHOLDER, script)
            findings = shellcheck(script)
            if findings:
                problems.append(f"{where}: runCommand (as one sh script) fails shellcheck:\n{findings}")
    return problems


def documents(args):
    paths = []
    for a in args or [DEFAULT_DIR]:
        if os.path.isdir(a):
            found = sorted(
                p for ext in ("yaml", "yml", "json") for p in glob.glob(os.path.join(a, f"*.{ext}"))
            )
            if not found:
                sys.exit(f"check-ssm-documents: no documents in {a}")
            paths += found
        else:
            paths.append(a)
    return paths


def check(paths):
    problems = []
    for p in paths:
        found = check_document(p)
        problems += found
        if not found:
            print(f"{p}: valid (schemaVersion 2.2 Command document; runCommand passes shellcheck)")
    return problems


# --- mutation checks -------------------------------------------------------


def mutations(doc):
    """(what, expected message part, (file name, mutate)) for the
    self-test: mutate(name, text) returns the broken document's file name
    and text, as JSON (which is YAML too) or as edited YAML text."""

    def on_doc(f):
        def mutate(name, text):
            d = copy.deepcopy(doc)
            f(d)
            return os.path.splitext(name)[0] + ".json", json.dumps(d, indent=2)

        return mutate

    def on_text(old, new):
        def mutate(name, text):
            assert old in text, old
            return name, text.replace(old, new, 1)

        return mutate

    def renamed(prefix):
        def mutate(name, text):
            return prefix + name, text

        return mutate

    step = lambda d: d["mainSteps"][0]  # noqa: E731
    shell = lambda d: step(d)["inputs"]["runCommand"]  # noqa: E731
    first_param = next(iter(doc.get("parameters") or {"x": None}))
    return [
        ("schemaVersion unquoted (a number)", "schemaVersion", on_text('schemaVersion: "2.2"', "schemaVersion: 2.2")),
        ("schemaVersion 1.2", "schemaVersion", on_doc(lambda d: d.update(schemaVersion="1.2"))),
        ("a schema 1.2 element", "runtimeConfig", on_doc(lambda d: d.update(runtimeConfig={}))),
        ("no mainSteps", "mainSteps", on_doc(lambda d: d.pop("mainSteps"))),
        ("a misspelt plugin", "aws:runShellscript", on_doc(lambda d: step(d).update(action="aws:runShellscript"))),
        ("inputs as a list", "inputs", on_doc(lambda d: step(d).update(inputs=[step(d)["inputs"]]))),
        ("runCommand as one string", "runCommand", on_doc(lambda d: step(d)["inputs"].update(runCommand="echo hi"))),
        ("an unknown input", "commands", on_doc(lambda d: step(d)["inputs"].update(commands=["echo hi"]))),
        ("no precondition", "precondition", on_doc(lambda d: step(d).pop("precondition"))),
        (
            "precondition for Windows",
            "Linux",
            on_doc(lambda d: step(d).update(precondition={"StringEquals": ["platformType", "Windows"]})),
        ),
        ("a step name with a space", "name", on_doc(lambda d: step(d).update(name="converge now"))),
        ("two steps of one name", "used more than once", on_doc(lambda d: d["mainSteps"].append(copy.deepcopy(step(d))))),
        ("an Integer parameter", "type", on_doc(lambda d: d["parameters"][first_param].update(type="Integer"))),
        ("a parameter name with a dash", "parameters", on_doc(lambda d: d["parameters"].update({"execution-timeout": {"type": "String"}}))),
        ("an unused parameter", "never referenced", on_doc(lambda d: d["parameters"].update(unused={"type": "String"}))),
        (
            "an undeclared reference",
            "not a declared parameter",
            on_doc(lambda d: shell(d).append('echo "{{ undeclared }}"')),
        ),
        ("a default outside allowedPattern", "allowedPattern", on_doc(lambda d: d["parameters"][first_param].update(default="forever"))),
        ("a timeout SSM Agent ignores", "3600", on_doc(lambda d: d["parameters"][first_param].update(default="3", allowedPattern="^[0-9]+$"))),
        ("unquoted expansion (SC2086)", "SC2086", on_doc(lambda d: shell(d).append("echo $rc"))),
        ("bash-only syntax in sh (SC3010)", "SC3010", on_doc(lambda d: shell(d).append('[[ -n "$rc" ]] && echo set'))),
        ("a duplicate key", "duplicate key", on_text("mainSteps:\n", "description: again\nmainSteps:\n")),
        ("a document name with a reserved prefix", "file name", renamed("AWS-")),
    ]


def self_test():
    paths = documents([])
    assert paths, "no documents to test"
    failures = 0
    for original in paths:
        with open(original) as f:
            text = f.read()
        problems = check_document(original)
        if problems:
            print("\n".join(problems))
            print(f"self-test: {original} itself is not valid")
            return 1
        doc = yaml_loader().load(text)
        with tempfile.TemporaryDirectory() as tmp:
            for what, expected, mutate in mutations(doc):
                name, broken_text = mutate(os.path.basename(original), text)
                broken = os.path.join(tmp, name)
                with open(broken, "w") as f:
                    f.write(broken_text)
                found = check_document(broken)
                ok = bool(found) and any(expected in p for p in found)
                failures += not ok
                first = found[0].splitlines()[0] if found else "accepted"
                print(f"  {'refused' if ok else 'NOT REFUSED'}: {what}: {first.replace(tmp + os.sep, '')}")
                if found and not ok:
                    print("    expected a message with", repr(expected), "got:", *found, sep="\n    ")
                os.remove(broken)
    if failures:
        print(f"self-test: {failures} broken document(s) were not refused")
        return 1
    print(f"self-test: every broken variant of {len(paths)} document(s) was refused")
    return 0


def main(argv):
    if shutil.which("shellcheck") is None:
        sys.exit("check-ssm-documents: shellcheck is not installed (Debian: apt-get install shellcheck)")
    if argv[:1] == ["--self-test"]:
        return self_test()
    problems = check(documents(argv))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"check-ssm-documents: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
