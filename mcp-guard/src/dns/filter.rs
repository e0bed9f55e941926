//! What the DNS proxy may forward, decided before anything goes upstream: the client must
//! be a known workload, the question a single A, AAAA or CNAME question for a name the
//! workload's host rules cover (or any name with `resolve_any`), and the workload within
//! its query rate and in-flight budget. Everything else is answered REFUSED by the proxy
//! itself, so a guarded workload cannot carry data out in query names or types.

use std::{cell::RefCell, collections::HashMap, rc::Rc, time::Instant};

use hickory_resolver::proto::{
    op::{Message, MessageType, OpCode},
    rr::{DNSClass, RecordType},
};

use crate::config::normalise_name;

/// Why the proxy answered REFUSED (event `reason`, counter label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The asking socket belongs to no workload (or could not be told).
    Unattributed,
    /// No host rule of the workload covers the name (and it has no `resolve_any`).
    NameNotAllowed,
    /// A type other than A, AAAA, CNAME; a class other than IN; not a standard query.
    TypeNotAllowed,
    /// The workload sent more than `[dns] workload_queries_per_sec`.
    RateLimited,
    /// The workload has `[dns] workload_in_flight` queries waiting already.
    InFlightLimited,
    /// Not one well-formed question.
    Malformed,
}

impl Refusal {
    pub const ALL: [Self; 6] = [
        Self::Unattributed,
        Self::NameNotAllowed,
        Self::TypeNotAllowed,
        Self::RateLimited,
        Self::InFlightLimited,
        Self::Malformed,
    ];

    #[must_use]
    pub const fn reason(self) -> &'static str {
        match self {
            Self::Unattributed => "unattributed",
            Self::NameNotAllowed => "name-not-allowed",
            Self::TypeNotAllowed => "type-not-allowed",
            Self::RateLimited => "rate-limited",
            Self::InFlightLimited => "in-flight-limited",
            Self::Malformed => "malformed-query",
        }
    }
}

/// The one question of a query, as the filter judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Normalised (lower case, no trailing dot), at most 253 bytes (the DNS limit).
    pub name: String,
    pub qtype: RecordType,
}

/// Types a stub resolver needs to turn a name into addresses: A, AAAA, and CNAME (which
/// some resolvers ask for on its own while following a chain).
#[must_use]
pub fn type_allowed(t: RecordType) -> bool {
    matches!(t, RecordType::A | RecordType::AAAA | RecordType::CNAME)
}

/// Parses a query: exactly one question, opcode QUERY, a query (not a response).
///
/// # Errors
/// [`Refusal::Malformed`] for anything else, [`Refusal::TypeNotAllowed`] for another
/// opcode or class (the name is still returned for the event where known).
pub fn question(query: &[u8]) -> Result<Question, (Refusal, Option<Question>)> {
    let msg = Message::from_vec(query).map_err(|_| (Refusal::Malformed, None))?;
    if msg.metadata.message_type != MessageType::Query || msg.queries.len() != 1 {
        return Err((Refusal::Malformed, None));
    }
    let q = &msg.queries[0];
    let parsed = Question {
        name: normalise_name(&q.name().to_ascii()),
        qtype: q.query_type(),
    };
    if msg.metadata.op_code != OpCode::Query || q.query_class() != DNSClass::IN {
        return Err((Refusal::TypeNotAllowed, Some(parsed)));
    }
    Ok(parsed)
}

/// A REFUSED answer to `query`: its header and first question, nothing else.
#[must_use]
pub fn refused(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let q = super::proxy::question(query);
    let whole = q.len() >= 5 && q[q.len() - 5] == 0;
    let mut r = query[..12].to_vec();
    r[2] = (r[2] | 0x80) & !0x06; // QR; clear AA and TC, keep opcode and RD
    r[3] = (r[3] & 0x70) | 5; // RA off, Z/AD/CD kept, RCODE REFUSED
                              // One question if it could be delimited, else none; no other records.
    r[4..12].copy_from_slice(&[0, u8::from(whole), 0, 0, 0, 0, 0, 0]);
    if whole {
        r.extend_from_slice(q);
    }
    Some(r)
}

/// Per-workload budgets: a token bucket for the query rate, a count for in-flight queries.
#[derive(Default)]
pub struct Budgets {
    by_workload: HashMap<String, Budget>,
}

struct Budget {
    tokens: f64,
    at: Instant,
    in_flight: u32,
}

/// One in-flight query of a workload; the count goes down when it is dropped.
pub struct InFlight {
    budgets: Rc<RefCell<Budgets>>,
    workload: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut b = self.budgets.borrow_mut();
        if let Some(w) = b.by_workload.get_mut(&self.workload) {
            w.in_flight = w.in_flight.saturating_sub(1);
        }
    }
}

impl Budgets {
    /// Takes one query of `workload` out of its budgets, or says which one is spent.
    /// The bucket holds one second's worth of queries and refills continuously.
    ///
    /// # Errors
    /// [`Refusal::RateLimited`] or [`Refusal::InFlightLimited`].
    pub fn take(
        this: &Rc<RefCell<Self>>,
        workload: &str,
        per_sec: u32,
        in_flight: u32,
    ) -> Result<InFlight, Refusal> {
        Self::take_at(this, workload, per_sec, in_flight, Instant::now())
    }

