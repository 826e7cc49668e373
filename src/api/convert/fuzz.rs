//! Arbitrary-input tests of the request conversions: what cargo fuzz would do, as property tests
//! that run on the stable toolchain, in the ordinary suite, in a few seconds.
//!
//! Every request quotad takes from the wire (QuotaService, AdminService and Envoy's
//! ShouldRateLimit) is generated with arbitrary field values (empty, huge, unicode and control
//! characters, integer extremes, optional fields present or not), and also decoded from
//! arbitrary and from mutated bytes, then handed to its real handler over a memory store with a
//! manual clock: the handler is where a message becomes an application request, which the
//! application checks and turns into a command. Whatever comes in:
//!
//! - nothing panics;
//! - a request with a field out of its documented bounds is refused `INVALID_ARGUMENT`, with a
//!   message that starts with that field's name (how every refusal of a field is worded);
//! - any other refusal has one of the call's documented codes, never `INTERNAL` or `UNKNOWN`;
//! - an accepted request was within every bound, and so is its answer (no negative amount,
//!   none past [`MAX_EXACT_MICROS`], a hold that expires when it was asked to).
//!
//! Which fields are out of bounds is worked out here from the proto's comments and the
//! configured limits, not by asking the code under test. The generators mostly pick ids out of
//! a few that exist (an account with credits, its open reservation, its grant, an export
//! delivery, an address already counted), so that requests reach the store's rules and not
//! only the edge's checks. Seeds of the failures they found are kept in
//! `proptest-regressions/`, replayed before new cases; the failures themselves are plain tests
//! at the end of this file.

use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use prost::Message;
use tonic::{Code, Request, Response, Status};

use crate::api::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor,
};
use crate::api::envoy::service::ratelimit::v3::{self as rls, rate_limit_response};
use crate::api::pb::admin_service_server::AdminService;
use crate::api::pb::quota_service_server::QuotaService;
use crate::api::{AdminApi, AppSlot, QuotaApi, RlsApi, pb};
use crate::app::{
    CommitRequest, DEFAULT_RECENT_LIMIT, GrantRequest, Quota, ReserveRequest, RlsDescriptor,
};
use crate::domain::account::MAX_EXACT_MICROS;
use crate::domain::rls::{ACCOUNT_KEY, EntryMatch, RlsRule, RlsUnit};
use crate::domain::{
    Account, Decision, MICROS_PER_CREDIT, ManualClock, Policy, PriceSheet, Timestamp, Usage,
};
use crate::rules::{LiveRules, Rules};
use crate::store::MemoryStore;

/// Where the clock stands: 2026-11-24T22:00:00Z.
const NOW: Timestamp = Timestamp::from_millis(1_795_557_600_000);
const C: i64 = MICROS_PER_CREDIT;

/// The account that exists, on a plan that may buy credits, with a grant and an open
/// reservation that has been charged once.
const ACCOUNT: &str = "acct-1";
const GRANT: &str = "grant-1";
const REQUEST: &str = "req-1";
const GROUP: &str = "billing";
/// Stand for the reservation's and the export delivery's ids, which are minted when the
/// fixture is made.
const RESERVATION: &str = "$reservation";
const DELIVERY: &str = "$delivery";

/// The Envoy rules: quotad's default one (an account's plan windows, domain `quotad`) and two
/// counted ones, the second with the largest limit a rule can have.
const COUNTED_DOMAIN: &str = "edge";
const COUNTED_KEY: &str = "remote_address";
const COUNTED_LIMIT: u32 = 10;
/// An address counted once already.
const ADDRESS: &str = "10.0.0.1";

fn rules() -> Rules {
    let mut rules = Rules::with_policy(Arc::new(Policy::default()));
    let counted = |key: &str, value: Option<&str>, limit: u32, unit: RlsUnit| RlsRule {
        domain: COUNTED_DOMAIN.into(),
        entries: vec![EntryMatch {
            key: key.into(),
            value: value.map(Into::into),
        }],
        requests_per_unit: Some(limit),
        unit: Some(unit),
        account_windows: false,
        name: None,
    };
    let mut rls = crate::domain::rls::default_rules();
    rls.push(counted(COUNTED_KEY, None, COUNTED_LIMIT, RlsUnit::Minute));
    rls.push(counted("path", Some("/"), u32::MAX, RlsUnit::Second));
    rules.rls = rls.into();
    rules.rls_headers = true;
    rules
}

/// quotad's gRPC edge over a memory store, with the state the known ids name.
struct Edge {
    quota: QuotaApi<MemoryStore>,
    admin: AdminApi<MemoryStore>,
    rls: RlsApi<MemoryStore>,
    policy: Arc<Policy>,
    pricing: Arc<PriceSheet>,
    reservation_id: String,
    delivery_id: String,
}

impl Edge {
    async fn new() -> Edge {
        let rules = LiveRules::new(rules());
        let current = rules.current();
        let store = MemoryStore::with_rules(rules.clone());
        let app = Quota::new(store, rules, Arc::new(ManualClock::new(NOW)));
        let usage = |tokens| Usage {
            model: "gpt-5.5".into(),
            input_tokens: tokens,
            cached_input_tokens: 0,
            output_tokens: 0,
            images: 0,
            fast_mode: false,
        };
        app.upsert_account(Some(Account {
            id: ACCOUNT.into(),
            plan: crate::domain::intern("plus"),
            credit_purchase_allowed: true,
        }))
        .await
        .unwrap();
        app.grant(GrantRequest {
            account_id: ACCOUNT.into(),
            grant_id: GRANT.into(),
            amount: 100 * C,
            ..GrantRequest::default()
        })
        .await
        .unwrap();
        let reserved = app
            .reserve(ReserveRequest {
                account_id: ACCOUNT.into(),
                request_id: REQUEST.into(),
                product: "codex".into(),
                estimate: Some(usage(100_000)),
                ..ReserveRequest::default()
            })
            .await
            .unwrap();
        let Decision::Allow { reservation_id, .. } = reserved.decision else {
            panic!("the fixture's reserve was denied: {reserved:?}");
        };
        app.commit(CommitRequest {
            account_id: ACCOUNT.into(),
            reservation_id: reservation_id.to_string(),
            usage: Some(usage(10_000)),
            is_final: false,
        })
        .await
        .unwrap();
        let delivered = app
            .read_export(GROUP.into(), "reader".into(), 0, 0)
            .await
            .unwrap();
        let counted = RlsDescriptor {
            entries: vec![(COUNTED_KEY.into(), ADDRESS.into())],
            hits: None,
        };
        app.should_rate_limit(&current, COUNTED_DOMAIN, &[counted], 1)
            .await
            .unwrap();
        let slot: AppSlot<MemoryStore> = Arc::new(OnceLock::new());
        slot.set(Arc::new(app)).unwrap();
        Edge {
            quota: QuotaApi::new(slot.clone()),
            admin: AdminApi::new(slot.clone()).with_tokens(
                crate::api::tokens::AccountTokens::parse(TOKEN_KEYS)
                    .unwrap()
                    .map(Arc::new),
                TOKEN_MAX_TTL,
            ),
            rls: RlsApi::new(slot),
            policy: current.policy.clone(),
            pricing: current.pricing.clone(),
            reservation_id: reservation_id.to_string(),
            delivery_id: delivered[0].delivery_id.clone(),
        }
    }

