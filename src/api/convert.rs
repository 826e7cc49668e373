//! Protobuf ⇄ domain conversions at the edge. Incoming messages become application requests
//! (`From`, or `TryFrom` where a value can be malformed, such as a timestamp, and a function
//! where the conversion needs the rules or checks what only the edge can); outcomes become
//! response messages. No rule lives here.
//!
//! Every request's way in is also tested with arbitrary input (the `fuzz` tests).

use tonic::Status;

use super::pb;
use crate::app::{CommitRequest, GrantRequest, ReleaseRequest, ReserveRequest, TopUpRequest};
use crate::domain::top_up::AttemptOutcome;
use crate::domain::{
    Account, AccountStatus, Action, CommitOutcome, CreditLot, Decision, Denial, DenyReason,
    ExportedEvent, Funding, GrantOutcome, HoldView, Policy, ReleaseOutcome, ReserveOutcome,
    Timestamp, TopUpPreview, TopUpView, Usage, UsageEvent, UsageSnapshot, WindowStatus,
};

pub fn timestamp(t: Timestamp) -> crate::api::wkt::Timestamp {
    let ms = t.as_millis();
    crate::api::wkt::Timestamp {
        seconds: ms.div_euclid(1_000),
        nanos: (ms.rem_euclid(1_000) * 1_000_000) as i32,
    }
}

/// The range of `google.protobuf.Timestamp`, in seconds: 0001-01-01T00:00:00Z to
/// 9999-12-31T23:59:59Z. An instant outside it is not a valid Timestamp, and echoing one back
/// (a lot's `expires_at` in every GetUsage) would break clients that check, as Go's `AsTime`,
/// Java's `Timestamps` and Python's `ToDatetime` do.
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

/// A protobuf timestamp as a domain instant (sub-millisecond precision is truncated).
pub fn from_timestamp(field: &str, t: &crate::api::wkt::Timestamp) -> Result<Timestamp, Status> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(super::status::invalid_argument(
            field,
            format!("nanos must be in 0..1e9, got {}", t.nanos),
        ));
    }
    if !TIMESTAMP_SECONDS.contains(&t.seconds) {
        return Err(super::status::invalid_argument(
            field,
            format!(
                "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, got {} seconds",
                t.seconds
            ),
        ));
    }
    Ok(Timestamp::from_millis(
        t.seconds * 1_000 + i64::from(t.nanos / 1_000_000),
    ))
}

impl From<pb::Usage> for Usage {
    fn from(u: pb::Usage) -> Usage {
        Usage {
            model: u.model.into(),
            input_tokens: u.input_tokens,
            cached_input_tokens: u.cached_input_tokens,
            output_tokens: u.output_tokens,
            images: u.images,
            fast_mode: u.fast_mode,
        }
    }
}

impl From<Usage> for pb::Usage {
    fn from(u: Usage) -> pb::Usage {
        pb::Usage {
            model: u.model.to_string(),
            input_tokens: u.input_tokens,
            cached_input_tokens: u.cached_input_tokens,
            output_tokens: u.output_tokens,
            images: u.images,
            fast_mode: u.fast_mode,
        }
    }
}

impl From<pb::ReserveRequest> for ReserveRequest {
    fn from(r: pb::ReserveRequest) -> Self {
        ReserveRequest {
            account_id: r.account_id,
            request_id: r.request_id,
            product: r.product,
            estimate: r.estimate.map(Into::into),
            plan_hint: r.plan_hint,
            ttl_seconds: r.ttl_seconds,
        }
    }
}

impl From<pb::SetAutoTopUpRequest> for TopUpRequest {
    fn from(r: pb::SetAutoTopUpRequest) -> Self {
        TopUpRequest {
            account_id: r.account_id,
            enabled: r.enabled,
            threshold: r.threshold_micros,
            target: r.target_micros,
            monthly_cap: r.monthly_cap_micros,
        }
    }
}

impl From<pb::CommitRequest> for CommitRequest {
    fn from(r: pb::CommitRequest) -> Self {
        CommitRequest {
            account_id: r.account_id,
            reservation_id: r.reservation_id,
            usage: r.usage.map(Into::into),
            is_final: r.r#final,
        }
    }
}

