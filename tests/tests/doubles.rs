//! The doubles themselves: the IMDS double must have real IMDSv2 token
//! semantics, or the agent's tests against it prove nothing.

use nixos_ami_agent_tests::harness::rt;
use nixos_ami_agent_tests::imds::{Imds, ImdsDouble};
use std::io::{Read, Write};
use std::time::Duration;

/// One HTTP/1.1 request over a plain socket; returns (status, body).
fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn imds_double_token_semantics() {
    let imds = ImdsDouble::start(rt(), Imds::default(), Duration::ZERO);
    imds.with(|i| i.user_data = Some(b"hi".to_vec()));
    let a = imds.addr;
    const TTL: &str = "X-aws-ec2-metadata-token-ttl-seconds";
    assert_eq!(
        http(a, "PUT", "/latest/api/token", &[]).0,
        400,
        "TTL header required"
    );
    assert_eq!(http(a, "PUT", "/latest/api/token", &[(TTL, "0")]).0, 400);
    assert_eq!(
        http(a, "PUT", "/latest/api/token", &[(TTL, "21601")]).0,
        400,
        "TTL bounded"
    );
    assert_eq!(http(a, "GET", "/latest/api/token", &[(TTL, "60")]).0, 405);
    assert_eq!(http(a, "GET", "/latest/user-data", &[]).0, 401, "no IMDSv1");
    assert_eq!(
        http(
            a,
            "GET",
            "/latest/user-data",
            &[("X-aws-ec2-metadata-token", "forged")]
        )
        .0,
        401
    );

    let (status, token) = http(a, "PUT", "/latest/api/token", &[(TTL, "1")]);
    assert_eq!(status, 200);
    let t = [("X-aws-ec2-metadata-token", token.as_str())];
    assert_eq!(http(a, "GET", "/latest/user-data", &t), (200, "hi".into()));
    assert_eq!(
        http(a, "GET", "/latest/meta-data/instance-id", &t),
        (200, "i-0123456789abcdef0".into())
    );
    assert_eq!(
        http(a, "GET", "/latest/meta-data/iam/security-credentials/", &t).0,
        404,
        "no role attached"
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        http(a, "GET", "/latest/user-data", &t).0,
        401,
        "an expired token is refused"
    );

    imds.with(|i| i.token_forbidden = true);
    assert_eq!(http(a, "PUT", "/latest/api/token", &[(TTL, "60")]).0, 403);
}

/// The stand-ins of two units (the boot's fetch and a run) record their
/// calls at the same time: every line of `calls.jsonl` stays whole.
#[test]
fn stand_ins_called_at_once_record_whole_lines() {
    let dir = tempfile::tempdir().unwrap();
    let bin = nixos_ami_agent_tests::harness::workspace_bin("fake-determinate-nixd");
    let mut children = vec![];
    for _ in 0..8 {
        for _ in 0..12 {
            children.push(
                std::process::Command::new(&bin)
                    .args(["login", "aws"])
                    .env(nixos_ami_agent_tests::standin::DIR_ENV, dir.path())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            );
        }
        for mut c in children.drain(..) {
            assert!(c.wait().unwrap().success());
        }
    }
    // `calls` panics on a line that is not one JSON object.
    let calls = nixos_ami_agent_tests::standin::calls(dir.path());
    assert_eq!(calls.len(), 96);
}