    /// The id a generated one stands for.
    fn resolve(&self, id: &mut String) {
        match id.as_str() {
            RESERVATION => *id = self.reservation_id.clone(),
            DELIVERY => *id = self.delivery_id.clone(),
            _ => {}
        }
    }
}

/// Runs one case on a fresh edge: cases do not depend on each other, so a failure shrinks and
/// replays alone.
fn on_edge<F: Future<Output = Result<(), TestCaseError>>>(
    case: impl FnOnce(Edge) -> F,
) -> Result<(), TestCaseError> {
    block_on(async { case(Edge::new().await).await })
}

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(f)
}

// ---- What a request deserves ----

/// A request's fields as the bounds judge them.
#[derive(Debug, Default)]
struct Expect {
    /// Fields out of bounds: the call must be refused `INVALID_ARGUMENT` naming one of them.
    faults: Vec<String>,
    /// Fields only the state can find wrong: a refusal may name them too.
    may_fault: Vec<&'static str>,
    /// The other codes the call may answer.
    codes: &'static [Code],
}

impl Expect {
    fn new(codes: &'static [Code]) -> Expect {
        Expect {
            codes,
            ..Expect::default()
        }
    }

    fn fault(&mut self, field: impl Into<String>) {
        self.faults.push(field.into());
    }

    /// Ids: not empty, at most `max_id_bytes`, no whitespace or control characters.
    fn id(&mut self, policy: &Policy, field: &str, id: &str) {
        if id.is_empty()
            || id.len() > policy.limits.max_id_bytes as usize
            || id.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            self.fault(field);
        }
    }

    fn usage(&mut self, edge: &Edge, field: &str, usage: Option<&pb::Usage>, may_be_empty: bool) {
        let Some(u) = usage else {
            self.fault(field);
            return;
        };
        let limits = &edge.policy.limits;
        for (name, count) in [
            ("input_tokens", u.input_tokens),
            ("cached_input_tokens", u.cached_input_tokens),
            ("output_tokens", u.output_tokens),
        ] {
            if count > limits.max_tokens {
                self.fault(format!("{field}.{name}"));
            }
        }
        if u.images > limits.max_images {
            self.fault(format!("{field}.images"));
        }
        let empty = u.input_tokens == 0
            && u.cached_input_tokens == 0
            && u.output_tokens == 0
            && u.images == 0;
        if empty && !may_be_empty {
            self.fault(field);
        }
        if !edge.pricing.models.contains_key(&u.model) {
            self.fault(format!("{field}.model"));
        }
        // A price past what an amount can hold; the default sheet and limits never get there.
        self.may_fault.push(if field == "usage" {
            "usage"
        } else {
            "estimate"
        });
    }

    /// Checks the answer against what the request deserved.
    fn check<T: std::fmt::Debug>(
        &self,
        result: &Result<Response<T>, Status>,
    ) -> Result<(), TestCaseError> {
        let status = match result {
            Ok(response) => {
                prop_assert!(
                    self.faults.is_empty(),
                    "accepted with {:?} out of bounds: {response:?}",
                    self.faults
                );
                return Ok(());
            }
            Err(status) => status,
        };
        if status.code() == Code::InvalidArgument {
            let field = status.message().split_once(": ").map(|(field, _)| field);
            prop_assert!(
                field.is_some_and(
                    |f| self.faults.iter().any(|x| x == f) || self.may_fault.contains(&f)
                ),
                "refused {:?}, which names none of the faults {:?} (or {:?})",
                status.message(),
                self.faults,
                self.may_fault
            );
        } else {
            prop_assert!(
                self.faults.is_empty(),
                "{:?} out of bounds, but answered {:?} {:?}",
                self.faults,
                status.code(),
                status.message()
            );
            prop_assert!(
                self.codes.contains(&status.code()),
                "answered {:?} {:?}; the call's codes are {:?}",
                status.code(),
                status.message(),
                self.codes
            );
        }
        Ok(())
    }
}

/// An amount an answer may carry.
fn amount(what: &str, micros: i64) -> Result<(), TestCaseError> {
    prop_assert!(
        (0..=MAX_EXACT_MICROS).contains(&micros),
        "{what} = {micros} is outside 0..={MAX_EXACT_MICROS}"
    );
    Ok(())
}

/// A credit balance, which a commit past its hold may take below zero (debt, paid by the next
/// grant).
fn balance(what: &str, micros: i64) -> Result<(), TestCaseError> {
    prop_assert!(
        (-MAX_EXACT_MICROS..=MAX_EXACT_MICROS).contains(&micros),
        "{what} = {micros} is outside ±{MAX_EXACT_MICROS}"
    );
    Ok(())
}

fn funding(what: &str, f: Option<&pb::Funding>) -> Result<(), TestCaseError> {
    let f = f.copied().unwrap_or_default();
    amount(&format!("{what}.plan_micros"), f.plan_micros)?;
    amount(&format!("{what}.credit_micros"), f.credit_micros)
}

fn windows(windows: &[pb::WindowStatus]) -> Result<(), TestCaseError> {
    for w in windows {
        amount("window used", w.used_micros)?;
        amount("window limit", w.limit_micros)?;
        amount("window held", w.held_micros)?;
    }
    Ok(())
}