impl From<pb::ReleaseRequest> for ReleaseRequest {
    fn from(r: pb::ReleaseRequest) -> Self {
        ReleaseRequest {
            account_id: r.account_id,
            reservation_id: r.reservation_id,
        }
    }
}

impl TryFrom<pb::GrantCreditsRequest> for GrantRequest {
    type Error = Status;

    fn try_from(r: pb::GrantCreditsRequest) -> Result<Self, Status> {
        Ok(GrantRequest {
            account_id: r.account_id,
            grant_id: r.grant_id,
            amount: r.amount_micros,
            source: r.source,
            expires_at: r
                .expires_at
                .as_ref()
                .map(|t| from_timestamp("expires_at", t))
                .transpose()?,
        })
    }
}

/// An account as UpsertAccount asks for it. Its plan is interned (one copy for the life of the
/// process) only when it is a configured plan: any other is refused, and interning whatever a
/// caller sends would grow the table with every refused call.
pub fn account(a: pb::Account, policy: &Policy) -> Account {
    let plan = match policy.plan(&a.plan) {
        Some(_) => crate::domain::intern(&a.plan),
        None => a.plan.into(),
    };
    Account {
        id: a.account_id,
        plan,
        credit_purchase_allowed: a.credit_purchase_allowed,
    }
}

impl From<Account> for pb::Account {
    fn from(a: Account) -> pb::Account {
        pb::Account {
            account_id: a.id,
            plan: a.plan.to_string(),
            credit_purchase_allowed: a.credit_purchase_allowed,
        }
    }
}

impl From<Funding> for pb::Funding {
    fn from(f: Funding) -> pb::Funding {
        pb::Funding {
            plan_micros: f.plan,
            credit_micros: f.credit,
        }
    }
}

impl From<Action> for pb::Action {
    fn from(a: Action) -> pb::Action {
        match a {
            Action::UpgradePlan => pb::Action::UpgradePlan,
            Action::BuyCredits => pb::Action::BuyCredits,
            Action::WaitForReset => pb::Action::WaitForReset,
            Action::UpdatePaymentMethod => pb::Action::UpdatePaymentMethod,
        }
    }
}

impl From<DenyReason> for pb::DenyReason {
    fn from(r: DenyReason) -> pb::DenyReason {
        match r {
            DenyReason::WindowExhausted => pb::DenyReason::WindowExhausted,
            DenyReason::WeeklyExhausted => pb::DenyReason::WeeklyExhausted,
            DenyReason::CreditsExhausted => pb::DenyReason::CreditsExhausted,
            DenyReason::CreditsNotAllowed => pb::DenyReason::CreditsNotAllowed,
        }
    }
}

impl From<WindowStatus> for pb::WindowStatus {
    fn from(w: WindowStatus) -> pb::WindowStatus {
        pb::WindowStatus {
            name: w.name.to_owned(),
            used_micros: w.used,
            limit_micros: w.limit,
            resets_at: w.resets_at.map(timestamp),
            held_micros: w.held,
        }
    }
}

fn windows(status: AccountStatus) -> Vec<pb::WindowStatus> {
    status.windows.into_iter().map(Into::into).collect()
}

impl From<ReserveOutcome> for pb::ReserveResponse {
    fn from(o: ReserveOutcome) -> pb::ReserveResponse {
        let mut resp = pb::ReserveResponse {
            windows: windows(o.status.clone()),
            credit_balance_micros: o.status.credit_balance,
            estimate_micros: o.estimate,
            ..Default::default()
        };
        match o.decision {
            Decision::Allow {
                reservation_id,
                held,
                expires_at,
            } => {
                resp.set_decision(pb::Decision::Allow);
                resp.reservation_id = reservation_id.to_string();
                resp.held = Some(held.into());
                resp.expires_at = Some(timestamp(expires_at));
            }
            Decision::Deny(denial) => {
                resp.set_decision(pb::Decision::Deny);
                resp.set_reason(denial.reason.into());
                resp.set_action(denial.action.into());
                resp.upgrade_to = denial.upgrade_to.unwrap_or_default();
                resp.retry_at = denial.retry_at.map(timestamp);
                resp.message = denial.message;
                resp.held = Some(Funding::ZERO.into());
            }
        }
        resp.shadow_denial = o.shadow_denial.map(|d| shadow_denial(*d));
        resp
    }
}

