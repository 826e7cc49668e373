//! What the Lua scripts answer, as JSON, and how it becomes the domain's outcome types. The
//! scripts return facts (amounts, instants, kinds); words are added here by the same domain
//! functions the memory store uses, so both stores answer in the same sentences.

use serde::{Deserialize, Serialize};

use crate::domain::top_up::{AttemptOutcome, Purchase, TopUpAttempt, TopUpSettings};
use crate::domain::{
    Account, AccountStatus, Action, CommitReceipt, CreditLot, Decision, Denial, DenialFacts,
    DomainError, Funding, HoldView, LedgerTotals, Policy, Shortfall, Timestamp, Usage, UsageEvent,
    UsageSnapshot, WindowStatus,
};
use crate::domain::{FIVE_HOUR, TopUpView, WEEKLY};

/// A script's answer: its result, or a refusal of the rules.
#[derive(Debug)]
pub enum Reply<T> {
    Refused { err: Refusal },
    Done(T),
}

/// Reads a script's answer. A refusal is the scripts' `{"err": …}` and nothing else starts so,
/// which lets a result be read straight into its type (an untagged enum would buffer every
/// answer into an intermediate tree and read it again).
pub fn decode_reply<T: serde::de::DeserializeOwned>(text: &str) -> serde_json::Result<Reply<T>> {
    #[derive(Deserialize)]
    struct Refused {
        err: Refusal,
    }
    if text.starts_with(r#"{"err":"#) {
        let Refused { err } = serde_json::from_str(text)?;
        return Ok(Reply::Refused { err });
    }
    serde_json::from_str(text).map(Reply::Done)
}

/// A refusal, as a kind and the facts its words need.
#[derive(Debug, Deserialize)]
pub struct Refusal {
    kind: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    plan: String,
    #[serde(default)]
    at: i64,
    #[serde(default)]
    by_commit: bool,
}

