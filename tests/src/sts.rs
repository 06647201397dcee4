//! An STS double for `GetCallerIdentity` as the SDK sends it (the AWS
//! Query protocol): `POST /`, form-encoded `Action=GetCallerIdentity&
//! Version=2011-06-15`, SigV4-signed; the answer is XML. It names the
//! assumed-role ARN of whichever access key signed the request.

use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use axum::response::Response;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

pub const ACCOUNT: &str = "123456789012";

#[derive(Debug, Default)]
pub struct Sts {
    /// Refuse every request (as for revoked or unknown credentials).
    pub deny: bool,
    pub requests: Vec<String>,
}

pub struct StsDouble {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<Sts>>,
}

impl StsDouble {
    pub fn start(rt: &tokio::runtime::Runtime) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(Sts::default()));
        let st = state.clone();
        let app = axum::Router::new().fallback(move |h, b| handle(st.clone(), h, b));
        crate::harness::serve(rt, listener, app, Arc::new(AtomicU32::new(0)));
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Sts) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }
}

fn xml(status: u16, body: String) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .body(Body::from(body))
        .unwrap()
}

async fn handle(state: Arc<Mutex<Sts>>, headers: HeaderMap, body: Bytes) -> Response {
    let body = String::from_utf8_lossy(&body).into_owned();
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut s = state.lock().unwrap();
    s.requests.push(body.clone());
    if !body.contains("Action=GetCallerIdentity") {
        return xml(
            400,
            error("InvalidAction", "only GetCallerIdentity is doubled"),
        );
    }
    if s.deny || !auth.starts_with("AWS4-HMAC-SHA256 ") {
        return xml(
            403,
            error(
                "InvalidClientTokenId",
                "The security token included in the request is invalid.",
            ),
        );
    }
    let arn = if auth.contains(crate::imds::ROLE_ACCESS_KEY) {
        format!("arn:aws:sts::{ACCOUNT}:assumed-role/web-fleet-role/i-0123456789abcdef0")
    } else {
        format!("arn:aws:iam::{ACCOUNT}:user/static-test-user")
    };
    xml(
        200,
        format!(
            "<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
             <GetCallerIdentityResult><Arn>{arn}</Arn><UserId>AROAEXAMPLE:i-0123456789abcdef0</UserId>\
             <Account>{ACCOUNT}</Account></GetCallerIdentityResult>\
             <ResponseMetadata><RequestId>00000000-0000-0000-0000-000000000000</RequestId></ResponseMetadata>\
             </GetCallerIdentityResponse>"
        ),
    )
}

fn error(code: &str, message: &str) -> String {
    format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type>\
         <Code>{code}</Code><Message>{message}</Message></Error>\
         <RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    )
}
