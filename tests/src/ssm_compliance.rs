//! The SSM double's Compliance and instance-information operations (moto
//! 5.2 has none of them): `PutComplianceItems`, `ListComplianceItems`,
//! `ListResourceComplianceSummaries`, `DescribeInstanceInformation`.
//!
//! As strict as the service's API reference: required members, lengths,
//! enums, the compliance-type pattern, at most 20 details per item, page
//! sizes (1–50; 5–50 for instance information), and compliance only on
//! registered managed instances (`InvalidResourceId`). Unsigned requests
//! are refused before any operation (`ssm::handle`).

// A test double: its errors are HTTP replies, built once per request.
#![allow(clippy::result_large_err)]

use crate::ssm::{Compliance, Request, Ssm, error, json};
use axum::response::Response;
use serde_json::{Value, json as j};

/// The agent's key of a parameter in its execution IDs (the first 4
/// bytes of the SHA-256 of the name without its leading `/` or its
/// `:selector`, in hex), computed here on its own.
pub fn parameter_key(name: &str) -> String {
    use sha2::Digest as _;
    let bare = name.trim_start_matches('/');
    let bare = bare.split_once(':').map_or(bare, |(n, _)| n);
    sha2::Sha256::digest(bare.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const SEVERITIES: &[&str] = &[
    "CRITICAL",
    "HIGH",
    "MEDIUM",
    "LOW",
    "INFORMATIONAL",
    "UNSPECIFIED",
];

fn invalid(message: impl Into<String>) -> Response {
    error(400, "ValidationException", &message.into())
}

fn string<'a>(v: &'a Value, key: &str, min: usize, max: usize) -> Result<&'a str, Response> {
    match v.get(key) {
        Some(Value::String(s)) if (min..=max).contains(&s.chars().count()) => Ok(s),
        Some(Value::String(_)) => Err(invalid(format!(
            "Value at '{key}' failed to satisfy constraint: Member must have length between {min} and {max}"
        ))),
        Some(_) => Err(invalid(format!("'{key}' must be a string"))),
        None => Err(invalid(format!("'{key}' is required"))),
    }
}

fn optional<'a>(v: &'a Value, key: &str, max: usize) -> Result<Option<&'a str>, Response> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => string(v, key, 0, max).map(Some),
    }
}

fn page_size(body: &Value, min: u64, max: u64) -> Result<usize, Response> {
    match body.get("MaxResults") {
        None => Ok(max as usize),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| (min..=max).contains(&n)) => {
            Ok(n.as_u64().unwrap() as usize)
        }
        Some(_) => Err(invalid(format!(
            "Value at 'maxResults' failed to satisfy constraint: Member must have value between {min} and {max}"
        ))),
    }
}

/// `NextToken` is the index to start from, as text the client treats as
/// opaque.
fn start(body: &Value) -> Result<usize, Response> {
    match body.get("NextToken") {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(t)) => t
            .strip_prefix("page-")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| error(400, "InvalidNextToken", "The specified token isn't valid.")),
        Some(_) => Err(invalid("NextToken must be a string")),
    }
}

/// One page of `all` as the reply `{KEY: [...], "NextToken": ...}`.
fn page<T: serde::Serialize>(key: &str, all: &[T], from: usize, size: usize) -> Response {
    let end = (from + size).min(all.len());
    let mut out = j!({ key: all.get(from..end).unwrap_or_default() });
    if end < all.len() {
        out["NextToken"] = j!(format!("page-{end}"));
    }
    json(200, out)
}

pub fn answer(s: &mut Ssm, op: &str, r: &Request) -> Response {
    let result = match op {
        "PutComplianceItems" => put(s, &r.body),
        "ListResourceComplianceSummaries" => summaries(s, &r.body),
        "ListComplianceItems" => items(s, &r.body),
        "DescribeInstanceInformation" => instances(s, &r.body),
        _ => Err(error(
            400,
            "UnknownOperationException",
            &format!("{op} is not doubled"),
        )),
    };
    result.unwrap_or_else(|e| e)
}

fn is_compliance_type(t: &str) -> bool {
    // `[A-Za-z0-9_\-]\w+|Custom:[a-zA-Z0-9_\-]\w+`
    let word = |s: &str| {
        let mut c = s.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphanumeric() || f == '_' || f == '-')
            && s.len() >= 2
            && c.all(|c| c.is_alphanumeric() || c == '_')
    };
    match t.strip_prefix("Custom:") {
        Some(rest) => word(rest),
        None => word(t),
    }
}

