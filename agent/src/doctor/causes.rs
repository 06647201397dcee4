//! What a failed login or resolve means, in the operator's words, from
//! what the program printed: pure, so every cause is tested on its text.
//!
//! fh's messages are its `FhError`s (DeterminateSystems/fh
//! `src/cli/error.rs`), printed by color-eyre as `Error:` and a numbered
//! chain (`   0: output reference … not found`); `FlakeHubClient::resolve`
//! (`src/cli/cmd/mod.rs`) maps 404 to "not found", 401 to "not
//! authorized", other statuses to "http call returned error code", and
//! transport failures to "http error: error sending request". The body
//! of an error reply is not shown. determinate-nixd is closed source and
//! its messages are not documented: its causes are told by keywords, and
//! anything else is shown as its last line.

/// A failure explained: what happened, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub detail: String,
    pub fix: String,
}

/// How a program ended, as far as the cause is concerned.
pub enum Ended<'a> {
    /// It exited unsuccessfully (`status` as `describe` shows it) and
    /// printed these last lines on stderr.
    Failed {
        status: &'a str,
        stderr: &'a [String],
    },
    /// It did not finish within the budget and was killed.
    TimedOut { after_secs: u64 },
}

const NETWORK_FIX: &str = "the instance needs HTTPS (port 443) to api.flakehub.com, cache.flakehub.com \
     and STS: check its security group's outbound rules, its subnet's route to a NAT gateway or \
     internet gateway, and any proxy";

/// What a transport failure says (reqwest's "error sending request", DNS,
/// connect, time-outs), in fh's and determinate-nixd's messages alike.
const UNREACHABLE: &[&str] = &[
    "error sending request",
    "dns",
    "connect",
    "timed out",
    "timeout",
    "network",
    "unreachable",
];

fn has(lines: &[String], words: &[&str]) -> bool {
    lines.iter().any(|l| {
        let l = l.to_ascii_lowercase();
        words.iter().any(|w| l.contains(w))
    })
}

/// The line that says most: the last of a color-eyre chain (`   0: …`),
/// else the last line that is not a hint about backtraces or reporting.
fn said(lines: &[String]) -> Option<String> {
    let chain = lines
        .iter()
        .filter_map(|l| {
            let t = l.trim_start();
            let (n, rest) = t.split_once(": ")?;
            n.parse::<u32>().ok().map(|_| rest.trim())
        })
        .next();
    let line = chain.or_else(|| {
        lines.iter().rev().map(|l| l.trim()).find(|l| {
            let lower = l.to_ascii_lowercase();
            !l.is_empty()
                && l != &"Error:"
                && !lower.contains("backtrace")
                && !lower.contains("consider reporting")
                && !lower.starts_with("location:")
        })
    })?;
    Some(crate::text::shown(line, 300))
}

fn quoted(program: &str, lines: &[String]) -> String {
    match said(lines) {
        Some(s) => format!(" ({program} said: {s})"),
        None => String::new(),
    }
}

/// `determinate-nixd login aws` failed. `principal` is the ARN FlakeHub
/// must know, when STS told it.
pub fn login(ended: Ended<'_>, principal: Option<&str>) -> Cause {
    let register = match principal {
        Some(p) => format!(
            "register {p} under ARNs in the FlakeHub organisation's settings (an STS login reads \
             the flakes of the organisation that registered the role)"
        ),
        None => "register the instance role as arn:aws:iam::ACCOUNT:assumed-role/ROLE/i-* under \
                 ARNs in the FlakeHub organisation's settings"
            .to_owned(),
    };
    let (status, stderr) = match ended {
        Ended::TimedOut { after_secs } => {
            return Cause {
                detail: format!(
                    "determinate-nixd login aws did not finish within {after_secs}s: FlakeHub or \
                     STS cannot be reached"
                ),
                fix: NETWORK_FIX.to_owned(),
            };
        }
        Ended::Failed { status, stderr } => (status, stderr),
    };
    let quote = quoted("determinate-nixd", stderr);
    if has(stderr, &["determinate-nixd.socket", "daemon"]) {
        return Cause {
            detail: format!(
                "determinate-nixd login aws failed ({status}): the Determinate daemon does not answer{quote}"
            ),
            fix: "the image must run Determinate's daemon: `systemctl status determinate-nixd`; \
                  the image's NixOS configuration must import Determinate's NixOS module"
                .to_owned(),
        };
    }
    if has(
        stderr,
        &[
            "not registered",
            "unauthorized",
            "unauthorised",
            "forbidden",
            " 401",
            " 403",
            "not allowed",
            "permission",
            "denied",
        ],
    ) {
        return Cause {
            detail: format!("FlakeHub refused the instance role ({status}){quote}"),
            fix: register,
        };
    }
    if has(stderr, &["credential", "instance profile", "metadata"]) {
        return Cause {
            detail: format!("determinate-nixd found no AWS credentials ({status}){quote}"),
            fix: super::ROLE_NEEDS.to_owned(),
        };
    }
    if has(stderr, UNREACHABLE) {
        return Cause {
            detail: format!("FlakeHub or STS cannot be reached ({status}){quote}"),
            fix: NETWORK_FIX.to_owned(),
        };
    }
    Cause {
        detail: format!("determinate-nixd login aws failed ({status}){quote}"),
        fix: format!(
            "run `determinate-nixd login aws` on the instance to see all it says; if FlakeHub refused \
             the role: {register}"
        ),
    }
}

