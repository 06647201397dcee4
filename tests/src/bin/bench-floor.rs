//! The floor for the overhead benchmark: what any agent must do for one
//! run, done by the most direct client: the IMDS token PUT and GETs, the
//! SSM GetParameter POST (with a dummy signature: the double does not
//! verify it), and the same program spawns, nothing else.
//!
//! bench-floor IMDS_URL [--ssm URL NAME] --login NIXD --resolve FH REF [--apply]
//!
//! And the floor of the upload benchmark: a bare loop of PutSnapshotBlock
//! requests on one connection, for the blocks that are not all zeros,
//! between StartSnapshot and CompleteSnapshot (no SDK, no signing, no
//! retries, no concurrency, no progress).
//!
//! bench-floor ebs EBS_URL DISK

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

fn ebs_floor(url: &str, disk: &str) {
    use nixos_ami_agent_tests::ebs::{BLOCK, Conn, linear_checksum};
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(disk).expect("open the disk");
    let size = file.metadata().unwrap().len();
    let gib = size.div_ceil(1 << 30).max(1);
    let mut c = Conn::connect(url).expect("connect");
    let body = format!("{{\"VolumeSize\":{gib},\"Timeout\":60}}");
    let r = c
        .request(
            "POST",
            "/snapshots",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 201);
    let id = r.json()["SnapshotId"].as_str().unwrap().to_owned();
    let mut buf = vec![0u8; BLOCK];
    let mut digests = vec![];
    for index in 0..size.div_ceil(BLOCK as u64) {
        let start = index * BLOCK as u64;
        let len = (size - start).min(BLOCK as u64) as usize;
        buf[len..].fill(0);
        file.read_exact_at(&mut buf[..len], start).unwrap();
        let zero = buf
            .chunks_exact(8)
            .all(|w| u64::from_ne_bytes(w.try_into().unwrap()) == 0);
        if zero {
            continue;
        }
        let (r, digest) = c.put_block(&id, index, &buf).unwrap();
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        digests.push(digest);
    }
    let count = digests.len().to_string();
    let linear = linear_checksum(&digests);
    let mut headers = vec![("x-amz-ChangedBlocksCount", count.as_str())];
    if !digests.is_empty() {
        headers.extend([
            ("x-amz-Checksum", linear.as_str()),
            ("x-amz-Checksum-Algorithm", "SHA256"),
            ("x-amz-Checksum-Aggregation-Method", "LINEAR"),
        ]);
    }
    let r = c
        .request(
            "POST",
            &format!("/snapshots/completion/{id}"),
            &headers,
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 202);
    println!("{{\"snapshot_id\":\"{id}\",\"blocks_sent\":{count}}}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("ebs") {
        return ebs_floor(&args[1], &args[2]);
    }
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
