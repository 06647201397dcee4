//! The documentation's examples are exercised, in the README (the
//! operator's guide) and in CONTRIBUTING.md: every user-data example
//! passes `validate`; every `nixos-ami-agent ...` command shown runs
//! against the doubles with a valid command line; every option shown for
//! `nixos-ami-agent` or `nixos-ami-publish` exists; the repository paths
//! named exist; links between the files point at headings that exist; the
//! README keeps its two commands. (`scripts/test` also runs the README's
//! build-and-plan command through cargo; aws, terraform, nix and
//! journalctl commands need the real services.)

use nixos_ami_agent_tests::harness::{REF, Scenario, host_bin, workspace_bin};
use nixos_ami_agent_tests::ssm::Param;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The documents checked, relative to the repository.
const DOCS: [&str; 2] = ["README.md", "CONTRIBUTING.md"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn doc(name: &str) -> String {
    std::fs::read_to_string(repo().join(name))
        .unwrap_or_else(|e| panic!("{name} cannot be read: {e}"))
}

fn readme() -> String {
    doc("README.md")
}

/// Fenced code blocks: (info string, body).
fn blocks(text: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        match (&mut current, trimmed.strip_prefix("```")) {
            (None, Some(info)) => current = Some((info.trim().to_owned(), String::new())),
            (Some(_), Some(_)) => out.push(current.take().unwrap()),
            (Some((_, body)), None) => {
                // Blocks inside list items are indented.
                let indent = line.len() - trimmed.len();
                body.push_str(line.get(indent.min(3)..).unwrap_or(trimmed));
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

/// The text outside fenced code blocks.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Inline code spans outside fenced blocks (which may wrap across lines),
/// whitespace collapsed.
fn spans(text: &str) -> Vec<String> {
    prose(text)
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// Commands in fenced blocks, one per logical line: a line ending in `\`,
/// or followed by indented lines (a synopsis), goes on.
fn block_commands(text: &str) -> Vec<String> {
    let mut out = vec![];
    for (info, body) in blocks(text) {
        if !(info.is_empty() || info == "sh") {
            continue;
        }
        let mut current: Option<String> = None;
        for line in body.lines() {
            let continues = line.starts_with(char::is_whitespace)
                || current.as_deref().is_some_and(|c| c.ends_with('\\'));
            match &mut current {
                Some(c) if continues => {
                    c.truncate(c.trim_end_matches('\\').trim_end().len());
                    c.push(' ');
                    c.push_str(line.trim());
                }
                _ => {
                    out.extend(current.take());
                    current = Some(line.trim().to_owned());
                }
            }
        }
        out.extend(current);
    }
    out
}

fn is_user_data(body: &str) -> bool {
    let first = body.trim_start();
    first.starts_with("#nixos-ami-agent")
        || first.starts_with("{\"nixos-ami-agent\"")
        || first.starts_with("#!")
}

fn user_data_examples(text: &str) -> Vec<String> {
    blocks(text)
        .into_iter()
        .map(|(_, b)| b)
        .filter(|b| is_user_data(b))
        .collect()
}

#[test]
fn every_user_data_example_validates() {
    let s = Scenario::new();
    let readme_examples = user_data_examples(&readme());
    assert!(
        readme_examples.len() >= 4,
        "the README lost its examples: {readme_examples:?}"
    );
    for name in DOCS {
        for (i, ud) in user_data_examples(&doc(name)).iter().enumerate() {
            let file = s.path(&format!("example-{i}"));
            std::fs::write(&file, ud.trim_start()).unwrap();
            let out = s.run(&["validate", file.to_str().unwrap()]);
            assert_eq!(
                out.code, 0,
                "{name} example {i} does not validate:\n{ud}\n{out:?}"
            );
        }
    }
}

/// The agent's command lines in a document's fenced blocks: lines that
/// start with `nixos-ami-agent` (or `sudo nixos-ami-agent`), and the
/// agent's command inside another (Run Command's
/// `commands=["/run/current-system/sw/bin/nixos-ami-agent ..."]`).
fn agent_command_lines(text: &str) -> Vec<String> {
    let mut out = vec![];
    for (info, body) in blocks(text) {
        if !(info.is_empty() || info == "sh") {
            continue;
        }
        for line in body.lines() {
            let line = line.trim_start();
            let line = line.strip_prefix("sudo ").unwrap_or(line);
            if line.starts_with("nixos-ami-agent ") {
                out.push(line.to_owned());
            } else if let Some((_, rest)) = line.split_once("/bin/nixos-ami-agent ") {
                let end = rest.find(['"', '\'']).unwrap_or(rest.len());
                out.push(format!("nixos-ami-agent {}", &rest[..end]));
            }
        }
    }
    out
}

#[test]
fn every_agent_command_in_the_docs_runs() {
    let mut s = Scenario::new();
    s.imds.with(|i| i.role = Some("web-fleet-role".into()));
    s.use_instance_role();
    // For `fleet status`, which an operator runs with a region of theirs.
    s.env.push(("AWS_REGION".into(), "eu-west-1".into()));
    s.ssm.with(|x| {
        x.params
            .insert("/fleets/web/target".into(), Param::string(REF, 1))
    });
    s.user_data(format!("#nixos-ami-agent\nflake = \"{REF}\"\n"));
    let user_data = s.path("user-data.toml");
    std::fs::write(&user_data, format!("#nixos-ami-agent\nflake = \"{REF}\"\n")).unwrap();
    // A finished run of this boot, for `status --wait`.
    assert_eq!(s.run(&["run"]).code, 0);
    let ssm_value = s.path("target.toml");
    std::fs::write(&ssm_value, format!("flake = \"{REF}\"\n")).unwrap();
    let ssm_bare = s.path("target.txt");
    std::fs::write(&ssm_bare, format!("{REF}\n")).unwrap();

    let readme_commands = agent_command_lines(&readme());
    assert!(readme_commands.len() >= 5, "{readme_commands:?}");
    let commands: Vec<String> = DOCS
        .iter()
        .flat_map(|name| agent_command_lines(&doc(name)))
        .collect();
    for line in commands {
        // Drop comments and the synopsis' descriptions (after a run of
        // spaces).
        let line = line
            .split(" #")
            .next()
            .unwrap()
            .trim()
            .split("  ")
            .next()
            .unwrap()
            .to_owned();
        let args: Vec<String> = line
            .split_whitespace()
            .skip(1)
            .filter(|a| !a.starts_with('[') && !a.ends_with(']') && !a.contains('|'))
            .map(|a| match a {
                "FILE" | "FILE..." | "user-data.toml" => user_data.display().to_string(),
                "target.toml" => ssm_value.display().to_string(),
                "target.txt" => ssm_bare.display().to_string(),
                other => other.to_owned(),
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = s.run(&args);
        assert_ne!(
            out.code, 64,
            "documented command line is not valid: {line}\n{out:?}"
        );
        assert!(matches!(out.code, 0 | 1), "{line}: {out:?}");
    }
}

const AGENT_COMMANDS: [&str; 7] = [
    "run",
    "plan",
    "status",
    "forget-rejected",
    "validate",
    "doctor",
    "fleet",
];
const PUBLISH_COMMANDS: [&str; 4] = ["upload", "prune", "smoke-test", "snapshot"];

/// Every invocation of `program` in `command`: its subcommand (if it
/// names a known one) and the options given.
fn invocations(command: &str, program: &str) -> Vec<(Option<String>, Vec<String>)> {
    let known: &[&str] = if program == "nixos-ami-agent" {
        &AGENT_COMMANDS
    } else {
        &PUBLISH_COMMANDS
    };
    let text = command.replace(&format!("nix run .#{program} -- "), &format!("{program} "));
    let mut out = vec![];
    let mut rest = text.as_str();
    let needle = format!("{program} ");
    while let Some(at) = rest.find(&needle) {
        let before = rest[..at].chars().last();
        rest = &rest[at + needle.len()..];
        // `nixos-ami-agent` as a word, not the end of another one.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '-' || c == '.') {
            continue;
        }
        let end = rest.find(['"', '\'']).unwrap_or(rest.len());
        let words: Vec<&str> = rest[..end].split_whitespace().collect();
        let mut sub = words
            .iter()
            .find(|w| !w.starts_with(['-', '[']))
            .filter(|w| known.contains(w))
            .map(|w| w.to_string());
        // `fleet` has subcommands of its own.
        if sub.as_deref() == Some("fleet")
            && let Some(next) = words.get(1).filter(|w| !w.starts_with('-'))
        {
            sub = Some(format!("fleet {next}"));
        }
        let flags = words
            .iter()
            .filter_map(|w| {
                let w = w.trim_start_matches(['[', '(']);
                let name: String = w
                    .strip_prefix("--")?
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                (!name.is_empty()).then(|| format!("--{name}"))
            })
            .collect();
        out.push((sub, flags));
    }
    out
}

fn help(program: &str, sub: Option<&str>) -> String {
    let mut c = Command::new(workspace_bin(program));
    c.args(sub.into_iter().flat_map(str::split_whitespace))
        .arg("--help")
        .env_clear()
        .env("PATH", host_bin())
        .stdin(Stdio::null());
    let out = c.output().unwrap();
    assert!(out.status.success(), "{program} {sub:?} --help: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn offers(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(at, _)| {
        !help[at + flag.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

#[test]
fn every_option_shown_exists() {
    let mut checked = 0;
    for name in DOCS {
        let text = doc(name);
        let mut commands = block_commands(&text);
        commands.extend(spans(&text));
        for program in ["nixos-ami-agent", "nixos-ami-publish"] {
            let mut seen = BTreeSet::new();
            for command in &commands {
                for (sub, flags) in invocations(command, program) {
                    for flag in flags {
                        if !seen.insert((sub.clone(), flag.clone())) {
                            continue;
                        }
                        let in_sub = sub
                            .as_deref()
                            .is_some_and(|s| offers(&help(program, Some(s)), &flag));
                        assert!(
                            in_sub || offers(&help(program, None), &flag),
                            "{name} shows `{program} {}{flag}`, which {program} does not have:\n{command}",
                            sub.as_deref().map(|s| format!("{s} ")).unwrap_or_default()
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} options found in the docs");
}

/// The repository's own top-level names (not build output).
fn top_level() -> BTreeSet<String> {
    std::fs::read_dir(repo())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "target" && (!n.starts_with('.') || n == ".github" || n == ".ci"))
        .collect()
}

/// A path into the repository, as the docs name them: relative, starting
/// with one of its top-level names, nothing but path characters.
fn repo_path(s: &str, top: &BTreeSet<String>) -> Option<PathBuf> {
    let path_chars = |c: char| c.is_ascii_alphanumeric() || "._-/@".contains(c);
    if s.is_empty() || !s.chars().all(path_chars) || s.starts_with('/') {
        return None;
    }
    let first = s.split('/').next()?;
    (top.contains(first) && (s.contains('/') || first.contains('.'))).then(|| repo().join(s))
}

/// Markdown links: (target, without the title).
fn links(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut out = vec![];
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].to_owned());
        }
    }
    out
}

/// GitHub's anchors for a document's headings.
fn anchors(text: &str) -> BTreeSet<String> {
    prose(text)
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn paths_and_links_in_the_docs_exist() {
    let top = top_level();
    for name in DOCS {
        let text = doc(name);
        for span in spans(&text) {
            if let Some(p) = repo_path(&span, &top) {
                assert!(p.exists(), "{name} names `{span}`, which does not exist");
            }
        }
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target = if file.is_empty() {
                repo().join(name)
            } else {
                repo().join(file)
            };
            assert!(
                target.exists(),
                "{name} links to {link}, which does not exist"
            );
            if !anchor.is_empty() {
                let heads = anchors(&std::fs::read_to_string(&target).unwrap());
                assert!(
                    heads.contains(anchor),
                    "{name} links to {link}: no such heading (there: {heads:?})"
                );
            }
        }
    }
}

#[test]
fn the_readme_keeps_its_two_commands() {
    let text = readme();
    // What scripts/test runs: `grep -m1 '^cargo run -p nixos-ami-agent'`.
    let build = text
        .lines()
        .find(|l| l.starts_with("cargo run -p nixos-ami-agent"))
        .expect("the README's build-and-run command (scripts/test runs it)");
    let (_, args) = build
        .split_once(" -- ")
        .expect("cargo run -p nixos-ami-agent -- ARGS");
    let out = Command::new(workspace_bin("nixos-ami-agent"))
        .args(args.split_whitespace())
        .current_dir(repo())
        .env_clear()
        .env("PATH", host_bin())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{build}: {out:?}");
    assert!(
        blocks(&text)
            .iter()
            .any(|(info, body)| info == "sh" && body.lines().any(|l| l.trim() == "scripts/test")),
        "the README no longer shows the test command, scripts/test"
    );
}
