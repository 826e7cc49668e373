//! The one place where errors become gRPC statuses. A deny is not here: it is a normal
//! response with `decision = DENY`.

use tonic::Status;

use crate::app::QuotaError;
use crate::domain::DomainError;

impl From<QuotaError> for Status {
    fn from(err: QuotaError) -> Status {
        match err {
            QuotaError::Refused(rule) => rule.into(),
            QuotaError::StoreUnavailable(_) => Status::unavailable(err.to_string()),
            QuotaError::StoreFailed(_) => Status::internal(err.to_string()),
            QuotaError::Moved { ref address, .. } => {
                let mut status = Status::unavailable(err.to_string());
                if let Ok(value) = address.parse() {
                    status
                        .metadata_mut()
                        .insert(super::forward::OWNER_HEADER, value);
                }
                status
            }
        }
    }
}

/// `INVALID_ARGUMENT` about request field `field`: the message starts with the field's name, and
/// the `quotad-field` trailer names it alone, for clients (and the JSON door's `field`) to read.
pub fn invalid_argument(field: &str, reason: impl std::fmt::Display) -> Status {
    let mut status = Status::invalid_argument(format!("{field}: {reason}"));
    if let Ok(value) = field.parse() {
        status
            .metadata_mut()
            .insert(super::json::FIELD_HEADER, value);
    }
    status
}

impl From<DomainError> for Status {
    fn from(err: DomainError) -> Status {
        let message = err.to_string();
        match err {
            DomainError::InvalidArgument { field, reason } => invalid_argument(&field, reason),
            DomainError::NotFound { .. } => Status::not_found(message),
            DomainError::FailedPrecondition(_) => Status::failed_precondition(message),
            DomainError::AlreadyExists(_) => Status::already_exists(message),
        }
    }
}