fn shadow_denial(d: Denial) -> pb::ShadowDenial {
    let mut shadow = pb::ShadowDenial {
        upgrade_to: d.upgrade_to.unwrap_or_default(),
        retry_at: d.retry_at.map(timestamp),
        message: d.message,
        ..Default::default()
    };
    shadow.set_reason(d.reason.into());
    shadow.set_action(d.action.into());
    shadow
}

impl From<CommitOutcome> for pb::CommitResponse {
    fn from(o: CommitOutcome) -> pb::CommitResponse {
        let r = o.receipt;
        let mut resp = pb::CommitResponse {
            charged: Some(r.charged.into()),
            may_continue: r.may_continue,
            windows: windows(o.status.clone()),
            credit_balance_micros: o.status.credit_balance,
            message: r.message(),
            held: Some(r.held.into()),
            expires_at: r.expires_at.map(timestamp),
            charged_total: Some(r.charged_total.into()),
            ..Default::default()
        };
        if let Some(denial) = r.denial {
            resp.set_action(denial.action.into());
            resp.set_reason(denial.reason.into());
        }
        resp.shadow_denial = o.shadow_denial.map(|d| shadow_denial(*d));
        resp
    }
}

impl From<ReleaseOutcome> for pb::ReleaseResponse {
    fn from(o: ReleaseOutcome) -> pb::ReleaseResponse {
        pb::ReleaseResponse {
            released: Some(o.released.into()),
        }
    }
}

impl From<CreditLot> for pb::CreditLot {
    fn from(l: CreditLot) -> pb::CreditLot {
        pb::CreditLot {
            lot_id: l.id,
            granted_micros: l.granted,
            remaining_micros: l.remaining,
            expires_at: Some(timestamp(l.expires_at)),
            source: l.source.as_str().to_owned(),
            granted_at: Some(timestamp(l.granted_at)),
        }
    }
}

impl From<GrantOutcome> for pb::GrantCreditsResponse {
    fn from(o: GrantOutcome) -> pb::GrantCreditsResponse {
        pb::GrantCreditsResponse {
            lot: Some(o.lot.into()),
            credit_balance_micros: o.credit_balance,
        }
    }
}

/// A usage event of `account_id` (part of its id).
fn usage_event(account_id: &str, e: UsageEvent) -> pb::UsageEvent {
    pb::UsageEvent {
        event_id: e.id(account_id),
        seq: e.seq,
        at: Some(timestamp(e.at)),
        product: e.product.to_string(),
        model: e.usage.model.to_string(),
        usage: Some(e.usage.into()),
        charged: Some(e.charged.into()),
        reservation_id: e.reservation_id.to_string(),
        price_version: e.price_version.to_string(),
    }
}

impl From<ExportedEvent> for pb::ExportedUsageEvent {
    fn from(e: ExportedEvent) -> pb::ExportedUsageEvent {
        pb::ExportedUsageEvent {
            event: Some(usage_event(&e.account_id, e.event)),
            delivery_id: e.delivery_id,
            account_id: e.account_id,
        }
    }
}

impl From<HoldView> for pb::Hold {
    fn from(h: HoldView) -> pb::Hold {
        pb::Hold {
            reservation_id: h.reservation_id,
            product: h.product,
            held: Some(h.held.into()),
            charged: Some(h.charged.into()),
            expires_at: Some(timestamp(h.expires_at)),
        }
    }
}

impl From<TopUpPreview> for pb::AutoTopUpPreview {
    fn from(p: TopUpPreview) -> pb::AutoTopUpPreview {
        pb::AutoTopUpPreview {
            available_micros: p.available,
            purchase_micros: p.purchase.unwrap_or(0),
            in_flight_micros: p.in_flight.unwrap_or(0),
            purchase_price_minor: p.purchase_price.map_or(0, |m| m.minor),
            purchase_price: p.purchase_price.map_or(String::new(), |m| m.to_string()),
            currency: p
                .purchase_price
                .map_or(String::new(), |m| m.currency.to_string()),
            summary: p.summary(),
            after: Some(p.view.into()),
        }
    }
}