/// `fh resolve --json REF` failed. `shown` is the reference as it may be
/// shown; `logged_in` whether this doctor's login succeeded (or was not
/// wanted).
pub fn resolve(ended: Ended<'_>, shown: &str, logged_in: bool) -> Cause {
    let (status, stderr) = match ended {
        Ended::TimedOut { after_secs } => {
            return Cause {
                // fh sets no timeouts of its own: a network that drops
                // packets holds it until the agent's.
                detail: format!(
                    "fh resolve {shown} did not finish within {after_secs}s: FlakeHub cannot be reached"
                ),
                fix: NETWORK_FIX.to_owned(),
            };
        }
        Ended::Failed { status, stderr } => (status, stderr),
    };
    let quote = quoted("fh", stderr);
    if has(stderr, &["not found"]) {
        return Cause {
            detail: format!(
                "FlakeHub has no {shown}: the flake, a release matching the version, or the output \
                 does not exist{quote}"
            ),
            fix: "check the reference (ORG/FLAKE/VERSION#nixosConfigurations.NAME; `*` is the latest \
                  release) against the flake's page on flakehub.com; a new release must have been \
                  published (flakehub-push) before instances can use it"
                .to_owned(),
        };
    }
    if has(
        stderr,
        &["not authorized", "error code 401", "error code 403"],
    ) {
        let (detail, fix) = if logged_in {
            (
                format!(
                    "FlakeHub refused access to {shown}: the flake is private and this instance's organisation may not read it{quote}"
                ),
                "an STS login reads the flakes of the organisation that registered the role: register \
                 the role in the flake's organisation, or publish the flake there",
            )
        } else {
            (
                format!(
                    "FlakeHub refused access to {shown}: the flake is private and this instance is not logged in{quote}"
                ),
                "fix the FlakeHub login (the check above), or set login = true if it was turned off",
            )
        };
        return Cause {
            detail,
            fix: fix.to_owned(),
        };
    }
    if has(stderr, &["error decoding response body", "store_path"]) {
        return Cause {
            detail: format!(
                "FlakeHub knows {shown} but gave no store path for it: the release was most likely \
                 published without its output paths{quote}"
            ),
            fix: "publish the release with flakehub-push's `include-output-paths: true`, and push its \
                  closure to FlakeHub Cache (determinate-nix-action with FlakeHub Cache enabled), so \
                  instances can download it"
                .to_owned(),
        };
    }
    if has(stderr, UNREACHABLE) {
        return Cause {
            detail: format!("FlakeHub cannot be reached ({status}){quote}"),
            fix: NETWORK_FIX.to_owned(),
        };
    }
    Cause {
        detail: format!("fh resolve {shown} failed ({status}){quote}"),
        fix: format!("run `fh resolve {shown}` on the instance to see all it says"),
    }
}