fn millis(t: Option<&crate::api::wkt::Timestamp>) -> Option<i64> {
    t.map(|t| t.seconds * 1_000 + i64::from(t.nanos / 1_000_000))
}

// ---- The calls: each request checked, sent, and its answer checked ----

async fn reserve(edge: &Edge, r: pb::ReserveRequest) -> Result<(), TestCaseError> {
    let mut expect = Expect::new(&[Code::AlreadyExists, Code::FailedPrecondition]);
    let limits = &edge.policy.limits;
    expect.id(&edge.policy, "account_id", &r.account_id);
    expect.id(&edge.policy, "request_id", &r.request_id);
    if edge.policy.product(&r.product).is_none() {
        expect.fault("product");
    }
    expect.usage(edge, "estimate", r.estimate.as_ref(), false);
    if !r.plan_hint.is_empty() && edge.policy.plan(&r.plan_hint).is_none() {
        expect.fault("plan_hint");
    }
    if r.ttl_seconds > limits.max_ttl_seconds {
        expect.fault("ttl_seconds");
    }
    let ttl = match r.ttl_seconds {
        0 => limits.default_ttl_seconds,
        ttl => ttl,
    };
    let replay = r.account_id == ACCOUNT && r.request_id == REQUEST;
    let result = edge.quota.reserve(Request::new(r)).await;
    expect.check(&result)?;
    let Ok(response) = result else { return Ok(()) };
    let resp = response.into_inner();
    amount("estimate_micros", resp.estimate_micros)?;
    balance("credit_balance_micros", resp.credit_balance_micros)?;
    funding("held", resp.held.as_ref())?;
    windows(&resp.windows)?;
    let held = resp.held.unwrap_or_default();
    prop_assert!(held.plan_micros + held.credit_micros <= resp.estimate_micros);
    match resp.decision() {
        pb::Decision::Allow if !replay => prop_assert_eq!(
            millis(resp.expires_at.as_ref()),
            Some(NOW.as_millis() + i64::from(ttl) * 1_000)
        ),
        pb::Decision::Allow | pb::Decision::Deny => {}
        pb::Decision::Unspecified => prop_assert!(false, "no decision"),
    }
    Ok(())
}

async fn commit(edge: &Edge, mut r: pb::CommitRequest) -> Result<(), TestCaseError> {
    let mut expect = Expect::new(&[
        Code::NotFound,
        Code::FailedPrecondition,
        Code::AlreadyExists,
    ]);
    expect.id(&edge.policy, "account_id", &r.account_id);
    expect.id(&edge.policy, "reservation_id", &r.reservation_id);
    expect.usage(edge, "usage", r.usage.as_ref(), true);
    edge.resolve(&mut r.reservation_id);
    let result = edge.quota.commit(Request::new(r)).await;
    expect.check(&result)?;
    let Ok(response) = result else { return Ok(()) };
    let resp = response.into_inner();
    funding("charged", resp.charged.as_ref())?;
    funding("charged_total", resp.charged_total.as_ref())?;
    funding("held", resp.held.as_ref())?;
    balance("credit_balance_micros", resp.credit_balance_micros)?;
    windows(&resp.windows)
}

async fn release(edge: &Edge, mut r: pb::ReleaseRequest) -> Result<(), TestCaseError> {
    let mut expect = Expect::new(&[
        Code::NotFound,
        Code::FailedPrecondition,
        Code::AlreadyExists,
    ]);
    expect.id(&edge.policy, "account_id", &r.account_id);
    expect.id(&edge.policy, "reservation_id", &r.reservation_id);
    edge.resolve(&mut r.reservation_id);
    let result = edge.quota.release(Request::new(r)).await;
    expect.check(&result)?;
    if let Ok(response) = result {
        funding("released", response.get_ref().released.as_ref())?;
    }
    Ok(())
}

async fn get_usage(edge: &Edge, r: pb::GetUsageRequest) -> Result<(), TestCaseError> {
    let mut expect = Expect::new(&[Code::NotFound]);
    expect.id(&edge.policy, "account_id", &r.account_id);
    let most = match r.recent_limit {
        0 => DEFAULT_RECENT_LIMIT,
        n => n,
    }
    .min(edge.policy.limits.recent_events);
    let result = edge.quota.get_usage(Request::new(r)).await;
    expect.check(&result)?;
    let Ok(response) = result else { return Ok(()) };
    let resp = response.into_inner();
    prop_assert!(resp.recent.len() <= most as usize);
    balance("credit_balance_micros", resp.credit_balance_micros)?;
    windows(&resp.windows)?;
    for lot in &resp.lots {
        amount("lot granted", lot.granted_micros)?;
        amount("lot remaining", lot.remaining_micros)?;
    }
    let ledger = resp.ledger.unwrap_or_default();
    for (what, micros) in [
        ("granted", ledger.granted_micros),
        ("spent", ledger.spent_micros),
        ("expired", ledger.expired_micros),
        ("held", ledger.held_micros),
        ("revoked", ledger.revoked_micros),
    ] {
        amount(what, micros)?;
    }
    balance("balance", ledger.balance_micros)?;
    balance("available", ledger.available_micros)
}

async fn upsert_account(edge: &Edge, r: pb::UpsertAccountRequest) -> Result<(), TestCaseError> {
    let mut expect = Expect::new(&[]);
    match &r.account {
        None => expect.fault("account"),
        Some(a) => {
            expect.id(&edge.policy, "account.account_id", &a.account_id);
            if edge.policy.plan(&a.plan).is_none() {
                expect.fault("account.plan");
            }
        }
    }
    let asked = r.account.clone();
    let result = edge.admin.upsert_account(Request::new(r)).await;
    expect.check(&result)?;
    if let Ok(response) = result {
        prop_assert_eq!(Some(response.into_inner()), asked);
    }
    Ok(())
}

async fn get_account(edge: &Edge, r: pb::GetAccountRequest) -> Result<(), TestCaseError> {
    let mut expect = Expect::new(&[Code::NotFound]);
    expect.id(&edge.policy, "account_id", &r.account_id);
    expect.check(&edge.admin.get_account(Request::new(r)).await)
}

