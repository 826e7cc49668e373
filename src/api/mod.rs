//! The gRPC edge: thin tonic handlers over [`Quota`].
//!
//! Protobuf is turned into application requests on the way in ([`convert`]) and outcomes into
//! protobuf on the way out; every error becomes a `tonic::Status` in one place ([`status`]).
//! Admin calls pass a bearer-token check ([`auth`]) before they reach a handler.

pub mod auth;
pub mod convert;
pub mod forward;
pub mod json;
pub mod layer;
pub mod openapi;
pub mod page;
pub mod rls;
pub mod status;
pub mod tokens;
pub mod wkt;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::Quota;
use crate::store::Store;

/// Code generated from `proto/quota/v1/quota.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("quota.v1");
    // The proto3 JSON mapping of the messages above, generated from the same descriptors.
    include!(concat!(env!("OUT_DIR"), "/quota.v1.serde.rs"));

    /// The encoded descriptors of this package, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("quota_descriptor");
}

/// Code generated from Envoy's rate limit service definitions (`proto/envoy/…`), in modules
/// that mirror their protobuf packages.
#[allow(clippy::all, missing_docs)]
pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod extensions {
        pub mod common {
            pub mod ratelimit {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                }
            }
        }
    }
    pub mod service {
        pub mod ratelimit {
            pub mod v3 {
                tonic::include_proto!("envoy.service.ratelimit.v3");

                /// The encoded descriptors, served by gRPC reflection.
                pub const FILE_DESCRIPTOR_SET: &[u8] =
                    tonic::include_file_descriptor_set!("rls_descriptor");
            }
        }
    }
}

pub use rls::RlsApi;

use pb::admin_service_server::AdminService;
use pb::quota_service_server::QuotaService;

/// The application once its store has answered: empty while quotad is starting, so that the
/// gRPC server (and its health service) can run before the store is reachable.
pub type AppSlot<S> = Arc<std::sync::OnceLock<Arc<Quota<S>>>>;

fn ready<S>(slot: &AppSlot<S>) -> Result<&Quota<S>, Status> {
    slot.get().map(AsRef::as_ref).ok_or_else(|| {
        Status::unavailable("quotad is starting: its store has not answered yet; retry shortly")
    })
}

/// `quota.v1.QuotaService`, for frontends.
#[derive(Debug)]
pub struct QuotaApi<S> {
    app: AppSlot<S>,
}

impl<S> QuotaApi<S> {
    pub fn new(app: AppSlot<S>) -> Self {
        QuotaApi { app }
    }

    fn app(&self) -> Result<&Quota<S>, Status> {
        ready(&self.app)
    }
}

#[tonic::async_trait]
impl<S: Store> QuotaService for QuotaApi<S> {
    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let outcome = self.app()?.reserve(request.into_inner().into()).await?;
        Ok(Response::new(outcome.into()))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let outcome = self.app()?.commit(request.into_inner().into()).await?;
        Ok(Response::new(outcome.into()))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let outcome = self.app()?.release(request.into_inner().into()).await?;
        Ok(Response::new(outcome.into()))
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        tokens::check_account(&request, &request.get_ref().account_id)?;
        let req = request.into_inner();
        let app = self.app()?;
        let snapshot = app.usage(&req.account_id, req.recent_limit).await?;
        let mut answer = pb::GetUsageResponse::from(snapshot);
        answer.credit_price = Some(convert::credit_price(&app.rules().policy().top_up.price));
        Ok(Response::new(answer))
    }
}

/// `quota.v1.AdminService`, for the billing back office.
#[derive(Debug)]
pub struct AdminApi<S> {
    app: AppSlot<S>,
    /// Keys account tokens are minted with, and the longest lifetime one may get.
    tokens: Option<(Arc<tokens::AccountTokens>, u64)>,
}

impl<S> AdminApi<S> {
    pub fn new(app: AppSlot<S>) -> Self {
        AdminApi { app, tokens: None }
    }

    /// Mints account tokens with `keys`, for at most `max_ttl_seconds`.
    pub fn with_tokens(
        mut self,
        keys: Option<Arc<tokens::AccountTokens>>,
        max_ttl_seconds: u64,
    ) -> Self {
        self.tokens = keys.map(|keys| (keys, max_ttl_seconds));
        self
    }

    fn app(&self) -> Result<&Quota<S>, Status> {
        ready(&self.app)
    }
}

