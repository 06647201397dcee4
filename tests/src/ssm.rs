//! An SSM double speaking the AWS JSON 1.1 protocol the SDK uses for
//! `GetParameter`: `POST /`, `x-amz-target: AmazonSSM.GetParameter`,
//! `{"Name": ..., "WithDecryption": true}`, SigV4-signed. Parameters are
//! keyed by the exact `Name` requested (`name`, `name:label`, an ARN).

use crate::tls::{TestCa, TlsListener};
use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use axum::response::Response;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Param {
    pub kind: &'static str,
    pub value: String,
    pub version: i64,
}

impl Param {
    pub fn string(value: &str, version: i64) -> Self {
        Self {
            kind: "String",
            value: value.into(),
            version,
        }
    }

    pub fn secure(value: &str, version: i64) -> Self {
        Self {
            kind: "SecureString",
            value: value.into(),
            version,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    Throttling,
    Status500,
    AccessDenied,
    /// Answer normally after this long.
    Delay(Duration),
    /// This reply instead of the answer (a body that does not parse, a
    /// huge one).
    Raw {
        status: u16,
        body: Vec<u8>,
    },
    /// A 200 whose body never ends (chunked, 1 MiB at a time).
    Endless,
    /// A redirect to `location`, which a client must not follow.
    Redirect {
        status: u16,
        location: String,
    },
    /// The answer, but about another parameter.
    OtherName(String),
}

#[derive(Debug, Clone)]
pub struct Request {
    pub target: Option<String>,
    pub content_type: Option<String>,
    pub body: serde_json::Value,
    /// The SigV4 `Authorization` header: proves signing, names the access
    /// key and the region of the credential scope.
    pub authorization: Option<String>,
    pub at: Instant,
}

impl Request {
    pub fn name(&self) -> Option<&str> {
        self.body.get("Name").and_then(|v| v.as_str())
    }

    /// `Credential=AKID/DATE/REGION/ssm/aws4_request` → (AKID, REGION).
    pub fn credential(&self) -> Option<(String, String)> {
        let auth = self.authorization.as_deref()?;
        let cred = auth.split("Credential=").nth(1)?.split(',').next()?;
        let parts: Vec<&str> = cred.split('/').collect();
        Some((parts.first()?.to_string(), parts.get(2)?.to_string()))
    }
}

/// What a `PutComplianceItems` left for one instance and compliance type
/// (COMPLETE mode: the last upload replaces the items).
#[derive(Debug, Clone)]
pub struct Compliance {
    pub resource_id: String,
    pub resource_type: String,
    pub compliance_type: String,
    /// `ExecutionSummary` as sent (`ExecutionTime` in epoch seconds).
    pub execution: serde_json::Value,
    pub items: Vec<serde_json::Value>,
}

/// A managed instance (what the SSM agent registers): only these can hold
/// compliance, as for the real service.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub tags: Vec<(String, String)>,
}

#[derive(Debug, Default)]
pub struct Ssm {
    pub params: HashMap<String, Param>,
    /// Managed instances; `PutComplianceItems` on another ID fails with
    /// `InvalidResourceId`.
    pub instances: Vec<Instance>,
    /// Keyed by (resource ID, compliance type).
    pub compliance: std::collections::BTreeMap<(String, String), Compliance>,
    /// Faults for one operation only (`PutComplianceItems`, ...), taken
    /// before `faults`.
    pub op_faults: HashMap<String, VecDeque<Fault>>,
    /// Parameters not in `params` are read, at each request, from
    /// `DIR/<name without leading />.json` (`{"type", "value", "version"}`),
    /// so a test can change a parameter while the agent runs.
    pub params_dir: Option<std::path::PathBuf>,
    pub faults: VecDeque<Fault>,
    /// Every request is throttled (for budget exhaustion).
    pub always_throttle: bool,
    pub requests: Vec<Request>,
}

pub struct SsmDouble {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<Ssm>>,
    /// Served over TLS (see [`SsmDouble::start_tls`]).
    tls: bool,
    /// TLS handshakes that did not complete: the client refused us.
    pub refused: Arc<AtomicU32>,
}

impl SsmDouble {
    pub fn start(rt: &tokio::runtime::Runtime, ssm: Ssm) -> Self {
        Self::start_at(rt, "127.0.0.1:0".parse().unwrap(), ssm)
    }

    pub fn start_at(rt: &tokio::runtime::Runtime, addr: SocketAddr, ssm: Ssm) -> Self {
        let listener = std::net::TcpListener::bind(addr).expect("bind the SSM double");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ssm));
        let st = state.clone();
        let app = axum::Router::new().fallback(move |h, b| handle(st.clone(), h, b));
        crate::harness::serve(rt, listener, app, Arc::new(AtomicU32::new(0)));
        Self {
            addr,
            state,
            tls: false,
            refused: Arc::default(),
        }
    }

    /// The same double behind HTTPS on `localhost`, with a certificate
    /// `ca` signed, as the real endpoint is.
    pub fn start_tls(rt: &tokio::runtime::Runtime, ssm: Ssm, ca: &TestCa) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the SSM double");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ssm));
        let st = state.clone();
        let app = axum::Router::new().fallback(move |h, b| handle(st.clone(), h, b));
        let refused = Arc::new(AtomicU32::new(0));
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server.clone());
        let counter = refused.clone();
        rt.spawn(async move {
            let inner = tokio::net::TcpListener::from_std(listener).unwrap();
            let tls = TlsListener {
                inner,
                acceptor,
                refused: counter,
            };
            axum::serve(tls, app).await.unwrap();
        });
        Self {
            addr,
            state,
            tls: true,
            refused,
        }
    }

    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Ssm) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }
}