async fn grant_credits(edge: &Edge, r: pb::GrantCreditsRequest) -> Result<(), TestCaseError> {
    let mut expect = Expect::new(&[Code::NotFound, Code::AlreadyExists]);
    expect.id(&edge.policy, "account_id", &r.account_id);
    expect.id(&edge.policy, "grant_id", &r.grant_id);
    let max = edge.policy.limits.max_grant_micros;
    if !(1..=max).contains(&r.amount_micros) {
        expect.fault("amount_micros");
    }
    const SOURCES: [&str; 5] = ["", "purchase", "promo", "auto_top_up", "adjustment"];
    if !SOURCES.contains(&r.source.as_str()) {
        expect.fault("source");
    }
    // A time a protobuf Timestamp can hold (years 1 to 9999); only an account's store checks
    // that it is after now, so an unknown account may be answered NOT_FOUND first.
    let expires_at = r.expires_at.map(|t| {
        let ms = i128::from(t.seconds) * 1_000 + i128::from(t.nanos / 1_000_000);
        if !(0..1_000_000_000).contains(&t.nanos)
            || !(-62_135_596_800..=253_402_300_799).contains(&t.seconds)
        {
            expect.fault("expires_at");
        }
        if ms <= i128::from(NOW.as_millis()) {
            expect.may_fault.push("expires_at");
        }
        ms
    });
    // The fixture's grant, asked again the same way, answers with its own lot.
    let replay = r.account_id == ACCOUNT && r.grant_id == GRANT;
    let asked = r.amount_micros;
    let result = edge.admin.grant_credits(Request::new(r)).await;
    expect.check(&result)?;
    let Ok(response) = result else { return Ok(()) };
    let resp = response.into_inner();
    balance("credit_balance_micros", resp.credit_balance_micros)?;
    let lot = resp.lot.unwrap_or_default();
    amount("granted_micros", lot.granted_micros)?;
    amount("remaining_micros", lot.remaining_micros)?;
    if !replay {
        prop_assert_eq!(lot.granted_micros, asked);
        if let Some(ms) = expires_at {
            prop_assert!(
                ms > i128::from(NOW.as_millis()),
                "a lot that expired already"
            );
            prop_assert_eq!(millis(lot.expires_at.as_ref()).map(i128::from), Some(ms));
        }
    }
    Ok(())
}

async fn revoke_grant(edge: &Edge, r: pb::RevokeGrantRequest) -> Result<(), TestCaseError> {
    let mut expect = Expect::new(&[Code::NotFound]);
    expect.id(&edge.policy, "account_id", &r.account_id);
    expect.id(&edge.policy, "grant_id", &r.grant_id);
    let result = edge.admin.revoke_grant(Request::new(r)).await;
    expect.check(&result)?;
    if let Ok(response) = result {
        amount("revoked_micros", response.get_ref().revoked_micros)?;
        balance(
            "credit_balance_micros",
            response.get_ref().credit_balance_micros,
        )?;
    }
    Ok(())
}

/// What SetAutoTopUp and PreviewAutoTopUp may answer to `r`.
fn top_up_expect(edge: &Edge, r: &pb::SetAutoTopUpRequest) -> Expect {
    let mut expect = Expect::new(&[Code::NotFound, Code::FailedPrecondition]);
    expect.id(&edge.policy, "account_id", &r.account_id);
    let exact = 0..=MAX_EXACT_MICROS;
    if !exact.contains(&r.threshold_micros) {
        expect.fault("threshold_micros");
    }
    if r.target_micros <= r.threshold_micros || !exact.contains(&r.target_micros) {
        expect.fault("target_micros");
    }
    if !exact.contains(&r.monthly_cap_micros) {
        expect.fault("monthly_cap_micros");
    }
    expect
}

async fn preview_auto_top_up(edge: &Edge, r: pb::SetAutoTopUpRequest) -> Result<(), TestCaseError> {
    let expect = top_up_expect(edge, &r);
    let result = edge
        .admin
        .preview_auto_top_up(Request::new(r.clone()))
        .await;
    expect.check(&result)?;
    let Ok(response) = result else { return Ok(()) };
    let preview = response.into_inner();
    balance("available_micros", preview.available_micros)?;
    let unit = edge.policy.top_up.purchase_unit_micros;
    prop_assert!((0..=r.target_micros + unit).contains(&preview.purchase_micros));
    prop_assert!(!preview.summary.is_empty());
    Ok(())
}

/// The account token keys the edge mints with, and the longest lifetime it gives.
const TOKEN_KEYS: &str = "k1:0123456789abcdef0123456789abcdef";
const TOKEN_MAX_TTL: u64 = 86_400;

async fn mint_account_token(
    edge: &Edge,
    r: pb::MintAccountTokenRequest,
) -> Result<(), TestCaseError> {
    let mut expect = Expect::new(&[Code::NotFound]);
    let known = |a: &String| crate::api::tokens::Ability::parse(a).is_some();
    if r.abilities.is_empty() || !r.abilities.iter().all(known) {
        expect.fault("abilities");
    } else if u64::from(r.ttl_seconds) > TOKEN_MAX_TTL {
        expect.fault("ttl_seconds");
    } else {
        expect.id(&edge.policy, "account_id", &r.account_id);
    }
    let result = edge.admin.mint_account_token(Request::new(r.clone())).await;
    expect.check(&result)?;
    let Ok(response) = result else { return Ok(()) };
    let minted = response.into_inner();
    let keys = crate::api::tokens::AccountTokens::parse(TOKEN_KEYS)
        .unwrap()
        .unwrap();
    let caller = keys
        .verify(&minted.token, crate::domain::Timestamp::from_millis(0))
        .map_err(|e| TestCaseError::fail(format!("a minted token does not verify: {e:?}")))?;
    prop_assert_eq!(caller.account_id, r.account_id);
    Ok(())
}

