//! Reading MCP stdio messages (newline-delimited JSON-RPC 2.0) for what the relay must
//! know, never changing them: requests `initialize` and `tools/call`, the notification
//! `notifications/cancelled`, and responses. Batches (JSON arrays, allowed by the
//! 2025-03-26 revision) are read element by element.

use serde_json::Value;

use super::wire::Peer;

/// The longest argument summary an event carries.
pub const MAX_SUMMARY: usize = 256;

/// What one message is, as far as the relay cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `initialize` from the client.
    Initialize { id: String, client: Option<Peer> },
    /// `tools/call` from the client.
    Call {
        id: String,
        tool: String,
        arguments: String,
        /// Destinations the arguments name (for the relay's argument check).
        targets: Vec<String>,
    },
    /// `notifications/cancelled` for a request id.
    Cancelled { id: String },
    /// `tools/list` from the client.
    ListTools { id: String },
    /// Another request or notification.
    Other,
    /// A response (result or error) to request `id`.
    Response {
        id: String,
        error: bool,
        result: Option<Value>,
    },
}

/// Reads one line (without its newline). `None`: not JSON-RPC at all (malformed).
#[must_use]
pub fn read(line: &[u8]) -> Option<Vec<Message>> {
    let v: Value = serde_json::from_slice(line).ok()?;
    read_value(&v)
}

/// [`read`] of a message already parsed.
#[must_use]
pub fn read_value(v: &Value) -> Option<Vec<Message>> {
    match v {
        Value::Array(items) if !items.is_empty() => items.iter().map(one).collect(),
        Value::Object(_) => one(v).map(|m| vec![m]),
        _ => None,
    }
}

/// A request id as text: `7` or `"abc"` (JSON), so both kinds stay distinct.
#[must_use]
pub fn id_text(id: &Value) -> String {
    id.to_string()
}

fn one(v: &Value) -> Option<Message> {
    let o = v.as_object()?;
    if o.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return None;
    }
    let id = o.get("id").filter(|i| i.is_string() || i.is_number());
    let Some(method) = o.get("method").and_then(Value::as_str) else {
        // A response: it must carry an id and a result or an error.
        let id = id?;
        let error = o.contains_key("error");
        if !error && !o.contains_key("result") {
            return None;
        }
        return Some(Message::Response {
            id: id_text(id),
            error,
            result: o.get("result").cloned(),
        });
    };
    let params = o.get("params");
    Some(match (method, id) {
        ("initialize", Some(id)) => Message::Initialize {
            id: id_text(id),
            client: params.and_then(|p| p.get("clientInfo")).and_then(peer),
        },
        ("tools/call", Some(id)) => {
            let p = params.and_then(Value::as_object);
            Message::Call {
                id: id_text(id),
                tool: p
                    .and_then(|p| p.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .chars()
                    .take(128)
                    .collect(),
                arguments: p
                    .and_then(|p| p.get("arguments"))
                    .map_or_else(String::new, summary),
                targets: p
                    .and_then(|p| p.get("arguments"))
                    .map_or_else(Vec::new, super::gate::targets),
            }
        }
        ("tools/list", Some(id)) => Message::ListTools { id: id_text(id) },
        ("notifications/cancelled", None) => match params.and_then(|p| p.get("requestId")) {
            Some(r) if r.is_string() || r.is_number() => Message::Cancelled { id: id_text(r) },
            _ => Message::Other,
        },
        _ => Message::Other,
    })
}

/// `name` and `version` of a `clientInfo` or `serverInfo` object.
#[must_use]
pub fn peer(v: &Value) -> Option<Peer> {
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .map(|s| s.chars().take(128).collect::<String>())
    };
    Some(Peer {
        name: s("name")?,
        version: s("version").unwrap_or_default(),
    })
}

/// Tool names of a `tools/list` result (at most 1,024, each at most 128 characters).
#[must_use]
pub fn tool_names(result: &Value) -> Option<Vec<String>> {
    let tools = result.get("tools")?.as_array()?;
    Some(
        tools
            .iter()
            .filter_map(|t| t.get("name")?.as_str())
            .take(1024)
            .map(|n| n.chars().take(128).collect())
            .collect(),
    )
}