pub(crate) fn json(status: u16, body: serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-requestid", "00000000-0000-0000-0000-000000000000")
        .body(Body::from(body.to_string()))
        .unwrap()
}

pub(crate) fn error(status: u16, kind: &str, message: &str) -> Response {
    json(
        status,
        serde_json::json!({"__type": kind, "message": message}),
    )
}

async fn handle(state: Arc<Mutex<Ssm>>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let (delay, response) = {
        let mut s = state.lock().unwrap();
        let request = Request {
            target: header("x-amz-target"),
            content_type: header("content-type"),
            body: body.clone(),
            authorization: header("authorization"),
            at: Instant::now(),
        };
        s.requests.push(request.clone());
        let op = request
            .target
            .as_deref()
            .and_then(|t| t.strip_prefix("AmazonSSM."))
            .unwrap_or_default()
            .to_owned();
        let fault = if s.always_throttle {
            Some(Fault::Throttling)
        } else if let Some(f) = s.op_faults.get_mut(&op).and_then(VecDeque::pop_front) {
            Some(f)
        } else {
            s.faults.pop_front()
        };
        let mut delay = None;
        let mut renamed = None;
        let response = match fault {
            Some(Fault::Raw { status, body }) => Some(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/x-amz-json-1.1")
                    .body(Body::from(body))
                    .unwrap(),
            ),
            Some(Fault::Endless) => {
                let chunk = Bytes::from(vec![b' '; 1 << 20]);
                let stream = futures_util::stream::repeat_with(move || {
                    Ok::<_, std::io::Error>(chunk.clone())
                });
                Some(
                    Response::builder()
                        .status(200)
                        .header("content-type", "application/x-amz-json-1.1")
                        .body(Body::from_stream(stream))
                        .unwrap(),
                )
            }
            Some(Fault::Redirect { status, location }) => Some(
                Response::builder()
                    .status(status)
                    .header("location", location)
                    .body(Body::empty())
                    .unwrap(),
            ),
            Some(Fault::OtherName(n)) => {
                renamed = Some(n);
                None
            }
            Some(Fault::Throttling) => Some(error(400, "ThrottlingException", "Rate exceeded")),
            Some(Fault::Status500) => Some(error(500, "InternalServerError", "injected")),
            Some(Fault::AccessDenied) => Some(error(
                400,
                "AccessDeniedException",
                "User: arn:aws:sts::123456789012:assumed-role/web/i-0 is not authorized to perform: ssm:GetParameter",
            )),
            Some(Fault::Delay(d)) => {
                delay = Some(d);
                None
            }
            None => None,
        };
        let response = response.unwrap_or_else(|| match op.as_str() {
            // SSM refuses an unsigned request whatever it asks.
            _ if request
                .authorization
                .as_deref()
                .is_none_or(|a| !a.starts_with("AWS4-HMAC-SHA256 ")) =>
            {
                error(
                    400,
                    "MissingAuthenticationTokenException",
                    "request is not signed",
                )
            }
            "GetParameter" => answer(&s, &request, renamed.as_deref()),
            _ => crate::ssm_compliance::answer(&mut s, &op, &request),
        });
        (delay, response)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    response
}

/// What SSM names in its reply: the parameter without a `:label` or
/// `:version` selector (for an ARN, the ARN without it).
fn reply_name(asked: &str) -> &str {
    match asked.find(":parameter/") {
        Some(i) => {
            let start = i + ":parameter/".len();
            match asked[start..].find(':') {
                Some(j) => &asked[..start + j],
                None => asked,
            }
        }
        None => asked.split(':').next().unwrap_or(asked),
    }
}

fn answer(s: &Ssm, r: &Request, renamed: Option<&str>) -> Response {
    if r.target.as_deref() != Some("AmazonSSM.GetParameter") {
        return error(
            400,
            "UnknownOperationException",
            "only GetParameter is doubled",
        );
    }
    let Some(name) = r.name() else {
        return error(400, "ValidationException", "Name is required");
    };
    let from_dir = || -> Option<Param> {
        let path = s
            .params_dir
            .as_ref()?
            .join(format!("{}.json", name.trim_start_matches('/')));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        let kind = if v["type"] == "SecureString" {
            "SecureString"
        } else {
            "String"
        };
        Some(Param {
            kind,
            value: v["value"].as_str()?.to_owned(),
            version: v["version"].as_i64()?,
        })
    };
    match s.params.get(name).cloned().or_else(from_dir) {
        Some(mut p) => {
            // Without WithDecryption, SSM returns a SecureString encrypted.
            if p.kind == "SecureString" && r.body["WithDecryption"] != true {
                p.value = "AQICAHg-not-decrypted-ciphertext==".into();
            }
            json(
                200,
                serde_json::json!({"Parameter": {
                    "Name": renamed.unwrap_or(reply_name(name)),
                    "Type": p.kind,
                    "Value": p.value,
                    "Version": p.version,
                    "DataType": "text",
                    "ARN": format!("arn:aws:ssm:eu-west-1:123456789012:parameter{}", name),
                }}),
            )
        }
        None => error(400, "ParameterNotFound", ""),
    }
}