#[tonic::async_trait]
impl<S: Store> AdminService for AdminApi<S> {
    async fn upsert_account(
        &self,
        request: Request<pb::UpsertAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        let app = self.app()?;
        let policy = app.rules().policy();
        let account = request
            .into_inner()
            .account
            .map(|a| convert::account(a, &policy));
        Ok(Response::new(app.upsert_account(account).await?.into()))
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        tokens::check_account(&request, &request.get_ref().account_id)?;
        Ok(Response::new(
            self.app()?
                .account(&request.into_inner().account_id)
                .await?
                .into(),
        ))
    }

    async fn grant_credits(
        &self,
        request: Request<pb::GrantCreditsRequest>,
    ) -> Result<Response<pb::GrantCreditsResponse>, Status> {
        let outcome = self.app()?.grant(request.into_inner().try_into()?).await?;
        Ok(Response::new(outcome.into()))
    }

    async fn revoke_grant(
        &self,
        request: Request<pb::RevokeGrantRequest>,
    ) -> Result<Response<pb::RevokeGrantResponse>, Status> {
        let req = request.into_inner();
        let outcome = self
            .app()?
            .revoke_grant(req.account_id, req.grant_id)
            .await?;
        Ok(Response::new(pb::RevokeGrantResponse {
            revoked_micros: outcome.revoked,
            credit_balance_micros: outcome.credit_balance,
        }))
    }

    async fn set_auto_top_up(
        &self,
        request: Request<pb::SetAutoTopUpRequest>,
    ) -> Result<Response<pb::AutoTopUp>, Status> {
        tokens::check_account(&request, &request.get_ref().account_id)?;
        let outcome = self.app()?.set_top_up(request.into_inner().into()).await?;
        Ok(Response::new(outcome.view.into()))
    }

    async fn preview_auto_top_up(
        &self,
        request: Request<pb::SetAutoTopUpRequest>,
    ) -> Result<Response<pb::AutoTopUpPreview>, Status> {
        tokens::check_account(&request, &request.get_ref().account_id)?;
        let preview = self
            .app()?
            .preview_top_up(request.into_inner().into())
            .await?;
        Ok(Response::new(preview.into()))
    }

    async fn mint_account_token(
        &self,
        request: Request<pb::MintAccountTokenRequest>,
    ) -> Result<Response<pb::AccountToken>, Status> {
        let r = request.into_inner();
        let Some((keys, max_ttl)) = &self.tokens else {
            return Err(Status::failed_precondition(
                "account tokens are not enabled: set account_tokens.keys",
            ));
        };
        let allowed = || {
            let names: Vec<&str> = tokens::Ability::ALL.iter().map(|a| a.name()).collect();
            names.join(", ")
        };
        let mut abilities = Vec::new();
        for name in &r.abilities {
            let ability = tokens::Ability::parse(name).ok_or_else(|| {
                status::invalid_argument(
                    "abilities",
                    format!("unknown ability {name:?}; allowed: {}", allowed()),
                )
            })?;
            if !abilities.contains(&ability) {
                abilities.push(ability);
            }
        }
        if abilities.is_empty() {
            return Err(status::invalid_argument(
                "abilities",
                format!("name at least one of {}", allowed()),
            ));
        }
        let ttl = match u64::from(r.ttl_seconds) {
            0 => (*max_ttl).min(3_600),
            ttl if ttl <= *max_ttl => ttl,
            ttl => {
                return Err(status::invalid_argument(
                    "ttl_seconds",
                    format!("at most {max_ttl} (account_tokens.max_ttl_seconds), got {ttl}"),
                ));
            }
        };
        let app = self.app()?;
        // Only for an account that exists (NOT_FOUND otherwise, INVALID_ARGUMENT for a bad id).
        app.account(&r.account_id).await?;
        let expires_at = app.now().plus_millis(ttl as i64 * 1_000);
        Ok(Response::new(pb::AccountToken {
            token: keys.mint(&r.account_id, &abilities, expires_at),
            expires_at: Some(convert::timestamp(expires_at)),
        }))
    }

    async fn read_usage_export(
        &self,
        request: Request<pb::ReadUsageExportRequest>,
    ) -> Result<Response<pb::ReadUsageExportResponse>, Status> {
        let r = request.into_inner();
        let events = self
            .app()?
            .read_export(r.group, r.consumer, r.max_events, r.claim_idle_ms)
            .await?;
        Ok(Response::new(pb::ReadUsageExportResponse {
            events: events.into_iter().map(Into::into).collect(),
        }))
    }

    async fn ack_usage_export(
        &self,
        request: Request<pb::AckUsageExportRequest>,
    ) -> Result<Response<pb::AckUsageExportResponse>, Status> {
        let r = request.into_inner();
        let acknowledged = self.app()?.ack_export(&r.group, &r.delivery_ids).await?;
        Ok(Response::new(pb::AckUsageExportResponse { acknowledged }))
    }
}