impl From<TopUpView> for pb::AutoTopUp {
    fn from(v: TopUpView) -> pb::AutoTopUp {
        let s = v.settings;
        pb::AutoTopUp {
            enabled: s.enabled(),
            threshold_micros: s.threshold(),
            target_micros: s.target(),
            monthly_cap_micros: s.monthly_cap().unwrap_or(0),
            last_attempt: v.last_attempt.map(|a| {
                let outcome = match a.outcome {
                    AttemptOutcome::Pending => pb::TopUpOutcome::Pending,
                    AttemptOutcome::Succeeded => pb::TopUpOutcome::Succeeded,
                    AttemptOutcome::Declined => pb::TopUpOutcome::Declined,
                    AttemptOutcome::Failed => pb::TopUpOutcome::Failed,
                    AttemptOutcome::Capped => pb::TopUpOutcome::Capped,
                };
                pb::TopUpAttempt {
                    at: Some(timestamp(a.at)),
                    amount_micros: a.amount,
                    outcome: outcome.into(),
                    error: a.error,
                    payment_id: a.payment_id,
                }
            }),
            consecutive_declines: v.consecutive_declines,
            in_flight_purchase_id: v
                .in_flight
                .as_ref()
                .map(|p| p.id.clone())
                .unwrap_or_default(),
            in_flight_micros: v.in_flight.map_or(0, |p| p.amount),
        }
    }
}

pub fn credit_price(price: &crate::domain::money::CreditPrice) -> pb::CreditPrice {
    let pack = crate::domain::money::Money {
        minor: price.amount_minor,
        currency: price.currency,
        minor_digits: price.minor_digits,
    };
    pb::CreditPrice {
        credits: price.credits,
        amount_minor: price.amount_minor,
        currency: price.currency.to_string(),
        minor_digits: u32::from(price.minor_digits),
        summary: format!("{} credits for {pack}", price.credits),
    }
}

impl From<UsageSnapshot> for pb::GetUsageResponse {
    fn from(s: UsageSnapshot) -> pb::GetUsageResponse {
        let t = s.totals;
        pb::GetUsageResponse {
            plan: s.account.plan.to_string(),
            credit_balance_micros: s.status.credit_balance,
            windows: windows(s.status),
            lots: s.lots.into_iter().map(Into::into).collect(),
            recent: s
                .recent
                .into_iter()
                .map(|e| usage_event(&s.account.id, e))
                .collect(),
            ledger: Some(pb::CreditLedger {
                granted_micros: t.granted,
                spent_micros: t.spent,
                expired_micros: t.expired,
                balance_micros: t.balance,
                held_micros: s.credit_held,
                available_micros: t.balance - s.credit_held,
                revoked_micros: t.revoked,
            }),
            holds: s.holds.into_iter().map(Into::into).collect(),
            credit_purchase_allowed: s.account.credit_purchase_allowed,
            auto_top_up: Some(s.top_up.into()),
            // The rules', not the account's: the handler adds it.
            credit_price: None,
        }
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn timestamps_outside_years_1_to_9999_are_refused() {
        let at = |seconds| {
            from_timestamp(
                "expires_at",
                &crate::api::wkt::Timestamp { seconds, nanos: 0 },
            )
        };
        assert!(at(253_402_300_799).is_ok());
        assert!(at(-62_135_596_800).is_ok());
        for seconds in [253_402_300_800, -62_135_596_801, i64::MAX / 1_000, i64::MIN] {
            let err = at(seconds).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with("expires_at: "), "{err:?}");
        }
    }

    #[test]
    fn only_configured_plans_are_interned() {
        let policy = Policy::default();
        let asked = |plan: &str| pb::Account {
            account_id: "a".into(),
            plan: plan.into(),
            credit_purchase_allowed: true,
        };
        let configured = account(asked("plus"), &policy);
        assert!(Arc::ptr_eq(
            &configured.plan,
            &crate::domain::intern("plus")
        ));
        // The intern table would hold a second reference.
        let unknown = account(asked("not-a-plan-c0ffee"), &policy);
        assert_eq!(Arc::strong_count(&unknown.plan), 1);
    }

    #[test]
    fn timestamps_round_trip_at_millisecond_precision() {
        for ms in [0, 1, 999, 1_795_500_123_456, -1_500] {
            let t = Timestamp::from_millis(ms);
            assert_eq!(from_timestamp("t", &timestamp(t)).unwrap(), t);
        }
        let bad = crate::api::wkt::Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert_eq!(
            from_timestamp("expires_at", &bad).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