/// The fix for an AWS request (STS, SSM) that failed on the way, from its
/// description (`aws::describe`), or `None` when the cause is not the way.
pub fn network_fix(described: &str) -> Option<String> {
    let d = described.to_ascii_lowercase();
    if d.contains("timed out") || d.contains("connection failed") || d.contains("could not be sent")
    {
        Some(
            "the instance needs HTTPS (port 443) to the AWS endpoints: a route to a NAT gateway or \
             internet gateway, or VPC interface endpoints for com.amazonaws.REGION.sts and \
             com.amazonaws.REGION.ssm; check the security group's outbound rules"
                .to_owned(),
        )
    } else if d.contains("credential") {
        Some(super::ROLE_NEEDS.to_owned())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    /// What fh (color-eyre, no location or spantrace sections) prints.
    fn fh_error(message: &str) -> Vec<String> {
        lines(&format!(
            "Error: \n   0: {message}\n\nBacktrace omitted. Run with RUST_BACKTRACE=1 environment \
             variable to display it.\nRun with RUST_BACKTRACE=full to include source snippets.\n\
             Consider reporting this error using this URL: https://github.com/DeterminateSystems/fh/issues/new"
        ))
    }

    fn failed(stderr: &[String]) -> Ended<'_> {
        Ended::Failed {
            status: "exit code 1",
            stderr,
        }
    }

    const REF: &str = "acme/web/0.1#nixosConfigurations.web";

    #[test]
    fn fh_not_found_names_the_reference_and_publishing() {
        let e = fh_error(&format!("output reference {REF} not found"));
        let c = resolve(failed(&e), REF, true);
        assert!(
            c.detail.starts_with(&format!("FlakeHub has no {REF}")),
            "{c:?}"
        );
        assert!(
            c.detail
                .contains(&format!("(fh said: output reference {REF} not found)")),
            "{c:?}"
        );
        assert!(c.fix.contains("flakehub-push"), "{c:?}");
        assert!(!c.detail.contains("Backtrace"), "{c:?}");
    }

    #[test]
    fn fh_not_authorized_depends_on_the_login() {
        let e = fh_error("access to this output reference is not authorized");
        let c = resolve(failed(&e), REF, false);
        assert!(c.detail.contains("not logged in"), "{c:?}");
        assert!(c.fix.contains("FlakeHub login"), "{c:?}");
        let c = resolve(failed(&e), REF, true);
        assert!(c.detail.contains("may not read it"), "{c:?}");
        assert!(c.fix.contains("register the role"), "{c:?}");
        let e = fh_error("http call returned error code 403 Forbidden");
        assert!(
            resolve(failed(&e), REF, true)
                .detail
                .contains("refused access")
        );
    }

    #[test]
    fn fh_without_output_paths_and_unreachable() {
        let e = fh_error(
            "http error: error decoding response body: missing field `store_path` at line 1 column 40",
        );
        let c = resolve(failed(&e), REF, true);
        assert!(c.detail.contains("gave no store path"), "{c:?}");
        assert!(c.fix.contains("include-output-paths: true"), "{c:?}");

        let e = fh_error(
            "http error: error sending request for url (https://api.flakehub.com/f/acme/web/0.1/output/x): \
             error trying to connect: dns error",
        );
        let c = resolve(failed(&e), REF, true);
        assert!(c.detail.starts_with("FlakeHub cannot be reached"), "{c:?}");
        assert!(c.fix.contains("api.flakehub.com"), "{c:?}");

        let c = resolve(Ended::TimedOut { after_secs: 30 }, REF, true);
        assert!(c.detail.contains("within 30s"), "{c:?}");
    }

    #[test]
    fn anything_else_is_quoted_not_guessed() {
        let e = lines("something new went wrong\n");
        let c = resolve(failed(&e), REF, true);
        assert_eq!(
            c.detail,
            format!("fh resolve {REF} failed (exit code 1) (fh said: something new went wrong)")
        );
        let c = resolve(failed(&[]), REF, true);
        assert_eq!(c.detail, format!("fh resolve {REF} failed (exit code 1)"));
        let c = login(failed(&lines("it broke")), None);
        assert!(
            c.detail.contains("(determinate-nixd said: it broke)"),
            "{c:?}"
        );
        assert!(c.fix.contains("determinate-nixd login aws"), "{c:?}");
    }

    #[test]
    fn login_causes() {
        let p = "arn:aws:iam::123456789012:assumed-role/web/i-*";
        let c = login(
            failed(&lines("error: FlakeHub returned 401 Unauthorized")),
            Some(p),
        );
        assert!(
            c.detail.starts_with("FlakeHub refused the instance role"),
            "{c:?}"
        );
        assert!(
            c.fix.starts_with(&format!("register {p} under ARNs")),
            "{c:?}"
        );
        let c = login(failed(&lines("error: no AWS credentials found")), Some(p));
        assert!(c.fix.contains("instance profile"), "{c:?}");
        let c = login(
            failed(&lines(
                "error: connecting to /nix/var/determinate/determinate-nixd.socket",
            )),
            Some(p),
        );
        assert!(c.fix.contains("systemctl status determinate-nixd"), "{c:?}");
        let c = login(Ended::TimedOut { after_secs: 30 }, Some(p));
        assert!(c.fix.contains("security group"), "{c:?}");
    }

    #[test]
    fn shown_text_is_escaped_and_bounded() {
        let e = lines(&format!("\x1b[31m{}", "x".repeat(2000)));
        let c = resolve(failed(&e), REF, true);
        assert!(!c.detail.contains('\x1b'), "{c:?}");
        assert!(c.detail.len() < 600, "{}", c.detail.len());
    }

    #[test]
    fn aws_network_fix() {
        assert!(network_fix("connection failed: tcp connect error").is_some());
        assert!(
            network_fix("timed out")
                .unwrap()
                .contains("com.amazonaws.REGION.sts")
        );
        assert!(network_fix("AccessDenied (HTTP 403): no").is_none());
    }
}