    fn take_at(
        this: &Rc<RefCell<Self>>,
        workload: &str,
        per_sec: u32,
        in_flight: u32,
        now: Instant,
    ) -> Result<InFlight, Refusal> {
        let mut b = this.borrow_mut();
        if b.by_workload.len() > 65_536 {
            b.by_workload.retain(|_, w| w.in_flight > 0);
        }
        let rate = f64::from(per_sec);
        let w = b.by_workload.entry(workload.to_string()).or_insert(Budget {
            tokens: rate,
            at: now,
            in_flight: 0,
        });
        let elapsed = now.saturating_duration_since(w.at).as_secs_f64();
        w.tokens = (w.tokens + elapsed * rate).min(rate);
        w.at = now;
        if w.in_flight >= in_flight {
            return Err(Refusal::InFlightLimited);
        }
        if w.tokens < 1.0 {
            return Err(Refusal::RateLimited);
        }
        w.tokens -= 1.0;
        w.in_flight += 1;
        Ok(InFlight {
            budgets: this.clone(),
            workload: workload.to_string(),
        })
    }
}

/// Caps every answer record's TTL at `max_ttl`, so a client never caches an address
/// longer than the policy allows it (the policy allows it for the clamped TTL plus
/// grace). Returns the re-encoded answer, or `None` when nothing was above the cap.
#[must_use]
pub fn cap_ttls(msg: &mut Message, max_ttl: u32) -> Option<Vec<u8>> {
    let mut changed = false;
    for r in &mut msg.answers {
        if r.ttl > max_ttl {
            r.ttl = max_ttl;
            changed = true;
        }
    }
    if !changed {
        return None;
    }
    msg.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    #[test]
    fn questions_are_parsed_and_judged() {
        let q = question(&query("API.Example.test", 1)).unwrap();
        assert_eq!(q.name, "api.example.test");
        assert!(type_allowed(q.qtype));
        let q = question(&query("x.example.test", 16)).unwrap();
        assert_eq!(q.qtype, RecordType::TXT);
        assert!(!type_allowed(q.qtype));
        assert!(!type_allowed(RecordType::ANY));
        assert!(type_allowed(RecordType::CNAME));
        // Two questions, a response, garbage: malformed.
        let mut two = query("a.test", 1);
        two[5] = 2;
        assert_eq!(question(&two).unwrap_err().0, Refusal::Malformed);
        let mut resp = query("a.test", 1);
        resp[2] |= 0x80;
        assert_eq!(question(&resp).unwrap_err().0, Refusal::Malformed);
        assert_eq!(question(b"\x00\x01").unwrap_err().0, Refusal::Malformed);
        // Class CHAOS: not allowed.
        let mut chaos = query("version.bind", 16);
        let n = chaos.len();
        chaos[n - 1] = 3;
        assert_eq!(question(&chaos).unwrap_err().0, Refusal::TypeNotAllowed);
    }

    #[test]
    fn refused_answer_keeps_id_and_question_only() {
        let mut q = query("secret.attacker.test", 16);
        q.extend_from_slice(&[0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0]); // an OPT record
        q[11] = 1; // ARCOUNT 1
        let r = refused(&q).unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[2] & 0x80, 0x80, "QR");
        assert_eq!(r[3] & 0x0f, 5, "REFUSED");
        assert_eq!(&r[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.len(), query("secret.attacker.test", 16).len());
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(m.queries[0].name().to_ascii(), "secret.attacker.test.");
        assert!(refused(&q[..5]).is_none());
    }

    #[test]
    fn budgets_limit_rate_and_in_flight_per_workload() {
        let b = Rc::new(RefCell::new(Budgets::default()));
        let t0 = Instant::now();
        // 3 per second, at most 2 at once.
        let g1 = Budgets::take_at(&b, "w", 3, 2, t0).unwrap();
        let g2 = Budgets::take_at(&b, "w", 3, 2, t0).unwrap();
        assert_eq!(
            Budgets::take_at(&b, "w", 3, 2, t0).err(),
            Some(Refusal::InFlightLimited)
        );
        // Another workload is not affected.
        let _o = Budgets::take_at(&b, "other", 3, 2, t0).unwrap();
        drop((g1, g2));
        let _g3 = Budgets::take_at(&b, "w", 3, 2, t0).unwrap();
        drop(_g3);
        assert_eq!(
            Budgets::take_at(&b, "w", 3, 2, t0).err(),
            Some(Refusal::RateLimited)
        );
        // A third of a second later one token is back.
        let t1 = t0 + Duration::from_millis(340);
        assert!(Budgets::take_at(&b, "w", 3, 2, t1).is_ok());
        assert_eq!(
            Budgets::take_at(&b, "w", 3, 2, t1).err(),
            Some(Refusal::RateLimited)
        );
    }
}
