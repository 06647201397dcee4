//! A fast EBS direct API double (with the three EC2 calls an upload ends
//! with), for the upload benchmark and the tests of the uploader's block
//! choices. moto does EBS too, but keeps every block in Python memory and
//! takes longer per block than the uploader: a 4 GiB upload would measure
//! moto.
//!
//! As strict as EBS where an uploader can get it wrong
//! (<https://docs.aws.amazon.com/ebs/latest/APIReference/>, and
//! `ebsapis-using-checksums.html` of the user guide):
//!
//! - StartSnapshot: `VolumeSize` 1–65536 GiB, `Timeout` 10–4320 minutes;
//!   a repeated `ClientToken` returns the same snapshot; `encrypted`
//!   makes every snapshot `sse-ebs` (an account encrypting by default);
//! - PutSnapshotBlock: the snapshot must exist and be `pending`
//!   (ResourceNotFoundException, ValidationException), the index within
//!   the volume, `x-amz-Data-Length` 524288 and equal to the body, the
//!   algorithm SHA256 and the checksum the body's;
//! - CompleteSnapshot: `x-amz-ChangedBlocksCount` must be the number of
//!   blocks written and a linear checksum must be SHA-256 over the
//!   blocks' digests in index order; otherwise the snapshot goes to
//!   `error` (EBS checks after answering), and an unwritten snapshot may
//!   not be completed with a checksum;
//! - EC2 (query protocol on `POST /`): DescribeSnapshots by id
//!   (`InvalidSnapshot.NotFound` for an unknown one), CreateTags,
//!   DeleteSnapshot; any other action is refused.
//!
//! Only digests are kept, not data: memory does not grow with the volume.
//! Signatures are not checked (nor by the other doubles).

use crate::harness::serve;
use axum::body::{Body, Bytes};
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{post, put};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub const BLOCK: usize = 512 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Pending,
    Completed,
    Error(String),
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: String,
    pub volume_gib: u64,
    pub state: State,
    pub encrypted: bool,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    /// Block index → SHA-256 of what was written.
    pub digests: BTreeMap<u64, [u8; 32]>,
    client_token: Option<String>,
}

#[derive(Debug, Default)]
pub struct Ebs {
    /// New snapshots are encrypted (`sse-ebs`).
    pub encrypted: bool,
    pub snapshots: BTreeMap<String, Snapshot>,
    /// Deleted snapshot ids, in order.
    pub deleted: Vec<String>,
}

impl Ebs {
    pub fn encrypted() -> Self {
        Self {
            encrypted: true,
            ..Self::default()
        }
    }
}

pub struct EbsDouble {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<Ebs>>,
    /// PutSnapshotBlock requests accepted, and their bytes.
    pub blocks_put: Arc<AtomicU64>,
    pub bytes_put: Arc<AtomicU64>,
}

impl EbsDouble {
    pub fn start(rt: &tokio::runtime::Runtime, ebs: Ebs) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the EBS double");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ebs));
        let blocks_put = Arc::new(AtomicU64::new(0));
        let bytes_put = Arc::new(AtomicU64::new(0));
        let (s1, s2, s3, s4) = (state.clone(), state.clone(), state.clone(), state.clone());
        let (b, n) = (blocks_put.clone(), bytes_put.clone());
        let app = axum::Router::new()
            .route(
                "/snapshots",
                post(move |body: Bytes| async move { start_snapshot(&s1, &body) }),
            )
            .route(
                "/snapshots/{id}/blocks/{index}",
                put(
                    move |Path((id, index)): Path<(String, String)>,
                          headers: HeaderMap,
                          body: Bytes| async move {
                        let r = put_block(&s2, &id, &index, &headers, &body);
                        if r.status() == StatusCode::CREATED {
                            b.fetch_add(1, Ordering::Relaxed);
                            n.fetch_add(body.len() as u64, Ordering::Relaxed);
                        }
                        r
                    },
                ),
            )
            .route(
                "/snapshots/completion/{id}",
                post(
                    move |Path(id): Path<String>, headers: HeaderMap| async move {
                        complete(&s3, &id, &headers)
                    },
                ),
            )
            .route("/", post(move |body: Bytes| async move { ec2(&s4, &body) }));
        serve(rt, listener, app, Arc::new(AtomicU32::new(0)));
        Self {
            addr,
            state,
            blocks_put,
            bytes_put,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Ebs) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    pub fn snapshot(&self, id: &str) -> Option<Snapshot> {
        self.with(|e| e.snapshots.get(id).cloned())
    }
}

