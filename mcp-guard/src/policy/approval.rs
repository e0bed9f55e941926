//! Grants of allow rules that wait for approval, carried as learned entries.

use super::Learned;

/// The `source` of a [`Learned`] entry that is an approved grant of a rule that waits
/// for approval (its `name` is `approval:<the rule's line>`).
pub const APPROVAL_SOURCE: &str = "approval";

/// Whether `l` is a grant for the approval rule `a`.
#[must_use]
pub fn granted_by(a: &crate::config::AllowRule, l: &Learned) -> bool {
    a.approval.is_some()
        && l.source == APPROVAL_SOURCE
        && l.name
            .strip_prefix("approval:")
            .and_then(|n| n.parse::<usize>().ok())
            == Some(a.loc.line)
        && a.net.contains(&l.addr.to_canonical())
}