/// Keys whose values are never shown.
fn secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    [
        "token",
        "secret",
        "password",
        "passwd",
        "key",
        "auth",
        "credential",
        "cookie",
        "session",
        "signature",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// A URL shown as its scheme and host (and port): no user, password, path or query,
/// where secrets travel.
fn url_host(s: &str) -> Option<String> {
    let (scheme, host) = url_parts(s)?;
    Some(format!("{scheme}://{host}"))
}

/// A URL's scheme and `host[:port]` (user and password, path, query and fragment left
/// out). `None`: not `scheme://...`.
pub(super) fn url_parts(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    Some((
        scheme,
        authority.rsplit_once('@').map_or(authority, |(_, h)| h),
    ))
}

fn value_text(k: &str, v: &Value) -> String {
    if secret_key(k) {
        return "[redacted]".into();
    }
    match v {
        Value::String(s) => url_host(s).unwrap_or_else(|| format!("<{} chars>", s.chars().count())),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        Value::Array(a) => format!("[{} items]", a.len()),
        Value::Object(o) => format!("{{{} keys}}", o.len()),
    }
}

/// A bounded summary of a call's arguments with secrets kept out: URLs as their host,
/// other strings as their length, keys that name secrets redacted, nested values as
/// their size. At most [`MAX_SUMMARY`] characters.
#[must_use]
pub fn summary(args: &Value) -> String {
    let text = match args {
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| {
                let k: String = k.chars().take(32).collect();
                format!("{k}={}", value_text(&k, v))
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => value_text("", other),
    };
    if text.chars().count() > MAX_SUMMARY {
        let mut t: String = text.chars().take(MAX_SUMMARY - 1).collect();
        t.push('…');
        t
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_calls_cancellations_and_responses() {
        let m = read(br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"fetch","arguments":{"url":"http://user:pw@169.254.169.254/latest/meta-data/?x=1","max_length":5000,"api_key":"sk-123","raw":true}}}"#).unwrap();
        assert_eq!(
            m,
            [Message::Call {
                id: "7".into(),
                tool: "fetch".into(),
                arguments: "api_key=[redacted] max_length=5000 raw=true url=http://169.254.169.254"
                    .into(),
                targets: vec!["169.254.169.254:80".into()],
            }]
        );
        let m = read(
            br#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"a"}}"#,
        )
        .unwrap();
        assert_eq!(m, [Message::Cancelled { id: "\"a\"".into() }]);
        let m = read(br#"{"jsonrpc":"2.0","id":"a","error":{"code":-1,"message":"x"}}"#).unwrap();
        assert!(matches!(&m[0], Message::Response { id, error: true, .. } if id == "\"a\""));
        let m = read(br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"clientInfo":{"name":"c","version":"1"}}}"#).unwrap();
        assert_eq!(
            m,
            [Message::Initialize {
                id: "1".into(),
                client: Some(Peer {
                    name: "c".into(),
                    version: "1".into()
                })
            }]
        );
    }

    #[test]
    fn malformed_lines_are_none() {
        for l in [
            &b"not json"[..],
            b"{}",
            b"[]",
            b"42",
            br#"{"jsonrpc":"1.0","id":1,"method":"x"}"#,
            br#"{"jsonrpc":"2.0","id":1}"#,
        ] {
            assert_eq!(read(l), None, "{}", String::from_utf8_lossy(l));
        }
    }

    #[test]
    fn summaries_are_bounded_and_hide_text() {
        let long = serde_json::json!({ "q": "x".repeat(10_000), "a": "select * from users where password='hunter2'" });
        let s = summary(&long);
        assert!(!s.contains("hunter2"));
        assert!(s.chars().count() <= MAX_SUMMARY);
        let many: serde_json::Map<String, Value> = (0..500)
            .map(|i| (format!("k{i}"), Value::from(i)))
            .collect();
        assert_eq!(summary(&Value::Object(many)).chars().count(), MAX_SUMMARY);
    }
}