async fn set_auto_top_up(edge: &Edge, r: pb::SetAutoTopUpRequest) -> Result<(), TestCaseError> {
    let expect = top_up_expect(edge, &r);
    let asked = r;
    let result = edge
        .admin
        .set_auto_top_up(Request::new(asked.clone()))
        .await;
    expect.check(&result)?;
    let Ok(response) = result else { return Ok(()) };
    let resp = response.into_inner();
    prop_assert_eq!(
        (
            resp.enabled,
            resp.threshold_micros,
            resp.target_micros,
            resp.monthly_cap_micros
        ),
        (
            asked.enabled,
            asked.threshold_micros,
            asked.target_micros,
            asked.monthly_cap_micros
        )
    );
    // A purchase buys back up to the target, rounded up to the purchase unit.
    let unit = edge.policy.top_up.purchase_unit_micros;
    prop_assert!(
        (0..=resp.target_micros + unit).contains(&resp.in_flight_micros),
        "a purchase of {} for a target of {}",
        resp.in_flight_micros,
        resp.target_micros
    );
    Ok(())
}

async fn read_usage_export(
    edge: &Edge,
    r: pb::ReadUsageExportRequest,
) -> Result<(), TestCaseError> {
    let mut expect = Expect::new(&[]);
    expect.id(&edge.policy, "group", &r.group);
    expect.id(&edge.policy, "consumer", &r.consumer);
    if r.max_events > 1_000 {
        expect.fault("max_events");
    }
    let most = match r.max_events {
        0 => 100,
        n => n as usize,
    };
    let result = edge.admin.read_usage_export(Request::new(r)).await;
    expect.check(&result)?;
    if let Ok(response) = result {
        prop_assert!(response.get_ref().events.len() <= most);
    }
    Ok(())
}

async fn ack_usage_export(
    edge: &Edge,
    mut r: pb::AckUsageExportRequest,
) -> Result<(), TestCaseError> {
    let mut expect = Expect::new(&[]);
    expect.id(&edge.policy, "group", &r.group);
    if r.delivery_ids.len() > 1_000 {
        expect.fault("delivery_ids");
    }
    r.delivery_ids.iter_mut().for_each(|id| edge.resolve(id));
    let ids = r.delivery_ids.len() as u64;
    let result = edge.admin.ack_usage_export(Request::new(r)).await;
    expect.check(&result)?;
    if let Ok(response) = result {
        prop_assert!(response.get_ref().acknowledged <= ids);
    }
    Ok(())
}

async fn should_rate_limit(edge: &Edge, r: rls::RateLimitRequest) -> Result<(), TestCaseError> {
    use rls::rate_limit_service_server::RateLimitService;
    let mut expect = Expect::new(&[]);
    if r.domain.is_empty() {
        expect.fault("domain");
    }
    if r.descriptors.is_empty() {
        expect.fault("descriptors");
    }
    for (i, d) in r.descriptors.iter().enumerate() {
        if d.entries.is_empty() {
            expect.fault(format!("descriptors[{i}].entries"));
        }
        // A descriptor on the default rule names an account.
        if r.domain == "quotad" && d.entries.len() == 1 && d.entries[0].key == ACCOUNT_KEY {
            expect.id(
                &edge.policy,
                "descriptors.entries.account_id",
                &d.entries[0].value,
            );
        }
    }
    let descriptors = r.descriptors.len();
    let result = edge.rls.should_rate_limit(Request::new(r)).await;
    expect.check(&result)?;
    let Ok(response) = result else { return Ok(()) };
    let resp = response.into_inner();
    prop_assert_eq!(resp.statuses.len(), descriptors);
    let code = |c: i32| rate_limit_response::Code::try_from(c).ok();
    let over = resp
        .statuses
        .iter()
        .any(|s| code(s.code) == Some(rate_limit_response::Code::OverLimit));
    for s in &resp.statuses {
        prop_assert!(matches!(
            code(s.code),
            Some(rate_limit_response::Code::Ok | rate_limit_response::Code::OverLimit)
        ));
        if let Some(limit) = &s.current_limit {
            prop_assert!(s.limit_remaining <= limit.requests_per_unit);
        }
        if let Some(d) = &s.duration_until_reset {
            prop_assert!(d.seconds >= 0 && (0..1_000_000_000).contains(&d.nanos));
        }
    }
    prop_assert_eq!(
        code(resp.overall_code),
        Some(if over {
            rate_limit_response::Code::OverLimit
        } else {
            rate_limit_response::Code::Ok
        })
    );
    Ok(())
}

// ---- Generators ----

mod arb {
    use super::*;
    use proptest::collection::vec;
    use proptest::option;
    use proptest::sample::select;

