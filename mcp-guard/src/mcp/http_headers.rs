//! `Mcp-Method` and `Mcp-Name` (revision 2026-07-28): headers that must agree with the
//! body they describe; an intermediary refuses a request where they do not.

use hyper::{
    header::{HeaderMap, CONTENT_TYPE},
    Response, StatusCode,
};
use serde_json::Value;

use super::http_proxy::{full, Body};

/// `Mcp-Method` and `Mcp-Name` (revision 2026-07-28) against the body they describe.
pub(super) fn headers_agree(headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
    let header = |n: &str| {
        headers
            .get(n)
            .map(|v| v.to_str().unwrap_or("\u{fffd}").to_string())
    };
    let (method, name) = (header("mcp-method"), header("mcp-name"));
    if method.is_none() && name.is_none() {
        return Ok(());
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|_| "the body is not one JSON-RPC message".to_string())?;
    if let Some(m) = method {
        if v["method"].as_str() != Some(m.as_str()) {
            return Err(format!(
                "Mcp-Method {m:?} disagrees with the body's method {}",
                v["method"]
            ));
        }
    }
    if let Some(n) = name {
        let p = &v["params"];
        let body_name = p["name"].as_str().or_else(|| p["uri"].as_str());
        if body_name != Some(n.as_str()) {
            return Err(format!(
                "Mcp-Name {n:?} disagrees with the body's {}",
                if p["name"].is_null() {
                    p["uri"].clone()
                } else {
                    p["name"].clone()
                }
            ));
        }
    }
    Ok(())
}

/// 400 with a JSON-RPC error naming the disagreement (the request's id where it has one).
pub(super) fn mismatch(body: &[u8], why: &str) -> Response<Body> {
    let id = serde_json::from_slice::<Value>(body)
        .ok()
        .map_or(Value::Null, |v| v["id"].clone());
    let err = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": -32600, "message": format!("mcp-guard: {why}")},
    });
    let mut r = Response::new(full(err.to_string()));
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_must_agree_with_the_body() {
        let body = br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"fetch","arguments":{}}}"#;
        let mut h = HeaderMap::new();
        assert!(
            headers_agree(&h, body).is_ok(),
            "no headers: nothing to check"
        );
        h.insert("mcp-method", "tools/call".parse().unwrap());
        h.insert("mcp-name", "fetch".parse().unwrap());
        assert!(headers_agree(&h, body).is_ok());
        h.insert("mcp-name", "query_db".parse().unwrap());
        let e = headers_agree(&h, body).unwrap_err();
        assert!(e.contains("query_db") && e.contains("fetch"), "{e}");
        h.remove("mcp-name");
        h.insert("mcp-method", "tools/list".parse().unwrap());
        assert!(headers_agree(&h, body).is_err());
        let r = mismatch(body, "x");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
}
