//! Argument safety: references and parameter names that try to become
//! flags, carry newlines, spaces, `$()` or backticks, or are absurdly
//! long, are refused from every source before any program runs; the
//! stand-ins prove it by never being called.

use nixos_ami_agent_tests::harness::{Scenario, toml_user_data};
use nixos_ami_agent_tests::ssm::Param;

const HOSTILE_REFS: &[&str] = &[
    "-",
    "--",
    "--option",
    "--impure",
    "-rf",
    "my-org/web/0.1#nixosConfigurations.web\n--option",
    "my-org/web/0.1#nixosConfigurations.web --impure",
    "my-org/web/0.1#$(reboot)",
    "my-org/web/0.1#`reboot`",
    "my-org/web/$(id)#x",
    "my-org/web/0.1#x;reboot",
    "my-org/web/0.1#x|reboot",
    "my-org/web/0.1#x&reboot",
    "/nix/store/00000000000000000000000000000000-nixos-system",
    "github:my-org/web#nixosConfigurations.web",
];

fn long_ref() -> String {
    format!("my-org/web/0.1#{}", "a".repeat(600))
}

const HOSTILE_PARAMETERS: &[&str] = &[
    "-",
    "--profile",
    "/fleets/web\n--x",
    "/fleets/web x",
    "/fleets/$(id)",
    "/fleets/`id`",
    "/fleets/web;x",
];

fn refused(s: &Scenario, code: i32, what: &str) {
    let out = s.run(&["run"]);
    assert_eq!(out.code, code, "{what:?}: {out:?}");
    assert!(
        s.calls().is_empty(),
        "{what:?} reached a program: {:?}",
        s.calls()
    );
    assert!(
        s.ssm.with(|x| x.requests.is_empty()),
        "{what:?} reached SSM"
    );
}

#[test]
fn hostile_flake_refs_from_user_data() {
    let long = long_ref();
    for r in HOSTILE_REFS.iter().copied().chain([long.as_str()]) {
        let s = Scenario::new();
        s.user_data(toml_user_data(&format!("flake = {}", serde_json::json!(r))));
        refused(&s, 65, r);
        let s = Scenario::new();
        s.user_data(serde_json::json!({"nixos-ami-agent": {"flake": r}}).to_string());
        refused(&s, 65, r);
    }
}

#[test]
fn hostile_flake_refs_from_the_ssm_parameter() {
    let long = long_ref();
    for r in HOSTILE_REFS.iter().copied().chain([long.as_str()]) {
        for value in [r.to_owned(), format!("flake = {}", serde_json::json!(r))] {
            let s = Scenario::new();
            s.user_data(toml_user_data("ssm-parameter = \"/fleets/web\""));
            s.ssm.with(|x| {
                x.params
                    .insert("/fleets/web".into(), Param::string(&value, 1))
            });
            let out = s.run(&["run"]);
            assert_eq!(out.code, 65, "{value:?}: {out:?}");
            assert!(
                s.calls().is_empty(),
                "{value:?} reached a program: {:?}",
                s.calls()
            );
        }
    }
}

#[test]
fn hostile_flake_refs_from_the_config_file() {
    for r in HOSTILE_REFS {
        let mut s = Scenario::new();
        s.defaults = format!("flake = {}", serde_json::json!(r));
        refused(&s, 78, r);
    }
}

#[test]
fn hostile_parameter_names() {
    let long = format!("/{}", "p".repeat(3000));
    for p in HOSTILE_PARAMETERS.iter().copied().chain([long.as_str()]) {
        let s = Scenario::new();
        s.user_data(toml_user_data(&format!(
            "ssm-parameter = {}",
            serde_json::json!(p)
        )));
        refused(&s, 65, p);
    }
}