    /// Any text: empty, short and plain, any characters (control, whitespace, unicode), and
    /// around and far past the id limit.
    pub fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z0-9_.:-]{1,12}",
            any::<String>(),
            vec(any::<char>(), 0..300).prop_map(String::from_iter),
            select(vec![
                " ".to_owned(),
                "a b".to_owned(),
                "a\u{0}b".to_owned(),
                "a\u{85}b".to_owned(),
                "é".repeat(64),
                "é".repeat(65),
                "x".repeat(128),
                "x".repeat(129),
                "x".repeat(100_000),
            ]),
        ]
    }

    /// Mostly one of `known`, else any text: a request needs all its ids right to get past
    /// the edge's checks.
    pub fn one_of(known: &[&str]) -> impl Strategy<Value = String> + use<> {
        let known: Vec<String> = known.iter().map(|s| (*s).to_owned()).collect();
        prop_oneof![3 => select(known), 1 => text()]
    }

    pub fn account_id() -> impl Strategy<Value = String> {
        one_of(&[ACCOUNT, "acct-2"])
    }

    pub fn u64_up_to(max: u64) -> impl Strategy<Value = u64> {
        prop_oneof![
            1 => select(vec![0, 1, max, max + 1, u64::MAX]),
            2 => 0..=max,
            1 => any::<u64>()
        ]
    }

    pub fn u32_up_to(max: u32) -> impl Strategy<Value = u32> {
        prop_oneof![
            1 => select(vec![0, 1, max, max + 1, u32::MAX]),
            2 => 0..=max,
            1 => any::<u32>()
        ]
    }

    pub fn micros() -> impl Strategy<Value = i64> {
        let max_grant = crate::domain::Limits::default().max_grant_micros;
        prop_oneof![
            select(vec![
                0,
                1,
                -1,
                i64::MIN,
                i64::MAX,
                i64::MAX - 1,
                MAX_EXACT_MICROS,
                MAX_EXACT_MICROS + 1,
                max_grant,
                max_grant + 1,
            ]),
            0..1_000 * C,
            any::<i64>(),
        ]
    }

    pub fn timestamp() -> impl Strategy<Value = crate::api::wkt::Timestamp> {
        let now = NOW.as_millis() / 1_000;
        let seconds = prop_oneof![
            select(vec![
                i64::MIN,
                i64::MAX,
                i64::MAX / 1_000,
                i64::MAX / 1_000 + 1,
                i64::MIN / 1_000,
                0,
                -62_135_596_800,
                253_402_300_799,
                253_402_300_800,
            ]),
            now - 10..now + 10,
            now..now + 400 * 24 * 3_600,
            any::<i64>(),
        ];
        let nanos = prop_oneof![
            0..1_000_000_000,
            select(vec![-1, 999_999_999, 1_000_000_000, i32::MIN, i32::MAX]),
            any::<i32>(),
        ];
        (seconds, nanos).prop_map(|(seconds, nanos)| crate::api::wkt::Timestamp { seconds, nanos })
    }

    pub fn usage() -> impl Strategy<Value = pb::Usage> {
        let max_tokens = crate::domain::Limits::default().max_tokens;
        let max_images = crate::domain::Limits::default().max_images;
        (
            one_of(&["gpt-5.5", "gpt-5.5-mini"]),
            u64_up_to(max_tokens),
            u64_up_to(max_tokens),
            u64_up_to(max_tokens),
            u32_up_to(max_images),
            any::<bool>(),
        )
            .prop_map(
                |(model, input, cached, output, images, fast_mode)| pb::Usage {
                    model,
                    input_tokens: input,
                    cached_input_tokens: cached,
                    output_tokens: output,
                    images,
                    fast_mode,
                },
            )
    }

    pub fn reserve() -> impl Strategy<Value = pb::ReserveRequest> {
        let max_ttl = crate::domain::Limits::default().max_ttl_seconds;
        (
            account_id(),
            one_of(&[REQUEST, "req-2"]),
            one_of(&["codex", "excel", "workspace_agents"]),
            option::of(usage()),
            one_of(&["", "free", "plus", "pro"]),
            u32_up_to(max_ttl),
        )
            .prop_map(
                |(account_id, request_id, product, estimate, plan_hint, ttl_seconds)| {
                    pb::ReserveRequest {
                        account_id,
                        request_id,
                        product,
                        estimate,
                        plan_hint,
                        ttl_seconds,
                    }
                },
            )
    }

    pub fn commit() -> impl Strategy<Value = pb::CommitRequest> {
        (
            account_id(),
            one_of(&[RESERVATION]),
            option::of(usage()),
            any::<bool>(),
        )
            .prop_map(
                |(account_id, reservation_id, usage, r#final)| pb::CommitRequest {
                    account_id,
                    reservation_id,
                    usage,
                    r#final,
                },
            )
    }

    pub fn release() -> impl Strategy<Value = pb::ReleaseRequest> {
        (account_id(), one_of(&[RESERVATION])).prop_map(|(account_id, reservation_id)| {
            pb::ReleaseRequest {
                account_id,
                reservation_id,
            }
        })
    }

    pub fn get_usage() -> impl Strategy<Value = pb::GetUsageRequest> {
        (account_id(), u32_up_to(100)).prop_map(|(account_id, recent_limit)| pb::GetUsageRequest {
            account_id,
            recent_limit,
        })
    }

    pub fn upsert_account() -> impl Strategy<Value = pb::UpsertAccountRequest> {
        option::of(
            (
                account_id(),
                one_of(&["free", "go", "plus", "pro"]),
                any::<bool>(),
            )
                .prop_map(|(account_id, plan, credit_purchase_allowed)| pb::Account {
                    account_id,
                    plan,
                    credit_purchase_allowed,
                }),
        )
        .prop_map(|account| pb::UpsertAccountRequest { account })
    }

    pub fn get_account() -> impl Strategy<Value = pb::GetAccountRequest> {
        account_id().prop_map(|account_id| pb::GetAccountRequest { account_id })
    }

    pub fn grant_credits() -> impl Strategy<Value = pb::GrantCreditsRequest> {
        (
            account_id(),
            one_of(&[GRANT, "grant-2"]),
            micros(),
            one_of(&["purchase", "promo", "auto_top_up", "adjustment"]),
            option::of(timestamp()),
        )
            .prop_map(
                |(account_id, grant_id, amount_micros, source, expires_at)| {
                    pb::GrantCreditsRequest {
                        account_id,
                        grant_id,
                        amount_micros,
                        source,
                        expires_at,
                    }
                },
            )
    }

    pub fn revoke_grant() -> impl Strategy<Value = pb::RevokeGrantRequest> {
        (account_id(), one_of(&[GRANT])).prop_map(|(account_id, grant_id)| pb::RevokeGrantRequest {
            account_id,
            grant_id,
        })
    }

    pub fn set_auto_top_up() -> impl Strategy<Value = pb::SetAutoTopUpRequest> {
        (account_id(), any::<bool>(), micros(), micros(), micros()).prop_map(
            |(account_id, enabled, threshold_micros, target_micros, monthly_cap_micros)| {
                pb::SetAutoTopUpRequest {
                    account_id,
                    enabled,
                    threshold_micros,
                    target_micros,
                    monthly_cap_micros,
                }
            },
        )
    }

    pub fn mint_account_token() -> impl Strategy<Value = pb::MintAccountTokenRequest> {
        let ability = prop_oneof![
            Just("read_usage".to_owned()),
            Just("change_top_up".to_owned()),
            ".{0,12}",
        ];
        let ttl = prop_oneof![Just(0u32), 1u32..=86_400, any::<u32>()];
        (account_id(), prop::collection::vec(ability, 0..4), ttl).prop_map(
            |(account_id, abilities, ttl_seconds)| pb::MintAccountTokenRequest {
                account_id,
                abilities,
                ttl_seconds,
            },
        )
    }

    pub fn read_usage_export() -> impl Strategy<Value = pb::ReadUsageExportRequest> {
        (
            one_of(&[GROUP]),
            one_of(&["reader"]),
            u32_up_to(1_000),
            any::<u32>(),
        )
            .prop_map(|(group, consumer, max_events, claim_idle_ms)| {
                pb::ReadUsageExportRequest {
                    group,
                    consumer,
                    max_events,
                    claim_idle_ms,
                }
            })
    }

    pub fn ack_usage_export() -> impl Strategy<Value = pb::AckUsageExportRequest> {
        let ids = prop_oneof![
            vec(one_of(&[DELIVERY, "0", "-1", "18446744073709551616"]), 0..4),
            (1_000usize..=1_001).prop_map(|n| vec![DELIVERY.to_owned(); n]),
        ];
        (one_of(&[GROUP]), ids).prop_map(|(group, delivery_ids)| pb::AckUsageExportRequest {
            group,
            delivery_ids,
        })
    }

    /// Mostly the descriptors the rules know (an address counted, an account, the path with
    /// the largest limit), else any entries; hits mostly at the extremes.
    fn descriptor() -> impl Strategy<Value = RateLimitDescriptor> {
        let entry = |key: &str, value: String| rate_limit_descriptor::Entry {
            key: key.into(),
            value,
        };
        let any_entry =
            (text(), text()).prop_map(|(key, value)| rate_limit_descriptor::Entry { key, value });
        let entries = prop_oneof![
            2 => one_of(&[ADDRESS]).prop_map(move |v| vec![entry(COUNTED_KEY, v)]),
            1 => account_id().prop_map(move |v| vec![entry(ACCOUNT_KEY, v)]),
            1 => Just(vec![entry("path", "/".into())]),
            1 => vec(any_entry, 0..3),
        ];
        let hits = prop_oneof![
            2 => select(vec![
                0,
                1,
                u64::from(u32::MAX),
                u64::from(u32::MAX) + 1,
                u64::MAX - 1,
                u64::MAX,
            ]),
            1 => 0..20u64,
            1 => any::<u64>(),
        ];
        let limit = (any::<u32>(), any::<u32>()).prop_map(|(requests_per_unit, unit)| {
            rate_limit_descriptor::RateLimitOverride {
                requests_per_unit,
                unit,
            }
        });
        (entries, option::of(limit), option::of(hits)).prop_map(|(entries, limit, hits_addend)| {
            RateLimitDescriptor {
                entries,
                limit,
                hits_addend,
            }
        })
    }

    pub fn rate_limit() -> impl Strategy<Value = rls::RateLimitRequest> {
        (
            one_of(&["quotad", COUNTED_DOMAIN]),
            vec(descriptor(), 0..4),
            u32_up_to(COUNTED_LIMIT),
        )
            .prop_map(|(domain, descriptors, hits_addend)| rls::RateLimitRequest {
                domain,
                descriptors,
                hits_addend,
            })
    }

    /// Bytes a decoder may meet: random ones, and the encoding of a generated message with a
    /// few bytes overwritten, inserted or cut off (which mostly still decodes, into something
    /// no generator above makes).
    pub fn bytes<M: Message + std::fmt::Debug>(
        message: impl Strategy<Value = M>,
    ) -> impl Strategy<Value = Vec<u8>> {
        let edit = (any::<prop::sample::Index>(), any::<u8>(), 0..3u8);
        prop_oneof![
            vec(any::<u8>(), 0..64),
            (message, vec(edit, 0..4)).prop_map(|(message, edits)| {
                let mut bytes = message.encode_to_vec();
                for (at, byte, how) in edits {
                    let i = at.index(bytes.len() + 1);
                    match how {
                        0 if i < bytes.len() => bytes[i] = byte,
                        1 => bytes.insert(i, byte),
                        _ => bytes.truncate(i),
                    }
                }
                bytes
            }),
        ]
    }
}

