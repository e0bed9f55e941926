//! Credentials the relay recognises in JSON strings (`mask = "report" | "secrets"`).
//!
//! One documented list of formats, each with a test: every one has a fixed prefix or
//! marker, so ordinary text (hashes, UUIDs, base64 blobs) is not taken for a secret.
//! A match is replaced by `[REDACTED:<kind>]` inside the string it was found in; the
//! JSON around it is left as it was, so the message stays valid JSON-RPC.

use std::{collections::BTreeMap, sync::LazyLock};

use regex::{Regex, RegexSet};

/// `(kind, pattern)`: where a pattern has a capture group, only the group is replaced
/// (the key in front of an AWS secret stays readable).
pub const FORMATS: &[(&str, &str)] = &[
    // AWS access key ids: long-term (AKIA) and temporary (ASIA) credentials.
    (
        "aws-access-key-id",
        r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b",
    ),
    // AWS secret access keys: 40 characters of base64 after a key that names them (the
    // metadata service's `"SecretAccessKey" : "..."`, a credentials file's
    // `aws_secret_access_key = ...`).
    (
        "aws-secret-access-key",
        r#"(?i)(?:aws_?secret_?access_?key|secret_?access_?key)\\?["']?\s*[:=]\s*\\?["']?([A-Za-z0-9/+]{40})\b"#,
    ),
    // AWS session tokens after their key (`"Token" : "..."` is too generic to take).
    (
        "aws-session-token",
        r#"(?i)(?:aws_?session_?token|sessiontoken)\\?["']?\s*[:=]\s*\\?["']?([A-Za-z0-9/+=]{100,})"#,
    ),
    // GitHub tokens: personal (ghp_), OAuth (gho_), user-to-server (ghu_), server-to-
    // server (ghs_), refresh (ghr_), fine-grained personal (github_pat_).
    (
        "github-token",
        r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b",
    ),
    // Slack tokens: bot, user, app-level, configuration, refresh.
    ("slack-token", r"\bxox[abposer]-[A-Za-z0-9-]{10,250}\b"),
    // Slack incoming webhooks (whoever has the URL posts to the channel).
    (
        "slack-webhook",
        r"https://hooks\.slack\.com/services/[A-Za-z0-9_/]{20,}",
    ),
    // Google API keys.
    ("google-api-key", r"\bAIza[0-9A-Za-z_-]{35}\b"),
    // Stripe live secret and restricted keys.
    ("stripe-key", r"\b(?:sk|rk)_live_[0-9A-Za-z]{20,}\b"),
    // PEM private keys (RSA, EC, OpenSSH, PKCS#8, encrypted): the whole block.
    (
        "private-key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----",
    ),
    // JSON Web Tokens: a base64url header and payload that both start with `{"`, and a
    // signature.
    (
        "jwt",
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    ),
];

struct Compiled {
    set: RegexSet,
    each: Vec<Regex>,
}

static COMPILED: LazyLock<Compiled> = LazyLock::new(|| Compiled {
    set: RegexSet::new(FORMATS.iter().map(|(_, p)| p)).expect("valid patterns"),
    each: FORMATS
        .iter()
        .map(|(_, p)| Regex::new(p).expect("valid pattern"))
        .collect(),
});

/// Credentials found, by kind.
pub type Found = BTreeMap<String, u32>;

/// Looks for credentials in `text`. With `replace`, returns the text with each one
/// replaced by `[REDACTED:<kind>]` (`None`: nothing found, or not replacing).
pub fn scan(text: &str, replace: bool, found: &mut Found) -> Option<String> {
    let c = &*COMPILED;
    let hits = c.set.matches(text);
    if !hits.matched_any() {
        return None;
    }
    let mut out = std::borrow::Cow::Borrowed(text);
    for i in hits.iter() {
        let kind = FORMATS[i].0;
        let re = &c.each[i];
        let mut n = 0u32;
        let mut next = String::with_capacity(out.len());
        let mut last = 0;
        for caps in re.captures_iter(&out) {
            let m = caps.get(1).or_else(|| caps.get(0)).expect("a match");
            n += 1;
            next.push_str(&out[last..m.start()]);
            next.push_str(&format!("[REDACTED:{kind}]"));
            last = m.end();
        }
        if n > 0 {
            *found.entry(kind.to_string()).or_default() += n;
            if replace {
                next.push_str(&out[last..]);
                out = std::borrow::Cow::Owned(next);
            }
        }
    }
    match out {
        std::borrow::Cow::Owned(s) if replace => Some(s),
        _ => None,
    }
}

