//! Bearer-token authentication, one token per service: the caller sends
//! `authorization: Bearer <token>` metadata. AdminService with no token configured refuses
//! every call, so a quotad started without one can never be administered by accident;
//! QuotaService with no token configured is open to whatever can reach its port (a sidecar on
//! localhost, or a mesh with mTLS and a NetworkPolicy in front). An account-scoped token
//! (`tokens`) stands in for either on the few methods it may call, for its own account.

use std::sync::Arc;

use tonic::{Request, Status, service::Interceptor};

#[derive(Debug, Clone)]
pub struct BearerAuth {
    token: Option<Arc<[u8]>>,
    /// Without a token: refuse everything (admin) or let everything through (quota).
    open_without_token: bool,
    service: &'static str,
}

impl BearerAuth {
    /// AdminService: a token is required; without one configured, every call is refused.
    pub fn new(token: Option<&str>) -> Self {
        BearerAuth {
            token: token.map(|t| Arc::from(t.as_bytes())),
            open_without_token: false,
            service: "AdminService",
        }
    }

    /// QuotaService: checked when a token is configured, open otherwise.
    pub fn optional(token: Option<&str>) -> Self {
        BearerAuth {
            open_without_token: true,
            service: "QuotaService",
            ..BearerAuth::new(token)
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        // An account token, already checked for this method by `tokens::AccountTokenLayer`;
        // the handler holds it to its account.
        if request
            .extensions()
            .get::<crate::api::tokens::AccountCaller>()
            .is_some()
        {
            return Ok(request);
        }
        let Some(expected) = &self.token else {
            if self.open_without_token {
                return Ok(request);
            }
            return Err(Status::unauthenticated(format!(
                "{} is disabled: no admin token is configured",
                self.service
            )));
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
            })?;
        if !constant_time_eq(presented.as_bytes(), expected) {
            return Err(Status::unauthenticated(format!(
                "invalid {} token",
                self.service
            )));
        }
        Ok(request)
    }
}

/// Compares without stopping at the first difference, so timing does not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &mut BearerAuth, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        auth.call(req).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn checks_the_bearer_token() {
        let mut auth = BearerAuth::new(Some("s3cret"));
        assert_eq!(call(&mut auth, Some("Bearer s3cret")), Ok(()));
        assert_eq!(
            call(&mut auth, Some("Bearer wrong!")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(&mut auth, Some("s3cret")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(call(&mut auth, None), Err(tonic::Code::Unauthenticated));
        let mut disabled = BearerAuth::new(None);
        assert_eq!(
            call(&mut disabled, Some("Bearer s3cret")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(call(&mut BearerAuth::optional(None), None), Ok(()));
        let mut quota = BearerAuth::optional(Some("q"));
        assert_eq!(call(&mut quota, None), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&mut quota, Some("Bearer q")), Ok(()));
    }
}