fn json(status: u16, body: serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-amzn-requestid", "00000000-0000-0000-0000-00000000e8b5")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// restJson1 errors: the type in `x-amzn-errortype`.
fn error(status: u16, kind: &str, reason: &str, message: &str) -> Response {
    let mut r = json(
        status,
        serde_json::json!({"Message": message, "Reason": reason}),
    );
    r.headers_mut()
        .insert("x-amzn-errortype", kind.parse().unwrap());
    r
}

fn validation(reason: &str, message: &str) -> Response {
    error(400, "ValidationException", reason, message)
}

fn start_snapshot(state: &Mutex<Ebs>, body: &[u8]) -> Response {
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(body) else {
        return validation("INVALID_PARAMETER_VALUE", "the body is not JSON");
    };
    let size = req["VolumeSize"].as_u64().unwrap_or(0);
    if !(1..=65536).contains(&size) {
        return validation(
            "INVALID_VOLUME_SIZE",
            "VolumeSize must be between 1 and 65536",
        );
    }
    if let Some(t) = req.get("Timeout")
        && !t.as_u64().is_some_and(|t| (10..=4320).contains(&t))
    {
        return validation(
            "INVALID_PARAMETER_VALUE",
            "Timeout must be between 10 and 4320",
        );
    }
    let token = req["ClientToken"].as_str().map(str::to_owned);
    let mut e = state.lock().unwrap();
    if let Some(t) = &token
        && let Some(s) = e
            .snapshots
            .values()
            .find(|s| s.client_token.as_ref() == Some(t))
    {
        if s.volume_gib != size {
            return error(
                409,
                "ConflictException",
                "MISMATCHED_IDEMPOTENCY_TOKEN",
                "the client token was used with other parameters",
            );
        }
        return json(201, describe_started(s));
    }
    let id = format!(
        "snap-{:017x}",
        0xeb5_0000u64 + (e.snapshots.len() + e.deleted.len()) as u64 + 1
    );
    let tags = req["Tags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| Some((t["Key"].as_str()?.into(), t["Value"].as_str()?.into())))
                .collect()
        })
        .unwrap_or_default();
    let s = Snapshot {
        id: id.clone(),
        volume_gib: size,
        state: State::Pending,
        encrypted: e.encrypted,
        description: req["Description"].as_str().unwrap_or("").into(),
        tags,
        digests: BTreeMap::new(),
        client_token: token,
    };
    let reply = describe_started(&s);
    e.snapshots.insert(id, s);
    json(201, reply)
}