impl Refusal {
    pub fn into_error(
        self,
        policy: &Policy,
        account_id: &str,
        now: Timestamp,
    ) -> Result<DomainError, String> {
        Ok(match self.kind.as_str() {
            "account_not_found" => DomainError::account_not_found(&self.id),
            "reservation_not_found" => DomainError::reservation_not_found(&self.id),
            "request_reused" => DomainError::request_reused(&self.id),
            "grant_reused" => DomainError::grant_reused(&self.id),
            "grant_not_found" => DomainError::grant_not_found(&self.id),
            "already_committed" => DomainError::already_committed(&self.id, self.by_commit),
            "already_released" => DomainError::already_released(&self.id),
            "reservation_expired" => {
                DomainError::reservation_expired(&self.id, Timestamp::from_millis(self.at))
            }
            "plan_missing" => {
                DomainError::plan_not_configured(account_id, &self.plan, &policy.plan_names())
            }
            "lifetime_grants_too_large" => DomainError::lifetime_grants_too_large(),
            "top_up_not_allowed" => DomainError::top_up_not_allowed(&self.id, &self.plan),
            "expiry_not_in_future" => {
                DomainError::expiry_not_in_future(now, Timestamp::from_millis(self.at))
            }
            other => return Err(format!("script answered an unknown refusal kind {other:?}")),
        })
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct FundingJ {
    plan: i64,
    credit: i64,
}

impl From<FundingJ> for Funding {
    fn from(f: FundingJ) -> Funding {
        Funding::new(f.plan, f.credit)
    }
}

#[derive(Debug, Deserialize)]
pub struct WindowJ {
    name: String,
    used: i64,
    held: i64,
    limit: i64,
    resets_at: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct StatusJ {
    plan: String,
    windows: Vec<WindowJ>,
    balance: i64,
}

impl From<StatusJ> for AccountStatus {
    fn from(s: StatusJ) -> AccountStatus {
        let windows = s
            .windows
            .into_iter()
            .map(|w| WindowStatus {
                name: if w.name == WEEKLY.name {
                    WEEKLY.name
                } else {
                    FIVE_HOUR.name
                },
                used: w.used,
                held: w.held,
                limit: w.limit,
                resets_at: w.resets_at.map(Timestamp::from_millis),
            })
            .collect();
        AccountStatus {
            plan: crate::domain::intern(&s.plan),
            windows,
            credit_balance: s.balance,
        }
    }
}

/// The facts of a denial, as `fund` in the prelude computes them.
#[derive(Debug, Deserialize)]
pub struct FactsJ {
    shortfall: String,
    #[serde(default)]
    weekly: bool,
    #[serde(default)]
    need: i64,
    #[serde(default)]
    available: i64,
    action: String,
    upgrade_to: Option<String>,
    retry_at: Option<i64>,
    plan: String,
    product: String,
}

impl FactsJ {
    pub fn into_denial(self, policy: &Policy) -> Denial {
        let shortfall = match self.shortfall.as_str() {
            "credits" => Shortfall::Credits {
                need: self.need,
                available: self.available,
            },
            "barred" => Shortfall::CreditsBarred,
            _ => Shortfall::Window {
                weekly: self.weekly,
            },
        };
        let action = match self.action.as_str() {
            "buy_credits" => Action::BuyCredits,
            "upgrade_plan" => Action::UpgradePlan,
            "update_payment_method" => Action::UpdatePaymentMethod,
            _ => Action::WaitForReset,
        };
        Denial::from_facts(DenialFacts {
            plan: &self.plan,
            product: &self.product,
            product_credits: policy.product(&self.product).is_some_and(|p| p.credits),
            shortfall,
            action,
            upgrade_to: self.upgrade_to,
            retry_at: self.retry_at.map(Timestamp::from_millis),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionJ {
    Allow {
        id: String,
        held: FundingJ,
        expires_at: i64,
    },
    Deny(FactsJ),
}

impl DecisionJ {
    pub fn into_decision(self, policy: &Policy) -> Decision {
        match self {
            DecisionJ::Allow {
                id,
                held,
                expires_at,
            } => Decision::Allow {
                reservation_id: id.into(),
                held: held.into(),
                expires_at: Timestamp::from_millis(expires_at),
            },
            DecisionJ::Deny(facts) => Decision::Deny(Box::new(facts.into_denial(policy))),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ReserveJ {
    pub decision: DecisionJ,
    pub estimate: i64,
    pub status: StatusJ,
    pub top_up: Option<PurchaseJ>,
    /// Short of credits while a purchase is in flight, and not recorded.
    #[serde(default)]
    pub awaiting: bool,
    /// Allowed by shadow mode: the denial it would have had.
    pub shadow: Option<FactsJ>,
}

#[derive(Debug, Deserialize)]
pub struct ReceiptJ {
    #[serde(rename = "final")]
    is_final: bool,
    charged: FundingJ,
    total: FundingJ,
    held: Option<FundingJ>,
    expires_at: Option<i64>,
    denial: Option<FactsJ>,
}

impl ReceiptJ {
    pub fn into_receipt(self, policy: &Policy) -> CommitReceipt {
        if self.is_final {
            return CommitReceipt::finished(self.charged.into(), self.total.into());
        }
        CommitReceipt::continuing(
            self.charged.into(),
            self.total.into(),
            self.held.map_or(Funding::ZERO, Into::into),
            Timestamp::from_millis(self.expires_at.unwrap_or_default()),
            self.denial.map(|d| d.into_denial(policy)),
        )
    }
}

#[derive(Debug, Deserialize)]
pub struct CommitJ {
    pub receipt: ReceiptJ,
    pub status: StatusJ,
    pub top_up: Option<PurchaseJ>,
    pub event: Option<EventJ>,
    /// The next chunk funded by shadow mode: the denial it would have had.
    pub shadow: Option<FactsJ>,
}

#[derive(Debug, Deserialize)]
pub struct ReleaseJ {
    pub released: FundingJ,
}

#[derive(Debug, Deserialize)]
pub struct RevokeJ {
    pub revoked: i64,
    pub balance: i64,
    pub top_up: Option<PurchaseJ>,
}

#[derive(Debug, Deserialize)]
pub struct LotJ {
    id: String,
    source: String,
    granted: i64,
    remaining: i64,
    granted_at: i64,
    expires_at: i64,
}

impl TryFrom<LotJ> for CreditLot {
    type Error = String;

    fn try_from(l: LotJ) -> Result<CreditLot, String> {
        Ok(CreditLot {
            source: l
                .source
                .parse()
                .map_err(|()| format!("lot {:?} has unknown source {:?}", l.id, l.source))?,
            id: l.id,
            granted: l.granted,
            remaining: l.remaining,
            granted_at: Timestamp::from_millis(l.granted_at),
            expires_at: Timestamp::from_millis(l.expires_at),
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct GrantJ {
    pub lot: LotJ,
    pub balance: i64,
}

#[derive(Debug, Deserialize)]
pub struct AccountJ {
    id: String,
    plan: String,
    cpa: bool,
}

impl From<AccountJ> for Account {
    fn from(a: AccountJ) -> Account {
        Account {
            id: a.id,
            plan: crate::domain::intern(&a.plan),
            credit_purchase_allowed: a.cpa,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct AccountReply {
    pub account: AccountJ,
}

#[derive(Debug, Deserialize)]
pub struct UsageJ {
    i: i64,
    c: i64,
    o: i64,
    img: i64,
    model: String,
    fast: bool,
}

#[derive(Debug, Deserialize)]
pub struct EventJ {
    seq: u64,
    at: i64,
    product: String,
    reservation_id: String,
    price_version: String,
    charged: FundingJ,
    usage: UsageJ,
}

impl From<EventJ> for UsageEvent {
    fn from(e: EventJ) -> UsageEvent {
        let count = |n: i64| u64::try_from(n).unwrap_or_default();
        UsageEvent {
            seq: e.seq,
            at: Timestamp::from_millis(e.at),
            product: crate::domain::intern(&e.product),
            usage: Usage {
                model: crate::domain::intern(&e.usage.model),
                input_tokens: count(e.usage.i),
                cached_input_tokens: count(e.usage.c),
                output_tokens: count(e.usage.o),
                images: u32::try_from(e.usage.img).unwrap_or_default(),
                fast_mode: e.usage.fast,
            },
            charged: e.charged.into(),
            reservation_id: e.reservation_id.into(),
            price_version: crate::domain::intern(&e.price_version),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct HoldJ {
    id: String,
    product: String,
    held: FundingJ,
    charged: FundingJ,
    expires_at: i64,
}

impl From<HoldJ> for HoldView {
    fn from(h: HoldJ) -> HoldView {
        HoldView {
            reservation_id: h.id,
            product: h.product,
            held: h.held.into(),
            charged: h.charged.into(),
            expires_at: Timestamp::from_millis(h.expires_at),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct TotalsJ {
    granted: i64,
    spent: i64,
    expired: i64,
    revoked: i64,
    balance: i64,
}

impl From<TotalsJ> for LedgerTotals {
    fn from(t: TotalsJ) -> LedgerTotals {
        LedgerTotals {
            granted: t.granted,
            spent: t.spent,
            expired: t.expired,
            revoked: t.revoked,
            balance: t.balance,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct SnapshotJ {
    pub account: AccountJ,
    pub status: StatusJ,
    pub lots: Vec<LotJ>,
    pub recent: Vec<EventJ>,
    pub holds: Vec<HoldJ>,
    pub totals: TotalsJ,
    pub credit_held: i64,
    pub top_up: TopUpViewJ,
    /// The first instant at which time alone changes the snapshot, if any.
    pub stable_until: Option<i64>,
}

impl SnapshotJ {
    pub fn into_snapshot(self) -> Result<UsageSnapshot, String> {
        Ok(UsageSnapshot {
            account: self.account.into(),
            status: self.status.into(),
            lots: self
                .lots
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            recent: self.recent.into_iter().map(Into::into).collect(),
            totals: self.totals.into(),
            credit_held: self.credit_held,
            holds: self.holds.into_iter().map(Into::into).collect(),
            top_up: self.top_up.into(),
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct PurchaseJ {
    id: String,
    amount: i64,
    started_at: i64,
}

impl From<PurchaseJ> for Purchase {
    fn from(p: PurchaseJ) -> Purchase {
        Purchase {
            id: p.id,
            amount: p.amount,
            started_at: Timestamp::from_millis(p.started_at),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct AttemptJ {
    at: i64,
    amount: i64,
    outcome: String,
    error: String,
    payment_id: String,
}

impl From<AttemptJ> for TopUpAttempt {
    fn from(a: AttemptJ) -> TopUpAttempt {
        let outcome = match a.outcome.as_str() {
            "succeeded" => AttemptOutcome::Succeeded,
            "declined" => AttemptOutcome::Declined,
            "failed" => AttemptOutcome::Failed,
            "capped" => AttemptOutcome::Capped,
            _ => AttemptOutcome::Pending,
        };
        TopUpAttempt {
            at: Timestamp::from_millis(a.at),
            amount: a.amount,
            outcome,
            error: a.error,
            payment_id: a.payment_id,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct TopUpViewJ {
    enabled: bool,
    threshold: i64,
    target: i64,
    cap: Option<i64>,
    declines: u32,
    last: Option<AttemptJ>,
    in_flight: Option<PurchaseJ>,
}

impl From<TopUpViewJ> for TopUpView {
    fn from(v: TopUpViewJ) -> TopUpView {
        TopUpView {
            settings: TopUpSettings::stored(v.enabled, v.threshold, v.target, v.cap),
            last_attempt: v.last.map(Into::into),
            consecutive_declines: v.declines,
            in_flight: v.in_flight.map(Into::into),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct TopUpJ {
    pub view: TopUpViewJ,
    pub top_up: Option<PurchaseJ>,
    pub balance: i64,
}

impl From<TopUpJ> for crate::domain::TopUpOutcome {
    fn from(t: TopUpJ) -> crate::domain::TopUpOutcome {
        crate::domain::TopUpOutcome {
            view: t.view.into(),
            top_up: t.top_up.map(Into::into),
            credit_balance: t.balance,
        }
    }
}

/// One usage event as written to the export stream (field `event`): the format consumers read,
/// documented in the README; plain names, amounts in micro-credits, counts as numbers.
#[derive(Debug, Serialize, Deserialize)]
struct ExportJ {
    id: String,
    account_id: String,
    seq: u64,
    at_ms: i64,
    product: String,
    model: String,
    input_tokens: u64,
    cached_input_tokens: u64,
    output_tokens: u64,
    images: u32,
    fast_mode: bool,
    plan_micros: i64,
    credit_micros: i64,
    reservation_id: String,
    price_version: String,
}

pub fn export_json(account_id: &str, e: &UsageEvent) -> String {
    let j = ExportJ {
        id: e.id(account_id),
        account_id: account_id.to_owned(),
        seq: e.seq,
        at_ms: e.at.as_millis(),
        product: e.product.to_string(),
        model: e.usage.model.to_string(),
        input_tokens: e.usage.input_tokens,
        cached_input_tokens: e.usage.cached_input_tokens,
        output_tokens: e.usage.output_tokens,
        images: e.usage.images,
        fast_mode: e.usage.fast_mode,
        plan_micros: e.charged.plan,
        credit_micros: e.charged.credit,
        reservation_id: e.reservation_id.to_string(),
        price_version: e.price_version.to_string(),
    };
    serde_json::to_string(&j).expect("plain data serializes")
}

pub fn parse_export_json(text: &str) -> Result<(String, UsageEvent), serde_json::Error> {
    let j: ExportJ = serde_json::from_str(text)?;
    let event = UsageEvent {
        seq: j.seq,
        at: Timestamp::from_millis(j.at_ms),
        product: crate::domain::intern(&j.product),
        usage: Usage {
            model: crate::domain::intern(&j.model),
            input_tokens: j.input_tokens,
            cached_input_tokens: j.cached_input_tokens,
            output_tokens: j.output_tokens,
            images: j.images,
            fast_mode: j.fast_mode,
        },
        charged: Funding::new(j.plan_micros, j.credit_micros),
        reservation_id: j.reservation_id.into(),
        price_version: crate::domain::intern(&j.price_version),
    };
    Ok((j.account_id, event))
}

/// One counter's answer from `rls.lua`.
#[derive(Debug, Deserialize)]
pub struct RlsJ {
    over: u8,
    remaining: u64,
    reset_in: i64,
}

impl From<RlsJ> for crate::domain::rls::CounterStatus {
    fn from(r: RlsJ) -> Self {
        crate::domain::rls::CounterStatus {
            over: r.over != 0,
            remaining: r.remaining,
            reset_in_ms: r.reset_in,
        }
    }
}
