//! A double in front of moto for what moto does not do, or does more
//! kindly than AWS (moto 5.2; see facts.md): it forwards every request to
//! moto unchanged and
//!
//! - implements EnableImageDeprecation / DisableImageDeprecation (moto
//!   has neither), refusing a time in the past as EC2 does, and reports
//!   `deprecationTime` in DescribeImages;
//! - applies RegisterImage's and CopyImage's `TagSpecifications` (moto
//!   ignores them; on AWS they are atomic with the call);
//! - keeps CopyImage's `ClientToken` idempotency (moto ignores it);
//! - answers GetConsoleOutput with a console the test scripts (moto's is
//!   a fixed 2006 Xen log);
//! - limits DescribeRegions to the regions a test names;
//! - injects faults per action (and region): throttling, errors, a reply
//!   held back after the action took effect (to kill a client mid-call);
//! - records every call (service, action, region, parameters).
//!
//! Everything on 127.0.0.1.

use crate::harness::rt;
use crate::moto::Moto;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub service: &'static str,
    pub action: String,
    pub region: String,
    /// Form parameters (EC2), or the path (EBS) and JSON body (SSM).
    pub params: BTreeMap<String, String>,
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// The service's throttling error.
    Throttle,
    /// An error with this HTTP status and code.
    Error { status: u16, code: String },
    /// Forward (the action takes effect), then hold the reply back this
    /// long: a client killed meanwhile never learns the result.
    HoldReply(Duration),
}

#[derive(Debug, Clone)]
pub struct Fault {
    pub action: String,
    pub region: Option<String>,
    /// How many matching calls get it (`u32::MAX`: all).
    pub times: u32,
    /// Matching calls to let through first.
    pub after: u32,
    pub kind: FaultKind,
}

impl Fault {
    pub fn new(action: &str, kind: FaultKind) -> Self {
        Self {
            action: action.into(),
            region: None,
            times: 1,
            after: 0,
            kind,
        }
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub calls: Vec<Call>,
    pub faults: Vec<Fault>,
    /// (region, image) → deprecation time (RFC 3339).
    pub deprecations: HashMap<(String, String), String>,
    copy_tokens: HashMap<(String, String), String>,
    /// The console every instance shows once it has been asked this many
    /// times (`None`: an empty console).
    pub console: Option<(String, u32)>,
    console_polls: u32,
    /// DescribeRegions answers with these.
    pub regions: Option<Vec<String>>,
    seen: HashMap<String, u32>,
}

pub struct AwsDouble {
    pub moto: Moto,
    pub addr: std::net::SocketAddr,
    pub state: Arc<Mutex<State>>,
}

impl AwsDouble {
    pub fn start() -> Self {
        let moto = Moto::start();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let upstream = moto.url();
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("a plain HTTP client");
        let st = state.clone();
        let app = axum::Router::new().fallback(move |m, u, h, b| {
            handle(st.clone(), http.clone(), upstream.clone(), m, u, h, b)
        });
        crate::harness::serve(rt(), listener, app, Arc::new(AtomicU32::new(0)));
        Self { moto, addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    pub fn calls(&self) -> Vec<Call> {
        self.with(|s| s.calls.clone())
    }

    /// Calls of `action`, in order.
    pub fn calls_of(&self, action: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.action == action)
            .collect()
    }

    /// An EC2 query straight to moto (not through the double), for
    /// checking its state: the reply's XML.
    pub fn ec2(&self, region: &str, params: &[(&str, &str)]) -> String {
        let body = form(params);
        query(
            &self.moto.url(),
            "/",
            region,
            "ec2",
            "POST",
            Some(body),
            "application/x-www-form-urlencoded",
        )
    }

    /// A GET of moto's EBS API in `region` (ListSnapshotBlocks,
    /// GetSnapshotBlock).
    pub fn ebs_get(&self, region: &str, path: &str) -> Vec<u8> {
        raw(
            &self.moto.url(),
            path,
            region,
            "ebs",
            "GET",
            None,
            "application/json",
            &[],
        )
    }
}

fn form(params: &[(&str, &str)]) -> String {
    let mut f = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        f.append_pair(k, v);
    }
    f.append_pair("Version", "2016-11-15");
    f.finish()
}

/// moto reads only the region (and service) of a signature.
fn auth(region: &str, service: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential=AKIDTESTDOUBLE/20261129/{region}/{service}/aws4_request, SignedHeaders=host, Signature=0"
    )
}

