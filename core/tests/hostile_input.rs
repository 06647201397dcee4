//! Hostile input through the whole sniffing and settings path, generated:
//! arbitrary bytes, deeply nested JSON, huge TOML, MIME with missing,
//! duplicated or evil boundaries, nested multiparts, gzip bombs, invalid
//! UTF-8 and NUL bytes, inputs of 16 KiB and more. Nothing may panic, and
//! whatever is accepted must be safe to hand to a program. The same entry
//! points are fuzzed by `fuzz/` (cargo-fuzz).

use nixos_ami_agent_core::config::{Config, MAX_DURATION};
use nixos_ami_agent_core::settings::{OutputRef, ParameterName, Target, parameter};
use nixos_ami_agent_core::text;
use nixos_ami_agent_core::userdata::{self, gzip};
use proptest::prelude::*;
use std::io::Write;
use std::path::Path;

/// Every entry point that takes untrusted text, and the invariants of what
/// they accept.
fn exercise(bytes: &[u8]) {
    match userdata::sniff(bytes) {
        Ok(ud) => {
            if let Some(Target::Flake(f)) = ud.settings.as_ref().and_then(|l| l.target.as_ref()) {
                safe_argument(f.as_str());
            }
            for s in &ud.scripts {
                assert!(s.body.starts_with(b"#!"));
            }
            // One inflate cap for the whole user data: what is kept is at
            // most the input plus the cap, however it was encoded.
            let kept: usize = ud.scripts.iter().map(|s| s.body.len()).sum();
            assert!(kept <= bytes.len() + gzip::MAX_INFLATED, "{kept}");
            for part in &ud.ignored {
                loggable(part);
            }
        }
        Err(e) => loggable(&e.to_string()),
    }
    let text = String::from_utf8_lossy(bytes);
    for secret in [false, true] {
        if let Ok(p) = parameter::parse_value(&text, secret) {
            safe_argument(p.flake.as_str());
        }
    }
    check_config(&text);
    if let Ok(r) = OutputRef::parse(&text) {
        safe_argument(r.as_str());
    }
    if let Ok(p) = ParameterName::parse(&text) {
        safe_argument(p.as_str());
        assert!(p.matches_reply(p.as_str()));
    }
    loggable(&text::escape_controls(&text));
}

/// What a config file may hold: durations no clock overflows on, and an
/// IMDS endpoint that is a plain base URL. Errors are safe to log.
fn check_config(text: &str) {
    match Config::parse(text, Path::new("/etc/nixos-ami-agent/config.toml")) {
        Ok(c) => {
            let a = &c.agent;
            for d in [
                a.retry_budget,
                a.command_timeout,
                a.apply_timeout,
                a.script_timeout,
                a.lock_wait,
            ] {
                assert!(!d.is_zero() && d <= MAX_DURATION, "{d:?}");
            }
            if let Ok(e) = a.imds_endpoint(None) {
                assert!(e.starts_with("http://"), "{e}");
                assert!(!e.contains(['?', '#', '@']), "{e}");
                assert!(
                    !e.chars().any(|c| c.is_whitespace() || c.is_control()),
                    "{e}"
                );
            }
        }
        Err(e) => loggable(&e.to_string()),
    }
}

/// A line that can go to a log or a terminal as it is: no control
/// characters but tab (escaped ones are fine).
fn loggable(s: &str) {
    assert!(!s.chars().any(|c| c.is_control() && c != '\t'), "{s:?}");
}

