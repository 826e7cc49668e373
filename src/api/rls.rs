//! `envoy.service.ratelimit.v3.RateLimitService`: Envoy's (and Istio's) rate limit service,
//! answered from quotad's rules and sliding windows ([`crate::domain::rls`]). A store that
//! cannot be reached answers `UNAVAILABLE`, so Envoy's `failure_mode_deny` decides whether
//! traffic passes meanwhile.

use tonic::{Request, Response, Status};

use super::envoy::config::core::v3::HeaderValue;
use super::envoy::service::ratelimit::v3 as rls;
use super::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit, rate_limit::Unit,
};
use super::{AppSlot, ready};
use crate::app::{RlsDescriptor, RlsStatus};
use crate::domain::rls::RlsUnit;
use crate::store::Store;

/// The rules (and whether to add `RateLimit-*` headers) come from the application's live
/// rules, one snapshot per request, so a reload changes them without a restart.
#[derive(Debug)]
pub struct RlsApi<S> {
    app: AppSlot<S>,
}

impl<S> RlsApi<S> {
    pub fn new(app: AppSlot<S>) -> Self {
        RlsApi { app }
    }
}

fn unit(unit: RlsUnit) -> Unit {
    match unit {
        RlsUnit::Second => Unit::Second,
        RlsUnit::Minute => Unit::Minute,
        RlsUnit::Hour => Unit::Hour,
        RlsUnit::Day => Unit::Day,
        RlsUnit::Week => Unit::Week,
        RlsUnit::Month => Unit::Month,
        RlsUnit::Year => Unit::Year,
    }
}

/// More hits than any limit holds (a rule's limit is a `u32`): a descriptor asking for more is
/// over whatever it is counted against, and is answered the same with its hits capped here. The
/// cap keeps the sum of a request's hits far from overflowing.
const MAX_HITS: u64 = u32::MAX as u64 + 1;

fn saturating_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn status(s: &RlsStatus) -> DescriptorStatus {
    DescriptorStatus {
        code: if s.over { Code::OverLimit } else { Code::Ok } as i32,
        current_limit: s.limit.as_ref().map(|l| RateLimit {
            requests_per_unit: saturating_u32(l.requests_per_unit),
            unit: unit(l.unit) as i32,
            name: l.name.clone(),
        }),
        limit_remaining: saturating_u32(s.remaining),
        duration_until_reset: s.limit.as_ref().map(|_| prost_types::Duration {
            seconds: s.reset_in_ms / 1_000,
            nanos: i32::try_from((s.reset_in_ms % 1_000) * 1_000_000).unwrap_or(0),
        }),
        quota: None,
    }
}

/// The IETF draft's headers for the tightest limit of the request.
fn headers(statuses: &[RlsStatus]) -> Vec<HeaderValue> {
    let Some((s, limit)) = statuses
        .iter()
        .filter_map(|s| Some((s, s.limit.as_ref()?)))
        .min_by_key(|(s, _)| (!s.over, s.remaining))
    else {
        return Vec::new();
    };
    let window_s = limit.unit.length_ms() / 1_000;
    let header = |key: &str, value: String| HeaderValue {
        key: key.into(),
        value,
    };
    vec![
        header(
            "RateLimit-Limit",
            format!(
                "{}, {};w={window_s}",
                limit.requests_per_unit, limit.requests_per_unit
            ),
        ),
        header("RateLimit-Remaining", s.remaining.to_string()),
        header(
            "RateLimit-Reset",
            (s.reset_in_ms.div_euclid(1_000) + i64::from(s.reset_in_ms % 1_000 > 0)).to_string(),
        ),
    ]
}

#[tonic::async_trait]
impl<S: Store> rls::rate_limit_service_server::RateLimitService for RlsApi<S> {
    async fn should_rate_limit(
        &self,
        request: Request<rls::RateLimitRequest>,
    ) -> Result<Response<rls::RateLimitResponse>, Status> {
        let req = request.into_inner();
        let descriptors: Vec<RlsDescriptor> = req
            .descriptors
            .into_iter()
            .map(|d| RlsDescriptor {
                entries: d.entries.into_iter().map(|e| (e.key, e.value)).collect(),
                hits: d.hits_addend.map(|hits| hits.min(MAX_HITS)),
            })
            .collect();
        let app = ready(&self.app)?;
        let rules = app.rules().current();
        let statuses = app
            .should_rate_limit(&rules, &req.domain, &descriptors, req.hits_addend)
            .await?;
        let over = statuses.iter().any(|s| s.over);
        Ok(Response::new(rls::RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses: statuses.iter().map(status).collect(),
            response_headers_to_add: if rules.rls_headers {
                headers(&statuses)
            } else {
                Vec::new()
            },
            ..Default::default()
        }))
    }
}