#[allow(clippy::too_many_arguments)]
fn raw(
    base: &str,
    path: &str,
    region: &str,
    service: &str,
    method: &str,
    body: Option<String>,
    ctype: &str,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let base = base.to_owned();
    let (path, region, service, method, ctype) = (
        path.to_owned(),
        region.to_owned(),
        service.to_owned(),
        method.to_owned(),
        ctype.to_owned(),
    );
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    std::thread::spawn(move || {
        rt().block_on(async move {
            let client = reqwest::Client::builder().no_proxy().build().unwrap();
            let mut req = client
                .request(method.parse().unwrap(), format!("{base}{path}"))
                .header("authorization", auth(&region, &service));
            if body.is_some() {
                req = req.header("content-type", ctype);
            }
            for (k, v) in extra {
                req = req.header(k, v);
            }
            if let Some(b) = body {
                req = req.body(b);
            }
            req.send().await.unwrap().bytes().await.unwrap().to_vec()
        })
    })
    .join()
    .unwrap()
}

fn query(
    base: &str,
    path: &str,
    region: &str,
    service: &str,
    method: &str,
    body: Option<String>,
    ctype: &str,
) -> String {
    String::from_utf8(raw(base, path, region, service, method, body, ctype, &[])).unwrap()
}

/// SSM's GetParameter straight to moto (`body`: its JSON request).
pub fn ssm_get(d: &AwsDouble, region: &str, body: &str) -> Vec<u8> {
    raw(
        &d.moto.url(),
        "/",
        region,
        "ssm",
        "POST",
        Some(body.to_owned()),
        "application/x-amz-json-1.1",
        &[("x-amz-target", "AmazonSSM.GetParameter")],
    )
}

fn region_of(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split("Credential=").nth(1))
        .and_then(|c| c.split('/').nth(2))
        .unwrap_or("us-east-1")
        .to_owned()
}

/// Which service and action a request is.
fn classify(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> (&'static str, String, BTreeMap<String, String>) {
    if let Some(target) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        let action = target.rsplit('.').next().unwrap_or(target).to_owned();
        let mut p = BTreeMap::new();
        p.insert("body".into(), String::from_utf8_lossy(body).into_owned());
        return ("ssm", action, p);
    }
    let path = uri.path();
    if path.starts_with("/snapshots") {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let action = match (method.as_str(), parts.as_slice()) {
            ("POST", ["snapshots"]) => "StartSnapshot",
            ("PUT", ["snapshots", _, "blocks", _]) => "PutSnapshotBlock",
            ("POST", ["snapshots", "completion", _]) => "CompleteSnapshot",
            ("GET", ["snapshots", _, "blocks"]) => "ListSnapshotBlocks",
            ("GET", ["snapshots", _, "blocks", _]) => "GetSnapshotBlock",
            _ => "Ebs",
        };
        let mut p = BTreeMap::new();
        p.insert("path".into(), path.to_owned());
        if action == "StartSnapshot" {
            p.insert("body".into(), String::from_utf8_lossy(body).into_owned());
        }
        if action == "PutSnapshotBlock"
            && let Some(c) = headers.get("x-amz-checksum").and_then(|v| v.to_str().ok())
        {
            p.insert("checksum".into(), c.to_owned());
        }
        return ("ebs", action.into(), p);
    }
    let params: BTreeMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let action = params.get("Action").cloned().unwrap_or_default();
    ("ec2", action, params)
}

fn ec2_error(status: u16, code: &str, message: &str) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .body(Body::from(format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>00000000-double</RequestID></Response>"
        )))
        .unwrap()
}

fn json_error(service: &str, status: u16, code: &str, message: &str) -> Response {
    let body = if service == "ebs" {
        serde_json::json!({"message": message, "Reason": "ACCOUNT_THROTTLED"})
    } else {
        serde_json::json!({"__type": code, "message": message})
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-amzn-errortype", code)
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn ec2_ok(action: &str, inner: &str) -> Response {
    Response::builder()
        .status(200)
        .header("content-type", "text/xml")
        .body(Body::from(format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><{action}Response xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>00000000-double</requestId>{inner}</{action}Response>"
        )))
        .unwrap()
}

fn between<'a>(xml: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = xml.find(open)? + open.len();
    let end = xml[start..].find(close)? + start;
    Some(&xml[start..end])
}