fn put(s: &mut Ssm, body: &Value) -> Result<Response, Response> {
    let resource_id = string(body, "ResourceId", 1, 100)?.to_owned();
    let resource_type = string(body, "ResourceType", 1, 50)?.to_owned();
    let compliance_type = string(body, "ComplianceType", 1, 100)?.to_owned();
    if !is_compliance_type(&compliance_type) {
        return Err(invalid(format!(
            "Value '{compliance_type}' at 'complianceType' failed to satisfy constraint: Member must satisfy regular expression pattern: [A-Za-z0-9_\\-]\\w+|Custom:[a-zA-Z0-9_\\-]\\w+"
        )));
    }
    let summary = body
        .get("ExecutionSummary")
        .filter(|v| v.is_object())
        .ok_or_else(|| invalid("'ExecutionSummary' is required"))?;
    if !summary.get("ExecutionTime").is_some_and(Value::is_number) {
        return Err(invalid("'ExecutionSummary.ExecutionTime' is required"));
    }
    optional(summary, "ExecutionId", 100)?;
    optional(summary, "ExecutionType", 50)?;
    let items = body
        .get("Items")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("'Items' is required"))?;
    if items.len() > 10_000 {
        return Err(invalid("'Items' has more than 10000 members"));
    }
    for item in items {
        optional(item, "Id", 100)?;
        optional(item, "Title", 500)?;
        let severity = string(item, "Severity", 1, 20)?;
        if !SEVERITIES.contains(&severity) {
            return Err(invalid(format!(
                "Severity {severity} is not one of {SEVERITIES:?}"
            )));
        }
        let status = string(item, "Status", 1, 20)?;
        if !matches!(status, "COMPLIANT" | "NON_COMPLIANT") {
            return Err(invalid(format!(
                "Status {status} is not COMPLIANT or NON_COMPLIANT"
            )));
        }
        if let Some(details) = item.get("Details") {
            let details = details
                .as_object()
                .ok_or_else(|| invalid("'Details' must be a map"))?;
            if details.len() > 20 {
                return Err(invalid("'Details' has more than 20 entries"));
            }
            for (k, v) in details {
                let len = v.as_str().map(|v| v.chars().count());
                if !(1..=64).contains(&k.chars().count()) || len.is_none_or(|l| l > 4096) {
                    return Err(invalid(format!("Details entry {k} is out of bounds")));
                }
            }
        }
    }
    match body.get("UploadType").and_then(Value::as_str) {
        None | Some("COMPLETE") => {}
        Some("PARTIAL") => {
            return Err(invalid(
                "PARTIAL upload is valid only for association compliance",
            ));
        }
        Some(other) => return Err(invalid(format!("UploadType {other} is not valid"))),
    }
    if resource_type == "ManagedInstance" && !s.instances.iter().any(|i| i.id == resource_id) {
        return Err(error(
            400,
            "InvalidResourceId",
            "The resource ID isn't valid. Verify that you entered the correct ID and try again.",
        ));
    }
    s.compliance.insert(
        (resource_id.clone(), compliance_type.clone()),
        Compliance {
            resource_id,
            resource_type,
            compliance_type,
            execution: summary.clone(),
            items: items.clone(),
        },
    );
    Ok(json(200, j!({})))
}

/// `Filters` as (key, values); only EQUAL, on the keys this double knows.
fn filters(body: &Value, known: &[&str]) -> Result<Vec<(String, Vec<String>)>, Response> {
    let mut out = vec![];
    for f in body
        .get("Filters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = string(f, "Key", 1, 200)?.to_owned();
        if !known.contains(&key.as_str()) {
            return Err(invalid(format!(
                "filter key {key} is not supported by this double"
            )));
        }
        if f.get("Type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "EQUAL")
        {
            return Err(invalid("only EQUAL filters are doubled"));
        }
        let values = f
            .get("Values")
            .and_then(Value::as_array)
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        out.push((key, values));
    }
    Ok(out)
}

fn status_of(c: &Compliance) -> &'static str {
    if c.items.iter().any(|i| i["Status"] == "NON_COMPLIANT") {
        "NON_COMPLIANT"
    } else {
        "COMPLIANT"
    }
}