/// What reaches an argv: never a flag, never more than one word.
fn safe_argument(s: &str) {
    assert!(!s.is_empty() && !s.starts_with('-'), "{s:?}");
    assert!(
        !s.chars().any(|c| c.is_whitespace() || c.is_control()),
        "{s:?}"
    );
    // Version requirements may hold `<`, `>` and `,`; shell syntax never.
    assert!(
        !s.contains(['$', '`', ';', '|', '&', '(', ')', '\\', '\0']),
        "{s:?}"
    );
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn mime(boundary: &str, parts: &[(String, Vec<u8>)], close: bool) -> Vec<u8> {
    let mut m =
        format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n")
            .into_bytes();
    for (ctype, body) in parts {
        m.extend(format!("--{boundary}\nContent-Type: {ctype}\n\n").bytes());
        m.extend(body);
        m.push(b'\n');
    }
    if close {
        m.extend(format!("--{boundary}--\n").bytes());
    }
    m
}

fn ctype() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("text/x-nixos-ami-agent".to_owned()),
        Just("text/x-shellscript".to_owned()),
        Just("text/cloud-config".to_owned()),
        Just("multipart/mixed; boundary=\"inner\"".to_owned()),
        "[ -~]{0,40}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn durations_and_endpoints_in_the_config_file(
        key in prop_oneof![
            Just("retry-budget"), Just("command-timeout"), Just("apply-timeout"),
            Just("script-timeout"), Just("lock-wait"),
        ],
        amount in prop_oneof![Just(u64::MAX), Just(300_000_000_000), any::<u64>(), 0u64..1000],
        unit in prop_oneof![Just("y"), Just("d"), Just("h"), Just("s"), Just("ms"), Just("ns"), Just("")],
        endpoint in prop_oneof![
            "http://[a-z0-9.]{1,20}(:[0-9]{1,6})?(/[ -~]{0,20})?",
            "[ -~]{0,40}",
            Just("http://127.0.0.1:1/?x=1".to_owned()),
            Just("http://u:p@127.0.0.1/".to_owned()),
            Just("http://127.0.0.1/#f".to_owned()),
        ],
    ) {
        check_config(&format!("[agent]\n{key} = \"{amount}{unit}\"\n"));
        check_config(&format!("[agent]\nimds-endpoint = {endpoint:?}\n"));
    }

    #[test]
    fn escaping_leaves_nothing_to_interpret(s in any::<String>(), max in 0usize..64) {
        loggable(&text::escape_controls(&s));
        let shown = text::shown(&s, max);
        loggable(&shown);
        prop_assert!(shown.len() <= text::escape_controls(&s).len().max(max) + 40 + 4 * max);
    }

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..20_000)) {
        exercise(&bytes);
    }

    #[test]
    fn arbitrary_bytes_behind_every_header(
        header in prop_oneof![
            Just(&b"#nixos-ami-agent\n"[..]),
            Just(&b"{\"nixos-ami-agent\": "[..]),
            Just(&b"Content-Type: multipart/mixed; boundary=x\n\n--x\n"[..]),
            Just(&b"MIME-Version: 1.0\n"[..]),
            Just(&b"#!"[..]),
            Just(&[0x1f, 0x8b][..]),
        ],
        tail in prop::collection::vec(any::<u8>(), 0..4_000),
    ) {
        let mut bytes = header.to_vec();
        bytes.extend(tail);
        exercise(&bytes);
        exercise(&gz(&bytes));
    }

    #[test]
    fn toml_settings_with_hostile_values(
        key in prop_oneof![
            Just("flake".to_owned()),
            Just("ssm-parameter".to_owned()),
            Just("action".to_owned()),
            Just("reboot".to_owned()),
            Just("login".to_owned()),
            "[a-z-]{1,12}",
        ],
        value in prop_oneof![
            ".{0,300}",
            "-{1,2}[a-z-]{0,12}",
            Just("org/flake/0.1#x\n--option".to_owned()),
            Just("org/flake/0.1#$(reboot)".to_owned()),
            Just("org/flake/0.1#`id`".to_owned()),
            "[a-z]{1,8}/[a-z]{1,8}/[0-9.*]{1,5}#[ -~]{1,40}",
        ],
    ) {
        let doc = format!("#nixos-ami-agent\n{key} = {}\n", toml_string(&value));
        exercise(doc.as_bytes());
        let json = format!("{{\"nixos-ami-agent\": {{{}: {}}}}}", serde_json::json!(key), serde_json::json!(value));
        exercise(json.as_bytes());
    }

    #[test]
    fn deeply_nested_json(depth in 1usize..5_000, open in prop_oneof![Just("["), Just("{\"a\":")]) {
        let mut s = String::from("{\"nixos-ami-agent\": ");
        s.push_str(&open.repeat(depth));
        exercise(s.as_bytes());
    }

    #[test]
    fn deeply_nested_toml(depth in 1usize..5_000) {
        let s = format!("#nixos-ami-agent\nflake = {}1{}\n", "[".repeat(depth), "]".repeat(depth));
        exercise(s.as_bytes());
        let tables = format!("#nixos-ami-agent\nagent = {}", "{a = ".repeat(depth));
        exercise(tables.as_bytes());
    }

    #[test]
    fn mime_with_evil_boundaries(
        boundary in prop_oneof![Just(String::new()), Just("--".to_owned()), "[ -~]{0,80}", Just("\"".to_owned())],
        parts in prop::collection::vec((ctype(), prop::collection::vec(any::<u8>(), 0..500)), 0..8),
        close in any::<bool>(),
        duplicate in any::<bool>(),
    ) {
        let mut m = mime(&boundary, &parts, close);
        if duplicate {
            // A second, different boundary parameter and a second header.
            let dup = format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"; boundary=\"other\"\n");
            m.splice(0..0, dup.bytes());
        }
        exercise(&m);
    }

    #[test]
    fn nested_multiparts(depth in 1usize..200) {
        let mut s = b"#!/bin/sh\ntrue".to_vec();
        for i in 0..depth {
            s = mime(&format!("b{i}"), &[(format!("multipart/mixed; boundary=\"b{}\"", i.saturating_sub(1)), s)], true);
        }
        exercise(&s);
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[test]
fn gzip_bombs_are_capped() {
    for size in [2 << 20, 64 << 20] {
        let bomb = gz(&vec![b'A'; size]);
        let e = userdata::sniff(&bomb).unwrap_err();
        assert!(e.reason.contains("inflates to more than"), "{e}");
    }
    // Nested: a gzip of a gzip is inflated once; the inner one is then
    // just bytes that are not addressed to the agent.
    let nested = gz(&gz(&vec![0u8; 4 << 20]));
    assert!(userdata::sniff(&nested).is_ok());
    // A bomb inside a MIME part is capped too.
    let b64 = base64_encode(&gz(&vec![b'#'; 8 << 20]));
    let part = format!(
        "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/x-nixos-ami-agent\nContent-Transfer-Encoding: base64\n\n{b64}\n--b--\n"
    );
    let e = userdata::sniff(part.as_bytes()).unwrap_err();
    assert!(e.reason.contains("inflates to more than"), "{e}");
}

#[test]
fn nul_bytes_and_invalid_utf8() {
    for input in [
        &b"#nixos-ami-agent\nflake = \"org/flake/0.1#x\0y\"\n"[..],
        b"#nixos-ami-agent\n\xff\xfe\n",
        b"{\"nixos-ami-agent\": {\"flake\": \"o/f/1#x\\u0000\"}}",
        b"#!\0\0\0",
        b"\0\0\0\0",
    ] {
        exercise(input);
    }
    let e = userdata::sniff(b"#nixos-ami-agent\nflake = \"org/flake/0.1#x\\u0000\"\n").unwrap_err();
    assert!(e.reason.contains("control"), "{e}");
}

#[test]
fn large_inputs() {
    let huge_toml = format!("#nixos-ami-agent\n{}", "# comment\n".repeat(100_000));
    exercise(huge_toml.as_bytes());
    let many_keys: String = (0..20_000).map(|i| format!("k{i} = {i}\n")).collect();
    let e = userdata::sniff(format!("#nixos-ami-agent\n{many_keys}").as_bytes()).unwrap_err();
    assert!(e.reason.contains("unknown field"), "{e}");
    exercise(&vec![b'{'; 1 << 20]);
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