/// Decodes `bytes` as `M` and, when that succeeds, sends what came out.
fn decoded<M: Message + Default, F: Future<Output = Result<(), TestCaseError>>>(
    bytes: &[u8],
    call: impl FnOnce(Edge, M) -> F,
) -> Result<(), TestCaseError> {
    match M::decode(bytes) {
        Ok(message) => on_edge(|edge| call(edge, message)),
        Err(_) => Ok(()),
    }
}

/// Each case makes its edge and sends one request: well under a millisecond in a debug build,
/// so every property runs proptest's default 256 cases and all of them take about a second.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn reserve_any(r in arb::reserve()) {
        on_edge(|edge| async move { reserve(&edge, r).await })?;
    }

    #[test]
    fn reserve_bytes(bytes in arb::bytes(arb::reserve())) {
        decoded(&bytes, |edge, r| async move { reserve(&edge, r).await })?;
    }

    #[test]
    fn commit_any(r in arb::commit()) {
        on_edge(|edge| async move { commit(&edge, r).await })?;
    }

    #[test]
    fn commit_bytes(bytes in arb::bytes(arb::commit())) {
        decoded(&bytes, |edge, r| async move { commit(&edge, r).await })?;
    }

    #[test]
    fn release_any(r in arb::release()) {
        on_edge(|edge| async move { release(&edge, r).await })?;
    }

    #[test]
    fn release_bytes(bytes in arb::bytes(arb::release())) {
        decoded(&bytes, |edge, r| async move { release(&edge, r).await })?;
    }

    #[test]
    fn get_usage_any(r in arb::get_usage()) {
        on_edge(|edge| async move { get_usage(&edge, r).await })?;
    }

    #[test]
    fn get_usage_bytes(bytes in arb::bytes(arb::get_usage())) {
        decoded(&bytes, |edge, r| async move { get_usage(&edge, r).await })?;
    }

    #[test]
    fn upsert_account_any(r in arb::upsert_account()) {
        on_edge(|edge| async move { upsert_account(&edge, r).await })?;
    }

    #[test]
    fn upsert_account_bytes(bytes in arb::bytes(arb::upsert_account())) {
        decoded(&bytes, |edge, r| async move { upsert_account(&edge, r).await })?;
    }

    #[test]
    fn get_account_any(r in arb::get_account()) {
        on_edge(|edge| async move { get_account(&edge, r).await })?;
    }

    #[test]
    fn grant_credits_any(r in arb::grant_credits()) {
        on_edge(|edge| async move { grant_credits(&edge, r).await })?;
    }

    #[test]
    fn grant_credits_bytes(bytes in arb::bytes(arb::grant_credits())) {
        decoded(&bytes, |edge, r| async move { grant_credits(&edge, r).await })?;
    }

    #[test]
    fn revoke_grant_any(r in arb::revoke_grant()) {
        on_edge(|edge| async move { revoke_grant(&edge, r).await })?;
    }

    #[test]
    fn set_auto_top_up_any(r in arb::set_auto_top_up()) {
        on_edge(|edge| async move { set_auto_top_up(&edge, r).await })?;
    }

    #[test]
    fn set_auto_top_up_bytes(bytes in arb::bytes(arb::set_auto_top_up())) {
        decoded(&bytes, |edge, r| async move { set_auto_top_up(&edge, r).await })?;
    }

    #[test]
    fn preview_auto_top_up_any(r in arb::set_auto_top_up()) {
        on_edge(|edge| async move { preview_auto_top_up(&edge, r).await })?;
    }

    #[test]
    fn mint_account_token_any(r in arb::mint_account_token()) {
        on_edge(|edge| async move { mint_account_token(&edge, r).await })?;
    }

    #[test]
    fn read_usage_export_any(r in arb::read_usage_export()) {
        on_edge(|edge| async move { read_usage_export(&edge, r).await })?;
    }

    #[test]
    fn ack_usage_export_any(r in arb::ack_usage_export()) {
        on_edge(|edge| async move { ack_usage_export(&edge, r).await })?;
    }

    #[test]
    fn should_rate_limit_any(r in arb::rate_limit()) {
        on_edge(|edge| async move { should_rate_limit(&edge, r).await })?;
    }

    #[test]
    fn should_rate_limit_bytes(bytes in arb::bytes(arb::rate_limit())) {
        decoded(&bytes, |edge, r| async move { should_rate_limit(&edge, r).await })?;
    }

    /// The timestamp conversion alone: exact to the millisecond when it accepts, and a refusal
    /// that names the field when it does not.
    #[test]
    fn timestamps_convert_or_name_the_field(t in arb::timestamp()) {
        match super::from_timestamp("expires_at", &t) {
            Ok(at) => {
                prop_assert!((0..1_000_000_000).contains(&t.nanos));
                prop_assert_eq!(
                    i128::from(at.as_millis()),
                    i128::from(t.seconds) * 1_000 + i128::from(t.nanos / 1_000_000)
                );
            }
            Err(status) => {
                prop_assert_eq!(status.code(), Code::InvalidArgument);
                prop_assert!(status.message().starts_with("expires_at: "));
            }
        }
    }
}