/// `TagSpecification.N.Tag.M.Key/Value` for `ResourceType` `kind`.
fn tag_specs(p: &BTreeMap<String, String>, kind: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    for n in 1..10 {
        let Some(rt) = p.get(&format!("TagSpecification.{n}.ResourceType")) else {
            break;
        };
        if rt != kind {
            continue;
        }
        for m in 1..50 {
            match (
                p.get(&format!("TagSpecification.{n}.Tag.{m}.Key")),
                p.get(&format!("TagSpecification.{n}.Tag.{m}.Value")),
            ) {
                (Some(k), Some(v)) => out.push((k.clone(), v.clone())),
                _ => break,
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    state: Arc<Mutex<State>>,
    http: reqwest::Client,
    upstream: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let region = region_of(&headers);
    let (service, action, params) = classify(&method, &uri, &headers, &body);
    // A fault for this call?
    let fault = {
        let mut s = state.lock().unwrap();
        let n = s.seen.entry(format!("{region}/{action}")).or_insert(0);
        *n += 1;
        let seen = *n;
        let mut hit = None;
        for f in s.faults.iter_mut() {
            if f.action == action
                && f.region.as_ref().is_none_or(|r| *r == region)
                && seen > f.after
                && f.times > 0
            {
                if f.times != u32::MAX {
                    f.times -= 1;
                }
                hit = Some(f.kind.clone());
                break;
            }
        }
        hit
    };
    let record = |status: u16| {
        state.lock().unwrap().calls.push(Call {
            service,
            action: action.clone(),
            region: region.clone(),
            params: params.clone(),
            status,
        });
    };
    let mut hold = None;
    match &fault {
        Some(FaultKind::Throttle) => {
            record(503);
            return match service {
                "ec2" => ec2_error(
                    503,
                    "RequestLimitExceeded",
                    "Request limit exceeded (double)",
                ),
                "ebs" => json_error(
                    service,
                    400,
                    "RequestThrottledException",
                    "throttled (double)",
                ),
                _ => json_error(
                    service,
                    400,
                    "ThrottlingException",
                    "Rate exceeded (double)",
                ),
            };
        }
        Some(FaultKind::Error { status, code }) => {
            record(*status);
            return match service {
                "ec2" => ec2_error(*status, code, "injected by the double"),
                _ => json_error(service, *status, code, "injected by the double"),
            };
        }
        Some(FaultKind::HoldReply(d)) => hold = Some(*d),
        None => {}
    }

    // What moto lacks or does more kindly.
    if service == "ec2" {
        let mut s = state.lock().unwrap();
        match action.as_str() {
            "EnableImageDeprecation" => {
                let image = params.get("ImageId").cloned().unwrap_or_default();
                let at = params.get("DeprecateAt").cloned().unwrap_or_default();
                let parsed = humantime_parse(&at);
                let now = std::time::SystemTime::now();
                drop(s);
                return match parsed {
                    Some(t) if t + Duration::from_secs(5) >= now => {
                        record(200);
                        state
                            .lock()
                            .unwrap()
                            .deprecations
                            .insert((region, image), at);
                        ec2_ok(&action, "<return>true</return>")
                    }
                    Some(_) => {
                        record(400);
                        ec2_error(
                            400,
                            "InvalidParameterValue",
                            "The deprecation time cannot be in the past",
                        )
                    }
                    None => {
                        record(400);
                        ec2_error(400, "InvalidParameterValue", "DeprecateAt is not a time")
                    }
                };
            }
            "DisableImageDeprecation" => {
                let image = params.get("ImageId").cloned().unwrap_or_default();
                s.deprecations.remove(&(region.clone(), image));
                drop(s);
                record(200);
                return ec2_ok(&action, "<return>true</return>");
            }
            "DescribeRegions" if s.regions.is_some() => {
                let items: String = s
                    .regions
                    .as_ref()
                    .unwrap()
                    .iter()
                    .map(|r| format!("<item><regionName>{r}</regionName><regionEndpoint>ec2.{r}.amazonaws.com</regionEndpoint><optInStatus>opt-in-not-required</optInStatus></item>"))
                    .collect();
                drop(s);
                record(200);
                return ec2_ok(&action, &format!("<regionInfo>{items}</regionInfo>"));
            }
            "GetConsoleOutput" => {
                s.console_polls += 1;
                let text = match &s.console {
                    Some((t, after)) if s.console_polls > *after => t.clone(),
                    _ => String::new(),
                };
                drop(s);
                record(200);
                use base64::Engine as _;
                let out = base64::engine::general_purpose::STANDARD.encode(text);
                let id = params.get("InstanceId").cloned().unwrap_or_default();
                return ec2_ok(
                    &action,
                    &format!(
                        "<instanceId>{id}</instanceId><timestamp>2026-11-29T12:00:00.000Z</timestamp><output>{out}</output>"
                    ),
                );
            }
            "CopyImage" => {
                if let Some(token) = params.get("ClientToken")
                    && let Some(id) = s.copy_tokens.get(&(region.clone(), token.clone())).cloned()
                {
                    drop(s);
                    record(200);
                    return ec2_ok(&action, &format!("<imageId>{id}</imageId>"));
                }
            }
            _ => {}
        }
    }

    // To moto.
    let mut req = http.request(
        method.clone(),
        format!(
            "{upstream}{}",
            uri.path_and_query().map_or("/", |p| p.as_str())
        ),
    );
    for (k, v) in headers.iter() {
        if k != "host" && k != "content-length" {
            req = req.header(k, v);
        }
    }
    let reply = match req.body(body.to_vec()).send().await {
        Ok(r) => r,
        Err(e) => {
            record(502);
            return ec2_error(502, "DoubleUpstream", &e.to_string());
        }
    };
    let status = reply.status().as_u16();
    let ctype = reply
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/xml")
        .to_owned();
    let mut extra: Vec<(String, String)> = reply
        .headers()
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-amz"))
        .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned())))
        .collect();
    let mut text = reply.bytes().await.unwrap_or_default().to_vec();
    record(status);

    if service == "ec2" && status == 200 {
        let xml = String::from_utf8_lossy(&text).into_owned();
        match action.as_str() {
            "RegisterImage" | "CopyImage" => {
                if let Some(id) = between(&xml, "<imageId>", "</imageId>") {
                    let id = id.to_owned();
                    let tags = tag_specs(&params, "image");
                    if !tags.is_empty() {
                        let mut p: Vec<(String, String)> = vec![
                            ("Action".into(), "CreateTags".into()),
                            ("ResourceId.1".into(), id.clone()),
                        ];
                        for (i, (k, v)) in tags.iter().enumerate() {
                            p.push((format!("Tag.{}.Key", i + 1), k.clone()));
                            p.push((format!("Tag.{}.Value", i + 1), v.clone()));
                        }
                        let refs: Vec<(&str, &str)> =
                            p.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
                        let body = form(&refs);
                        let _ = http
                            .post(format!("{upstream}/"))
                            .header("authorization", auth(&region, "ec2"))
                            .header("content-type", "application/x-www-form-urlencoded")
                            .body(body)
                            .send()
                            .await;
                    }
                    if action == "CopyImage"
                        && let Some(token) = params.get("ClientToken")
                    {
                        state
                            .lock()
                            .unwrap()
                            .copy_tokens
                            .insert((region.clone(), token.clone()), id);
                    }
                }
            }
            "DescribeImages" => {
                let s = state.lock().unwrap();
                let mut out = xml.clone();
                for ((r, image), at) in &s.deprecations {
                    if *r != region {
                        continue;
                    }
                    let tag = format!("<imageId>{image}</imageId>");
                    out = out.replace(
                        &tag,
                        &format!("{tag}<deprecationTime>{at}</deprecationTime>"),
                    );
                }
                text = out.into_bytes();
            }
            _ => {}
        }
    }
    if let Some(d) = hold {
        tokio::time::sleep(d).await;
    }
    let mut b = Response::builder()
        .status(status)
        .header("content-type", ctype);
    for (k, v) in extra.drain(..) {
        b = b.header(k, v);
    }
    b.body(Body::from(text)).unwrap()
}

fn humantime_parse(s: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(s.trim().trim_end_matches('Z')).ok()
}