fn describe_started(s: &Snapshot) -> serde_json::Value {
    serde_json::json!({
        "SnapshotId": s.id,
        "OwnerId": "123456789012",
        "Status": "pending",
        "StartTime": 1_795_000_000.0,
        "VolumeSize": s.volume_gib,
        "BlockSize": BLOCK,
        "Description": s.description,
        "SseType": if s.encrypted { "sse-ebs" } else { "none" },
        "Tags": s.tags.iter().map(|(k, v)| serde_json::json!({"Key": k, "Value": v})).collect::<Vec<_>>(),
    })
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn put_block(
    state: &Mutex<Ebs>,
    id: &str,
    index: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    // Hashed before the lock: the senders work in parallel, as on EBS.
    let digest: [u8; 32] = Sha256::digest(body).into();
    let mut e = state.lock().unwrap();
    let Some(s) = e.snapshots.get_mut(id) else {
        return error(
            404,
            "ResourceNotFoundException",
            "SNAPSHOT_NOT_FOUND",
            "no such snapshot",
        );
    };
    if s.state != State::Pending {
        return validation("INVALID_SNAPSHOT_STATE", "the snapshot is not pending");
    }
    let Ok(index) = index.parse::<u64>() else {
        return validation("INVALID_BLOCK", "BlockIndex is not a number");
    };
    if index >= s.volume_gib * (1 << 30) / BLOCK as u64 {
        return validation("INVALID_BLOCK", "BlockIndex is beyond the volume");
    }
    let length = header(headers, "x-amz-data-length").and_then(|l| l.parse::<usize>().ok());
    if length != Some(BLOCK) || body.len() != BLOCK {
        return validation(
            "INVALID_BLOCK",
            "x-amz-Data-Length must be 524288 and equal the data",
        );
    }
    if header(headers, "x-amz-checksum-algorithm") != Some("SHA256") {
        return validation(
            "UNSUPPORTED_CHECKSUM_ALGORITHM",
            "the checksum algorithm must be SHA256",
        );
    }
    let expected = STANDARD.encode(digest);
    if header(headers, "x-amz-checksum") != Some(expected.as_str()) {
        return validation("INVALID_CHECKSUM", "the checksum does not match the data");
    }
    s.digests.insert(index, digest);
    Response::builder()
        .status(201)
        .header("x-amz-checksum", expected)
        .header("x-amz-checksum-algorithm", "SHA256")
        .body(Body::empty())
        .unwrap()
}

fn complete(state: &Mutex<Ebs>, id: &str, headers: &HeaderMap) -> Response {
    let mut e = state.lock().unwrap();
    let Some(s) = e.snapshots.get_mut(id) else {
        return error(
            404,
            "ResourceNotFoundException",
            "SNAPSHOT_NOT_FOUND",
            "no such snapshot",
        );
    };
    if s.state != State::Pending {
        return validation("INVALID_SNAPSHOT_STATE", "the snapshot is not pending");
    }
    let Some(count) =
        header(headers, "x-amz-changedblockscount").and_then(|c| c.parse::<u64>().ok())
    else {
        return validation(
            "INVALID_PARAMETER_VALUE",
            "x-amz-ChangedBlocksCount is required",
        );
    };
    let checksum = header(headers, "x-amz-checksum");
    if checksum.is_some() {
        if header(headers, "x-amz-checksum-algorithm") != Some("SHA256")
            || header(headers, "x-amz-checksum-aggregation-method") != Some("LINEAR")
        {
            return validation(
                "UNSUPPORTED_CHECKSUM_ALGORITHM",
                "a checksum needs the SHA256 algorithm and LINEAR aggregation",
            );
        }
        if s.digests.is_empty() {
            return validation(
                "INVALID_PARAMETER_VALUE",
                "no block was written: there is nothing to checksum",
            );
        }
    }
    // EBS answers, then checks.
    let written = s.digests.len() as u64;
    s.state = if count != written {
        State::Error(format!(
            "ChangedBlocksCount {count}, but {written} blocks were written"
        ))
    } else if let Some(c) = checksum {
        if linear_checksum(s.digests.values()) == c {
            State::Completed
        } else {
            State::Error("the linear checksum does not match the blocks".into())
        }
    } else {
        State::Completed
    };
    json(202, serde_json::json!({"Status": "pending"}))
}

const EC2_NS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

fn xml(status: u16, body: String) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Body::from(body))
        .unwrap()
}

