//! An IMDSv2 double: `PUT /latest/api/token` with a bounded TTL header,
//! tokens that expire and can be revoked, 401 without a valid token, and
//! faults injected per request. Serves user data, instance id, region and
//! instance-role credentials (what the AWS SDK's credential chain asks).

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Recognisable, so tests can assert that no token reaches any output.
pub const TOKEN_PREFIX: &str = "IMDSv2-TOKEN-SECRET-";
pub const ROLE_ACCESS_KEY: &str = "ASIAIMDSDOUBLEROLE01";
pub const ROLE_SECRET_KEY: &str = "imds-double-role-secret-key";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    Status(u16),
    /// 503 with `Retry-After: N`.
    Unavailable {
        retry_after: u64,
    },
    /// Answer normally, but only after this long.
    Delay(Duration),
    /// A redirect to `location`, which a client must not follow.
    Redirect {
        status: u16,
        location: String,
    },
    /// A token, with this TTL header instead of the one asked for.
    TokenTtl(String),
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub token: Option<String>,
    pub ttl: Option<String>,
    pub status: u16,
    pub at: Instant,
}

#[derive(Debug)]
pub struct Imds {
    pub user_data: Option<Vec<u8>>,
    pub instance_id: String,
    pub region: String,
    /// Instance profile role name; `None`: no role attached.
    pub role: Option<String>,
    /// 403 on the token PUT: IMDS disabled for the instance.
    pub token_forbidden: bool,
    /// Answer unauthenticated (IMDSv1) GETs, as with HttpTokens=optional.
    pub allow_v1: bool,
    pub token_faults: VecDeque<Fault>,
    /// A path answered with an endless 200 (1 MiB chunks), to a valid token.
    pub endless_paths: Vec<String>,
    pub get_faults: VecDeque<Fault>,
    /// Revoke all tokens once this many GETs were answered (a "401
    /// mid-run").
    pub revoke_after_gets: Option<usize>,
    pub requests: Vec<Request>,
    tokens: HashMap<String, Instant>,
    issued: u32,
    gets: usize,
}

impl Default for Imds {
    fn default() -> Self {
        Self {
            user_data: None,
            instance_id: "i-0123456789abcdef0".into(),
            region: "eu-west-1".into(),
            role: None,
            token_forbidden: false,
            allow_v1: false,
            token_faults: VecDeque::new(),
            endless_paths: vec![],
            get_faults: VecDeque::new(),
            revoke_after_gets: None,
            requests: vec![],
            tokens: HashMap::new(),
            issued: 0,
            gets: 0,
        }
    }
}

impl Imds {
    pub fn puts(&self) -> usize {
        self.requests.iter().filter(|r| r.method == "PUT").count()
    }

    pub fn gets_of(&self, path: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| r.method == "GET" && r.path == path)
            .count()
    }
}

pub struct ImdsDouble {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<Imds>>,
    /// Connections to accept and close at once, before any reply.
    pub drop_connections: Arc<AtomicU32>,
    /// When the double started accepting connections.
    pub listening_since: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl ImdsDouble {
    /// Serves on `listener` (already bound, so the port is known before the
    /// server starts), after `delay`: until then connections are refused.
    pub fn start(rt: &tokio::runtime::Runtime, imds: Imds, delay: Duration) -> Self {
        Self::start_at(rt, "127.0.0.1:0".parse().unwrap(), imds, delay)
    }

    /// On a given address: `169.254.169.254:80` inside a container's
    /// private network.
    pub fn start_at(
        rt: &tokio::runtime::Runtime,
        addr: SocketAddr,
        imds: Imds,
        delay: Duration,
    ) -> Self {
        let listener = std::net::TcpListener::bind(addr).expect("bind the IMDS double");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(imds));
        let drop_connections = Arc::new(AtomicU32::new(0));
        let (st, dc) = (state.clone(), drop_connections.clone());
        let listening_since = Arc::new(std::sync::Mutex::new(None));
        let since = listening_since.clone();
        // A late start must refuse connections, not queue them: close the
        // socket now and bind the same port again later.
        let late = !delay.is_zero();
        let listener = if late {
            drop(listener);
            None
        } else {
            Some(listener)
        };
        rt.spawn(async move {
            tokio::time::sleep(delay).await;
            let listener = match listener {
                Some(l) => {
                    l.set_nonblocking(true).unwrap();
                    tokio::net::TcpListener::from_std(l).unwrap()
                }
                None => tokio::net::TcpListener::bind(addr).await.expect("rebind"),
            };
            *since.lock().unwrap() = Some(Instant::now());
            let app =
                axum::Router::new().fallback(move |m, u, h, b| handle(st.clone(), m, u, h, b));
            axum::serve(
                crate::harness::Dropping {
                    inner: listener,
                    drop: dc,
                },
                app,
            )
            .await
            .unwrap();
        });
        Self {
            addr,
            state,
            drop_connections,
            listening_since,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Imds) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }
}

