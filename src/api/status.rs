//! The one place where errors become gRPC statuses. A deny is not here: it is a normal
//! response with `decision = DENY`.

use tonic::Status;

use crate::domain::DomainError;
use crate::store::StoreError;

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Status {
        match err {
            StoreError::Rule(rule) => rule.into(),
            StoreError::Unavailable(_) => Status::unavailable(err.to_string()),
            StoreError::Internal(_) => Status::internal(err.to_string()),
        }
    }
}

impl From<DomainError> for Status {
    fn from(err: DomainError) -> Status {
        let message = err.to_string();
        match err {
            DomainError::InvalidArgument { .. } => Status::invalid_argument(message),
            DomainError::NotFound { .. } => Status::not_found(message),
            DomainError::FailedPrecondition(_) => Status::failed_precondition(message),
            DomainError::AlreadyExists(_) => Status::already_exists(message),
        }
    }
}
