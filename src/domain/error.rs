//! Why the domain refuses a request. Each variant maps to one gRPC status code at the API edge
//! (see `api::status`); a deny is not an error but a normal [`Decision`](super::Decision).

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

impl DomainError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        DomainError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
