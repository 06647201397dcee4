//! The README's examples are exercised: every user-data example passes
//! `validate`, and every `nixos-ami-agent ...` command it shows runs
//! against the doubles with a valid command line. (`scripts/test` runs the
//! README's build-and-plan command; aws, terraform, nix and journalctl
//! commands need the real services.)

use nixos_ami_agent_tests::harness::{REF, Scenario};
use nixos_ami_agent_tests::ssm::Param;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap()
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

fn is_user_data(body: &str) -> bool {
    let first = body.trim_start();
    first.starts_with("#nixos-ami-agent")
        || first.starts_with("{\"nixos-ami-agent\"")
        || first.starts_with("#!")
}

#[test]
fn every_user_data_example_validates() {
    let s = Scenario::new();
    let examples: Vec<String> = blocks(&readme())
        .into_iter()
        .map(|(_, b)| b)
        .filter(|b| is_user_data(b))
        .collect();
    assert!(
        examples.len() >= 4,
        "the README lost its examples: {examples:?}"
    );
    for (i, ud) in examples.iter().enumerate() {
        let file = s.path(&format!("example-{i}"));
        std::fs::write(&file, ud.trim_start()).unwrap();
        let out = s.run(&["validate", file.to_str().unwrap()]);
        assert_eq!(
            out.code, 0,
            "README example {i} does not validate:\n{ud}\n{out:?}"
        );
    }
}

#[test]
fn every_agent_command_in_the_readme_runs() {
    let text = readme();
    let mut s = Scenario::new();
    s.imds.with(|i| i.role = Some("web-fleet-role".into()));
    s.use_instance_role();
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

    let commands: Vec<String> = blocks(&text)
        .into_iter()
        .filter(|(info, _)| info == "sh" || info.is_empty())
        .flat_map(|(_, body)| body.lines().map(str::to_owned).collect::<Vec<_>>())
        .filter(|l| l.trim_start().starts_with("nixos-ami-agent "))
        .collect();
    assert!(commands.len() >= 5, "{commands:?}");
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
                other => other.to_owned(),
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = s.run(&args);
        assert_ne!(
            out.code, 64,
            "README command line is not valid: {line}\n{out:?}"
        );
        assert!(matches!(out.code, 0 | 1), "{line}: {out:?}");
    }
}
