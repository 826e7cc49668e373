//! Why the domain refuses a request. Each variant maps to one gRPC status code at the API edge
//! (see `api::status`); a deny is not an error but a normal [`Decision`](super::Decision).

use super::account::MAX_EXACT_MICROS;
use super::time::Timestamp;

/// An error of the quota rules, with a message a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The request itself is wrong; `field` names the request field.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    /// The request is well-formed but the state does not allow it (e.g. an expired reservation).
    #[error("{0}")]
    FailedPrecondition(String),
    /// An idempotency key was reused with a different request.
    #[error("{0}")]
    AlreadyExists(String),
}

// The wording of each refusal lives here, once, so that every store refuses in the same words.
impl DomainError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        DomainError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn account_not_found(id: &str) -> Self {
        DomainError::NotFound {
            what: "account",
            id: id.to_owned(),
        }
    }

    /// Whether this says the account does not exist.
    pub fn is_account_not_found(&self) -> bool {
        matches!(
            self,
            DomainError::NotFound {
                what: "account",
                ..
            }
        )
    }

    pub fn reservation_not_found(id: &str) -> Self {
        DomainError::NotFound {
            what: "reservation",
            id: id.to_owned(),
        }
    }

    pub fn top_up_not_allowed(account: &str, plan: &str) -> Self {
        DomainError::FailedPrecondition(format!(
            "account {account:?} cannot have credits bought for it (plan {plan:?}, or credit purchase barred); auto top-up can only be turned off"
        ))
    }

    pub fn grant_not_found(id: &str) -> Self {
        DomainError::NotFound {
            what: "grant",
            id: id.to_owned(),
        }
    }

    pub fn request_reused(request_id: &str) -> Self {
        DomainError::AlreadyExists(format!(
            "request_id {request_id:?} was already used for a different Reserve on this account"
        ))
    }

    pub fn grant_reused(grant_id: &str) -> Self {
        DomainError::AlreadyExists(format!(
            "grant_id {grant_id:?} was already used for a different grant on this account"
        ))
    }

    /// A commit (`by_commit`) or release on a reservation that a final commit already ended.
    pub fn already_committed(id: &str, by_commit: bool) -> Self {
        let what = if by_commit {
            " and different usage"
        } else {
            ""
        };
        DomainError::AlreadyExists(format!(
            "reservation {id:?} was already committed with final = true{what}"
        ))
    }

    pub fn already_released(id: &str) -> Self {
        DomainError::AlreadyExists(format!("reservation {id:?} was already released"))
    }

    pub fn reservation_expired(id: &str, at: Timestamp) -> Self {
        DomainError::FailedPrecondition(format!(
            "reservation {id:?} expired at {at} and its hold was returned; reserve again"
        ))
    }

    pub fn plan_not_configured(account: &str, plan: &str, configured: &str) -> Self {
        DomainError::FailedPrecondition(format!(
            "account {account:?} is on plan {plan:?}, which is not configured; configured plans: {configured}"
        ))
    }

    pub fn lifetime_grants_too_large() -> Self {
        DomainError::invalid(
            "amount_micros",
            format!(
                "the account's credits granted in all would exceed {MAX_EXACT_MICROS} micro-credits"
            ),
        )
    }

    pub fn expiry_not_in_future(now: Timestamp, expires_at: Timestamp) -> Self {
        DomainError::invalid(
            "expires_at",
            format!("must be after now ({now}), got {expires_at}"),
        )
    }
}