fn ec2_error(code: &str, message: &str) -> Response {
    xml(
        400,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>{code}</Code>\
             <Message>{message}</Message></Error></Errors><RequestID>e8b5</RequestID></Response>"
        ),
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn ec2(state: &Mutex<Ebs>, body: &[u8]) -> Response {
    let params: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let list = |prefix: &str| -> Vec<String> {
        (1..)
            .map_while(|i| params.get(&format!("{prefix}.{i}")).cloned())
            .collect()
    };
    let action = params.get("Action").map(String::as_str).unwrap_or("");
    let mut e = state.lock().unwrap();
    match action {
        "DescribeSnapshots" => {
            let ids = list("SnapshotId");
            if ids.is_empty() {
                return ec2_error(
                    "InvalidParameterCombination",
                    "this double answers DescribeSnapshots by id only",
                );
            }
            let mut items = String::new();
            for id in &ids {
                let Some(s) = e.snapshots.get(id) else {
                    return ec2_error(
                        "InvalidSnapshot.NotFound",
                        &format!("The snapshot '{id}' does not exist."),
                    );
                };
                let (status, message) = match &s.state {
                    State::Pending => ("pending", String::new()),
                    State::Completed => ("completed", String::new()),
                    State::Error(m) => ("error", escape(m)),
                };
                let tags: String = s
                    .tags
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            "<item><key>{}</key><value>{}</value></item>",
                            escape(k),
                            escape(v)
                        )
                    })
                    .collect();
                items.push_str(&format!(
                    "<item><snapshotId>{id}</snapshotId><volumeId>vol-ffffffff</volumeId>\
                     <status>{status}</status><statusMessage>{message}</statusMessage>\
                     <startTime>2026-11-18T00:00:00.000Z</startTime><progress>100%</progress>\
                     <ownerId>123456789012</ownerId><volumeSize>{}</volumeSize>\
                     <description>{}</description><encrypted>{}</encrypted>\
                     <storageTier>standard</storageTier><tagSet>{tags}</tagSet></item>",
                    s.volume_gib,
                    escape(&s.description),
                    s.encrypted
                ));
            }
            xml(
                200,
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><DescribeSnapshotsResponse xmlns=\"{EC2_NS}\">\
                     <requestId>e8b5</requestId><snapshotSet>{items}</snapshotSet></DescribeSnapshotsResponse>"
                ),
            )
        }
        "CreateTags" => {
            let ids = list("ResourceId");
            let keys = (1..).map_while(|i| params.get(&format!("Tag.{i}.Key")).cloned());
            let pairs: Vec<(String, String)> = keys
                .enumerate()
                .map(|(i, k)| {
                    let v = params
                        .get(&format!("Tag.{}.Value", i + 1))
                        .cloned()
                        .unwrap_or_default();
                    (k, v)
                })
                .collect();
            for id in &ids {
                if !e.snapshots.contains_key(id) {
                    return ec2_error(
                        "InvalidSnapshot.NotFound",
                        &format!("The snapshot '{id}' does not exist."),
                    );
                }
            }
            for id in &ids {
                let s = e.snapshots.get_mut(id).expect("checked");
                s.tags.extend(pairs.iter().cloned());
            }
            xml(
                200,
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><CreateTagsResponse xmlns=\"{EC2_NS}\">\
                     <requestId>e8b5</requestId><return>true</return></CreateTagsResponse>"
                ),
            )
        }
        "DeleteSnapshot" => {
            let id = params.get("SnapshotId").cloned().unwrap_or_default();
            if e.snapshots.remove(&id).is_none() {
                return ec2_error(
                    "InvalidSnapshot.NotFound",
                    &format!("The snapshot '{id}' does not exist."),
                );
            }
            e.deleted.push(id);
            xml(
                200,
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><DeleteSnapshotResponse xmlns=\"{EC2_NS}\">\
                     <requestId>e8b5</requestId><return>true</return></DeleteSnapshotResponse>"
                ),
            )
        }
        other => ec2_error(
            "InvalidAction",
            &format!("The action {} is not valid for this double.", escape(other)),
        ),
    }
}