// ---- Cases these properties found, kept as plain tests ----

/// A descriptor's `hits_addend` is a `u64`; more hits than any limit holds used to overflow
/// adding them to the counter (a panic in a debug build, a wrapped count in a release one).
#[test]
fn hits_past_any_limit_are_over_it() {
    use rls::rate_limit_service_server::RateLimitService;
    let descriptor = |key: &str, value: &str, hits: u64| RateLimitDescriptor {
        entries: vec![rate_limit_descriptor::Entry {
            key: key.into(),
            value: value.into(),
        }],
        limit: None,
        hits_addend: Some(hits),
    };
    let over = |descriptors: Vec<RateLimitDescriptor>| async {
        let request = rls::RateLimitRequest {
            domain: COUNTED_DOMAIN.into(),
            descriptors,
            hits_addend: 0,
        };
        let edge = Edge::new().await;
        let response = edge.rls.should_rate_limit(Request::new(request)).await;
        response.unwrap().into_inner().overall_code == rate_limit_response::Code::OverLimit as i32
    };
    block_on(async {
        // The address was counted once already.
        assert!(over(vec![descriptor(COUNTED_KEY, ADDRESS, u64::MAX)]).await);
        let twice = descriptor(COUNTED_KEY, "10.0.0.2", u64::MAX - 1);
        assert!(over(vec![twice.clone(), twice]).await);
        // The largest limit still admits exactly its size, and no more.
        let max = u64::from(u32::MAX);
        assert!(!over(vec![descriptor("path", "/", max)]).await);
        assert!(over(vec![descriptor("path", "/", max + 1)]).await);
        assert!(over(vec![descriptor("path", "/", u64::MAX)]).await);
    });
}

/// An auto top-up target near `i64::MAX` used to be accepted, and to overflow working out the
/// purchase of an account with next to no credits.
#[test]
fn top_up_amounts_past_the_exact_range_are_refused() {
    on_edge(|edge| async move {
        let empty = pb::Account {
            account_id: "acct-2".into(),
            plan: "plus".into(),
            credit_purchase_allowed: true,
        };
        edge.admin
            .upsert_account(Request::new(pb::UpsertAccountRequest {
                account: Some(empty),
            }))
            .await
            .unwrap();
        let set = |threshold_micros, target_micros| pb::SetAutoTopUpRequest {
            account_id: "acct-2".into(),
            enabled: true,
            threshold_micros,
            target_micros,
            monthly_cap_micros: 0,
        };
        let refused = edge
            .admin
            .set_auto_top_up(Request::new(set(C, i64::MAX)))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(
            refused.message().starts_with("target_micros: "),
            "{refused:?}"
        );
        // The largest target starts a purchase of all of it (rounded up to the purchase unit).
        let bought = edge
            .admin
            .set_auto_top_up(Request::new(set(C, MAX_EXACT_MICROS)))
            .await
            .unwrap()
            .into_inner();
        let unit = edge.policy.top_up.purchase_unit_micros;
        assert!(
            (MAX_EXACT_MICROS..MAX_EXACT_MICROS + unit).contains(&bought.in_flight_micros),
            "{bought:?}"
        );
        Ok(())
    })
    .unwrap();
}

/// A grant's expiry past year 9999 used to be kept, and shown in every GetUsage as a
/// Timestamp that clients checking its range cannot read.
#[test]
fn a_grant_expiring_past_year_9999_is_refused() {
    on_edge(|edge| async move {
        let grant = pb::GrantCreditsRequest {
            account_id: ACCOUNT.into(),
            grant_id: "grant-2".into(),
            amount_micros: C,
            source: String::new(),
            expires_at: Some(crate::api::wkt::Timestamp {
                seconds: i64::MAX / 1_000,
                nanos: 0,
            }),
        };
        let refused = edge
            .admin
            .grant_credits(Request::new(grant))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().starts_with("expires_at: "), "{refused:?}");
        Ok(())
    })
    .unwrap();
}