fn summaries(s: &Ssm, body: &Value) -> Result<Response, Response> {
    let size = page_size(body, 1, 50)?;
    let from = start(body)?;
    let filters = filters(body, &["ComplianceType", "Status"])?;
    let matching: Vec<&Compliance> = s
        .compliance
        .values()
        .filter(|c| {
            filters.iter().all(|(k, v)| match k.as_str() {
                "ComplianceType" => v.contains(&c.compliance_type),
                _ => v.iter().any(|x| x == status_of(c)),
            })
        })
        .collect();
    let items: Vec<Value> = matching
        .iter()
        .map(|c| {
            let count = |status: &str| {
                let mut sev = j!({"CriticalCount": 0, "HighCount": 0, "MediumCount": 0,
                    "LowCount": 0, "InformationalCount": 0, "UnspecifiedCount": 0});
                let mut n = 0;
                for i in c.items.iter().filter(|i| i["Status"] == status) {
                    n += 1;
                    let key = match i["Severity"].as_str().unwrap_or_default() {
                        "CRITICAL" => "CriticalCount",
                        "HIGH" => "HighCount",
                        "MEDIUM" => "MediumCount",
                        "LOW" => "LowCount",
                        "INFORMATIONAL" => "InformationalCount",
                        _ => "UnspecifiedCount",
                    };
                    sev[key] = j!(sev[key].as_u64().unwrap() + 1);
                }
                (n, sev)
            };
            let (ok, ok_sev) = count("COMPLIANT");
            let (bad, bad_sev) = count("NON_COMPLIANT");
            let overall = c
                .items
                .iter()
                .filter_map(|i| i["Severity"].as_str())
                .min_by_key(|sev| SEVERITIES.iter().position(|x| x == sev))
                .unwrap_or("UNSPECIFIED");
            j!({
                "ComplianceType": c.compliance_type,
                "ResourceType": c.resource_type,
                "ResourceId": c.resource_id,
                "Status": status_of(c),
                "OverallSeverity": overall,
                "ExecutionSummary": c.execution,
                "CompliantSummary": {"CompliantCount": ok, "SeveritySummary": ok_sev},
                "NonCompliantSummary": {"NonCompliantCount": bad, "SeveritySummary": bad_sev},
            })
        })
        .collect();
    Ok(page("ResourceComplianceSummaryItems", &items, from, size))
}

fn items(s: &Ssm, body: &Value) -> Result<Response, Response> {
    let size = page_size(body, 1, 50)?;
    let from = start(body)?;
    let ids: Vec<&str> = body
        .get("ResourceIds")
        .and_then(Value::as_array)
        .map(|v| v.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if ids.is_empty() {
        return Err(invalid("'ResourceIds' must have at least 1 member"));
    }
    let filters = filters(body, &["ComplianceType"])?;
    let mut all = vec![];
    for c in s.compliance.values().filter(|c| {
        ids.contains(&c.resource_id.as_str())
            && filters.iter().all(|(_, v)| v.contains(&c.compliance_type))
    }) {
        for i in &c.items {
            let mut item = i.clone();
            item["ComplianceType"] = j!(c.compliance_type);
            item["ResourceType"] = j!(c.resource_type);
            item["ResourceId"] = j!(c.resource_id);
            item["ExecutionSummary"] = c.execution.clone();
            all.push(item);
        }
    }
    Ok(page("ComplianceItems", &all, from, size))
}

fn instances(s: &Ssm, body: &Value) -> Result<Response, Response> {
    let size = page_size(body, 5, 50)?;
    let from = start(body)?;
    let mut tag_filters = vec![];
    for f in body
        .get("Filters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = string(f, "Key", 1, 200)?;
        let Some(tag) = key.strip_prefix("tag:") else {
            return Err(invalid(format!(
                "filter key {key} is not supported by this double"
            )));
        };
        let values: Vec<String> = f
            .get("Values")
            .and_then(Value::as_array)
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if values.is_empty() {
            return Err(invalid("a filter needs at least one value"));
        }
        tag_filters.push((tag.to_owned(), values));
    }
    let matching: Vec<Value> = s
        .instances
        .iter()
        .filter(|i| {
            tag_filters
                .iter()
                .all(|(k, vs)| i.tags.iter().any(|(tk, tv)| tk == k && vs.contains(tv)))
        })
        .map(|i| j!({"InstanceId": i.id, "PingStatus": "Online", "PlatformType": "Linux", "ResourceType": "EC2Instance"}))
        .collect();
    Ok(page("InstanceInformationList", &matching, from, size))
}