/// A bare HTTP/1.1 client on one kept-alive connection: the benchmark's
/// floor and the tests of the double itself (what the SDK would never
/// send). Enough for this double's replies, which always carry a length.
pub struct Conn {
    stream: std::io::BufReader<std::net::TcpStream>,
    host: String,
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

impl Conn {
    pub fn connect(base_url: &str) -> std::io::Result<Self> {
        let host = base_url.trim_start_matches("http://").trim_end_matches('/');
        let s = std::net::TcpStream::connect(host)?;
        s.set_nodelay(true)?;
        Ok(Self {
            stream: std::io::BufReader::new(s),
            host: host.to_owned(),
        })
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Reply> {
        use std::io::{BufRead, Read, Write};
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.host,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let w = self.stream.get_mut();
        w.write_all(head.as_bytes())?;
        w.write_all(body)?;
        let mut line = String::new();
        self.stream.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP reply: {line:?}")))?;
        let mut headers = vec![];
        loop {
            line.clear();
            self.stream.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        let len = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body)?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// PutSnapshotBlock as EBS wants it: the length, SHA-256, base64.
    /// Returns the reply and the digest (for the linear checksum).
    pub fn put_block(
        &mut self,
        snapshot: &str,
        index: u64,
        data: &[u8],
    ) -> std::io::Result<(Reply, [u8; 32])> {
        let digest: [u8; 32] = Sha256::digest(data).into();
        let checksum = STANDARD.encode(digest);
        let reply = self.request(
            "PUT",
            &format!("/snapshots/{snapshot}/blocks/{index}"),
            &[
                ("x-amz-Data-Length", &data.len().to_string()),
                ("x-amz-Checksum", &checksum),
                ("x-amz-Checksum-Algorithm", "SHA256"),
                ("Content-Type", "application/octet-stream"),
            ],
            data,
        )?;
        Ok((reply, digest))
    }
}

/// The linear checksum of a completed upload: SHA-256 over the blocks'
/// SHA-256 digests in index order, base64.
pub fn linear_checksum<'a>(digests: impl IntoIterator<Item = &'a [u8; 32]>) -> String {
    let mut h = Sha256::new();
    for d in digests {
        h.update(d);
    }
    STANDARD.encode(h.finalize())
}

/// Writes a sparse raw disk of `size` bytes laid out like a NixOS image's
/// ext4 file system: some metadata at the start of every 128 MiB block
/// group, and file data in runs of 4 KiB to 8 MiB at random 4 KiB-aligned
/// places in the first three quarters of the disk until `data_percent` of
/// its 512 KiB blocks hold data; the rest is zeros. Deterministic for a
/// `seed`. Returns the indices of the 512 KiB blocks holding data (what a
/// sparse upload sends).
pub fn write_nixos_like_image(
    path: &std::path::Path,
    size: u64,
    data_percent: u64,
    seed: u64,
) -> std::io::Result<std::collections::BTreeSet<u64>> {
    use std::os::unix::fs::FileExt;
    const FS_BLOCK: u64 = 4096;
    const GROUP: u64 = 128 << 20;
    const MAX_RUN: u64 = 8 << 20;
    let mut state = seed | 1;
    let mut next = move || {
        // xorshift64*: fast, and enough to place runs.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut noise = vec![0u8; MAX_RUN as usize + FS_BLOCK as usize];
    for w in noise.chunks_exact_mut(8) {
        w.copy_from_slice(&(next() | 1).to_ne_bytes());
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(size)?;
    let mut blocks = std::collections::BTreeSet::new();
    let block = BLOCK as u64;
    let write = |blocks: &mut std::collections::BTreeSet<u64>,
                 at: u64,
                 len: u64,
                 from: usize|
     -> std::io::Result<()> {
        let len = len.min(size.saturating_sub(at));
        if len > 0 {
            file.write_all_at(&noise[from..from + len as usize], at)?;
            blocks.extend(at / block..(at + len).div_ceil(block));
        }
        Ok(())
    };
    let mut group = 0;
    while group < size {
        write(
            &mut blocks,
            group,
            64 << 10,
            (group / GROUP % 64) as usize * 8,
        )?;
        group += GROUP;
    }
    let region = (size / 4 * 3).max(FS_BLOCK);
    let target = (size.div_ceil(block) * data_percent.min(75) / 100) as usize;
    while blocks.len() < target {
        let len = (next() % (MAX_RUN / FS_BLOCK) + 1) * FS_BLOCK;
        let at = next() % (region / FS_BLOCK) * FS_BLOCK;
        let from = (next() % FS_BLOCK) as usize;
        write(&mut blocks, at, len, from)?;
    }
    Ok(blocks)
}