fn reply(status: u16, body: impl Into<Body>) -> Response {
    Response::builder()
        .status(status)
        .body(body.into())
        .unwrap()
}

async fn handle(
    state: Arc<Mutex<Imds>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    _body: Bytes,
) -> Response {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let token = header("x-aws-ec2-metadata-token");
    let ttl = header("x-aws-ec2-metadata-token-ttl-seconds");
    let path = uri.path().to_owned();
    let (fault, response) = {
        let mut s = state.lock().unwrap();
        let is_put = method == Method::PUT;
        let fault = if is_put {
            s.token_faults.pop_front()
        } else if method == Method::GET {
            s.get_faults.pop_front()
        } else {
            None
        };
        let response = match &fault {
            Some(Fault::Status(code)) => reply(*code, "injected fault"),
            Some(Fault::Unavailable { retry_after }) => Response::builder()
                .status(503)
                .header("retry-after", retry_after.to_string())
                .body(Body::from("busy"))
                .unwrap(),
            Some(Fault::Redirect { status, location }) => Response::builder()
                .status(*status)
                .header("location", location.as_str())
                .body(Body::empty())
                .unwrap(),
            Some(Fault::TokenTtl(header)) => {
                let mut r = answer(&mut s, &method, &path, token.as_deref(), ttl.as_deref());
                r.headers_mut().insert(
                    "x-aws-ec2-metadata-token-ttl-seconds",
                    header.parse().unwrap(),
                );
                r
            }
            Some(Fault::Delay(_)) | None => {
                answer(&mut s, &method, &path, token.as_deref(), ttl.as_deref())
            }
        };
        s.requests.push(Request {
            method: method.to_string(),
            path: path.clone(),
            token: token.clone(),
            ttl: ttl.clone(),
            status: response.status().as_u16(),
            at: Instant::now(),
        });
        (fault, response)
    };
    if let Some(Fault::Delay(d)) = fault {
        tokio::time::sleep(d).await;
    }
    response
}

fn answer(
    s: &mut Imds,
    method: &Method,
    path: &str,
    token: Option<&str>,
    ttl: Option<&str>,
) -> Response {
    if path == "/latest/api/token" {
        if *method != Method::PUT {
            return reply(405, "");
        }
        if s.token_forbidden {
            return reply(403, "");
        }
        let Some(ttl) = ttl
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|t| (1..=21600).contains(t))
        else {
            return reply(400, "missing or invalid TTL");
        };
        s.issued += 1;
        let t = format!(
            "{TOKEN_PREFIX}{}-{:08x}",
            s.issued,
            std::process::id() ^ s.issued
        );
        s.tokens
            .insert(t.clone(), Instant::now() + Duration::from_secs(ttl));
        return Response::builder()
            .status(200)
            .header("x-aws-ec2-metadata-token-ttl-seconds", ttl.to_string())
            .body(Body::from(t))
            .unwrap();
    }
    if *method != Method::GET {
        return reply(405, "");
    }
    // No token, or a stale one, is 401 (as with HttpTokens=required),
    // unless the instance still allows IMDSv1 and no token was sent.
    let valid = token
        .and_then(|t| s.tokens.get(t))
        .is_some_and(|exp| Instant::now() < *exp);
    let v1 = s.allow_v1 && token.is_none();
    if !valid && !v1 {
        return reply(401, "");
    }
    s.gets += 1;
    if s.endless_paths.iter().any(|p| p == path) {
        let chunk = Bytes::from(vec![b'{'; 1 << 20]);
        let stream =
            futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
        return Response::builder()
            .status(200)
            .body(Body::from_stream(stream))
            .unwrap();
    }
    if s.revoke_after_gets == Some(s.gets) {
        s.tokens.clear();
    }
    let creds_prefix = "/latest/meta-data/iam/security-credentials/";
    match path {
        "/latest/user-data" => match &s.user_data {
            Some(d) => reply(200, d.clone()),
            None => reply(404, ""),
        },
        "/latest/meta-data/instance-id" => reply(200, s.instance_id.clone()),
        "/latest/meta-data/placement/region" => reply(200, s.region.clone()),
        p if p == creds_prefix => match &s.role {
            Some(r) => reply(200, r.clone()),
            None => reply(404, ""),
        },
        p if p.starts_with(creds_prefix) && s.role.as_deref() == Some(&p[creds_prefix.len()..]) => {
            let body = serde_json::json!({
                "Code": "Success",
                "LastUpdated": "2026-11-25T00:00:00Z",
                "Type": "AWS-HMAC",
                "AccessKeyId": ROLE_ACCESS_KEY,
                "SecretAccessKey": ROLE_SECRET_KEY,
                "Token": "imds-double-session-token",
                "Expiration": "2099-01-01T00:00:00Z"
            });
            reply(200, body.to_string())
        }
        _ => reply(404, ""),
    }
}