/// Walks every string of a JSON value (object keys are left alone); with `replace`,
/// rewrites those holding credentials. Returns whether anything changed.
pub fn mask_value(v: &mut serde_json::Value, replace: bool, found: &mut Found) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => match scan(s, replace, found) {
            Some(masked) => {
                *s = masked;
                true
            }
            None => false,
        },
        Value::Array(a) => a
            .iter_mut()
            .fold(false, |ch, x| mask_value(x, replace, found) | ch),
        Value::Object(o) => o
            .values_mut()
            .fold(false, |ch, x| mask_value(x, replace, found) | ch),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(text: &str) -> (String, Found) {
        let mut f = Found::new();
        let out = scan(text, true, &mut f).unwrap_or_else(|| text.to_string());
        (out, f)
    }

    #[test]
    fn every_format_is_found_and_replaced() {
        // Fake credentials in each format (none of them valid anywhere).
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo\n-----END RSA PRIVATE KEY-----";
        let cases = [
            ("aws-access-key-id", "key AKIAIOSFODNN7EXAMPLE here".to_string()),
            ("aws-access-key-id", "\"AccessKeyId\" : \"ASIAXXXXXXXXXXXXXXXX\"".to_string()),
            (
                "aws-secret-access-key",
                "\"SecretAccessKey\" : \"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\"".to_string(),
            ),
            (
                "aws-secret-access-key",
                "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".to_string(),
            ),
            (
                "aws-session-token",
                format!("aws_session_token={}", "A".repeat(120)),
            ),
            ("github-token", format!("token ghp_{}", "a1B2".repeat(9))),
            ("github-token", format!("github_pat_{}", "x_1".repeat(20))),
            ("slack-token", "xoxb-123456789012-1234567890123-abcdefABCDEF".to_string()),
            (
                "slack-webhook",
                "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"
                    .to_string(),
            ),
            ("google-api-key", format!("AIza{}", "S".repeat(35))),
            ("stripe-key", format!("sk_live_{}", "4eC39HqLyjWDarjtT1zdp7dc")),
            ("private-key", format!("id_rsa:\n{pem}\n")),
            (
                "jwt",
                "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U".to_string(),
            ),
        ];
        for (kind, text) in cases {
            let (out, found) = masked(&text);
            assert_eq!(found.get(kind), Some(&1), "{kind}: {text:?} -> {found:?}");
            assert!(out.contains(&format!("[REDACTED:{kind}]")), "{kind}: {out}");
        }
        // The key in front of a secret access key stays readable.
        let (out, _) = masked("\"SecretAccessKey\" : \"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\"");
        assert_eq!(
            out,
            "\"SecretAccessKey\" : \"[REDACTED:aws-secret-access-key]\""
        );
    }

    #[test]
    fn ordinary_text_is_left_alone() {
        for text in [
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "550e8400-e29b-41d4-a716-446655440000",
            "the quick brown fox jumps over the lazy dog",
            "AKIA is how AWS access key ids start",
            "eyJ alone is not a token",
            "ghp_short",
        ] {
            let mut f = Found::new();
            assert_eq!(scan(text, true, &mut f), None, "{text}");
            assert!(f.is_empty(), "{text}: {f:?}");
        }
    }

    #[test]
    fn json_strings_are_masked_in_place_and_stay_json() {
        let mut v = serde_json::json!({"content": [{"type": "text", "text": "AccessKeyId: AKIAIOSFODNN7EXAMPLE"}], "n": 1});
        let mut f = Found::new();
        assert!(!mask_value(&mut v.clone(), false, &mut f));
        assert_eq!(f.get("aws-access-key-id"), Some(&1));
        let mut f = Found::new();
        assert!(mask_value(&mut v, true, &mut f));
        assert_eq!(
            v["content"][0]["text"],
            "AccessKeyId: [REDACTED:aws-access-key-id]"
        );
        assert_eq!(v["n"], 1);
    }
}
