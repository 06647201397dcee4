//! The floor for the overhead benchmark: what any agent must do for one
//! run, done by the most direct client: the IMDS token PUT and GETs, the
//! SSM GetParameter POST (with a dummy signature: the double does not
//! verify it), and the same program spawns, nothing else.
//!
//! bench-floor IMDS_URL [--ssm URL NAME] --login NIXD --resolve FH REF [--apply]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

fn request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let host = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let imds = &args[0];
    let flag = |name: &str, n: usize| -> Option<Vec<String>> {
        let i = args.iter().position(|a| a == name)?;
        Some(args[i + 1..=i + n].to_vec())
    };
    let (status, token) = request(
        imds,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
        "",
    );
    assert_eq!(status, 200);
    let t = [("X-aws-ec2-metadata-token", token.trim())];
    assert_eq!(
        request(imds, "GET", "/latest/meta-data/instance-id", &t, "").0,
        200
    );
    let _ = request(imds, "GET", "/latest/user-data", &t, "");
    if let Some(ssm) = flag("--ssm", 2) {
        let body = format!("{{\"Name\":\"{}\",\"WithDecryption\":true}}", ssm[1]);
        let (status, _) = request(
            &ssm[0],
            "POST",
            "/",
            &[
                ("X-Amz-Target", "AmazonSSM.GetParameter"),
                ("Content-Type", "application/x-amz-json-1.1"),
                (
                    "Authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDFLOOR/20261125/eu-west-1/ssm/aws4_request",
                ),
            ],
            &body,
        );
        assert_eq!(status, 200);
    }
    let login = flag("--login", 1).unwrap();
    assert!(
        Command::new(&login[0])
            .args(["login", "aws"])
            .output()
            .unwrap()
            .status
            .success()
    );
    let resolve = flag("--resolve", 2).unwrap();
    let out = Command::new(&resolve[0])
        .args(["resolve", "--json", &resolve[1]])
        .output()
        .unwrap();
    assert!(out.status.success());
    if args.iter().any(|a| a == "--apply") {
        let ok = Command::new(&resolve[0])
            .args(["apply", "nixos", &resolve[1], "switch"])
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok);
    }
}
