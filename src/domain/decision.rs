//! What the rules answer: commands in, decisions and outcomes out. These are plain values, the
//! same whichever store computed them, so the API edge converts them without knowing the store.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};

use super::fingerprint::Fingerprint;
use super::ledger::{CreditLot, LedgerTotals, LotSource};
use super::money::{Credits, Funding, Micros, Money};
use super::pricing::Usage;
use super::time::Timestamp;
use super::top_up::{PaymentResult, Purchase, TopUpAttempt, TopUpSettings};

/// Reserve, after validation and pricing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveCommand {
    pub account_id: String,
    pub request_id: String,
    pub product: String,
    pub estimate: Usage,
    /// The estimate's price.
    pub cost: Micros,
    /// Plan of an account seen for the first time; `None` means the default plan.
    pub plan_hint: Option<String>,
    pub ttl_ms: i64,
    /// Id the reservation gets if this request creates one (a retry keeps the first one's).
    pub reservation_id: String,
    /// If credits are short while an auto top-up purchase is in flight, answer without
    /// recording the answer, so that the caller may wait for the purchase and ask again.
    pub wait_for_top_up: bool,
}

impl ReserveCommand {
    pub fn fingerprint(&self) -> u64 {
        usage_fingerprint(Fingerprint::default().str(&self.product), &self.estimate)
            .str(self.plan_hint.as_deref().unwrap_or(""))
            .i64(self.ttl_ms)
            .finish()
    }
}

/// Commit, after validation and pricing. `usage` and `cost` are cumulative for the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitCommand {
    pub account_id: String,
    pub reservation_id: String,
    pub usage: Usage,
    pub cost: Micros,
    pub is_final: bool,
    pub price_version: String,
}

impl CommitCommand {
    pub fn fingerprint(&self) -> u64 {
        usage_fingerprint(Fingerprint::default(), &self.usage)
            .u64(u64::from(self.is_final))
            .finish()
    }
}

fn usage_fingerprint(f: Fingerprint, u: &Usage) -> Fingerprint {
    f.str(&u.model)
        .u64(u.input_tokens)
        .u64(u.cached_input_tokens)
        .u64(u.output_tokens)
        .u64(u64::from(u.images))
        .u64(u64::from(u.fast_mode))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseCommand {
    pub account_id: String,
    pub reservation_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantCommand {
    pub account_id: String,
    pub grant_id: String,
    pub amount: Micros,
    pub source: LotSource,
    /// `None`: 12 months after the grant.
    pub expires_at: Option<Timestamp>,
}

impl GrantCommand {
    pub fn fingerprint(&self) -> u64 {
        Fingerprint::default()
            .i64(self.amount)
            .str(self.source.as_str())
            .i64(self.expires_at.map_or(i64::MIN, Timestamp::as_millis))
            .finish()
    }
}

/// An account as the back office sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: String,
    /// Interned (see [`intern`]): a plan is one of a few configured names.
    #[serde(deserialize_with = "interned")]
    pub plan: Arc<str>,
    pub credit_purchase_allowed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DenyReason {
    WindowExhausted,
    WeeklyExhausted,
    CreditsExhausted,
    CreditsNotAllowed,
}

/// What the frontend should offer the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    UpgradePlan,
    BuyCredits,
    WaitForReset,
    UpdatePaymentMethod,
}

/// Why work may not go on, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    pub reason: DenyReason,
    pub action: Action,
    pub upgrade_to: Option<String>,
    /// Earliest instant at which the plan windows can fund the work again.
    pub retry_at: Option<Timestamp>,
    /// A sentence a frontend can show.
    pub message: String,
}

/// What was missing when work could not be funded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// The plan is used up and credits do not cover the rest.
    Credits { need: Micros, available: Micros },
    /// The plan is used up and the account may not use credits.
    CreditsBarred,
    /// The plan is used up and this product has no credit route; `weekly` when the weekly
    /// window is the one that binds.
    Window { weekly: bool },
}

/// Everything a denial says, before it is put into words. Stores compute the facts; the words
/// are made here, once, so every store denies in the same sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenialFacts<'a> {
    pub plan: &'a str,
    pub product: &'a str,
    pub product_credits: bool,
    pub shortfall: Shortfall,
    pub action: Action,
    pub upgrade_to: Option<String>,
    pub retry_at: Option<Timestamp>,
}

impl Denial {
    pub fn from_facts(f: DenialFacts<'_>) -> Denial {
        let when = |lead: &str| {
            f.retry_at
                .map(|t| format!("{lead} {t}"))
                .unwrap_or_default()
        };
        let plan = f.plan;
        let (reason, message) = match f.shortfall {
            Shortfall::Credits { need, available } => (
                DenyReason::CreditsExhausted,
                format!(
                    "What is left of your {plan} plan's included usage and your credits do not cover this task \
                     ({} credits needed from credits, {} available). Buy credits to keep going{}.",
                    Credits(need),
                    Credits(available),
                    when(", or wait until")
                ),
            ),
            shortfall => {
                let (reason, why) = match shortfall {
                    Shortfall::Window { weekly } => {
                        let period = if weekly {
                            "this week"
                        } else {
                            "this 5-hour window"
                        };
                        let reason = if weekly {
                            DenyReason::WeeklyExhausted
                        } else {
                            DenyReason::WindowExhausted
                        };
                        let why = if f.product_credits || f.action != Action::WaitForReset {
                            format!(
                                "What is left of your {plan} plan's included usage for {period} does not cover this task."
                            )
                        } else {
                            format!(
                                "What is left of your {plan} plan's included usage for {period} does not cover this task, and {} cannot run on credits.",
                                f.product
                            )
                        };
                        (reason, why)
                    }
                    _ => (
                        DenyReason::CreditsNotAllowed,
                        format!(
                            "What is left of your {plan} plan's included usage does not cover this task, and this account cannot buy credits."
                        ),
                    ),
                };
                let next = match &f.upgrade_to {
                    Some(to) => format!(" Upgrade to {to} for more{}.", when(", or try again at")),
                    None if f.retry_at.is_some() => format!("{}.", when(" Try again at")),
                    None => String::new(),
                };
                (reason, why + &next)
            }
        };
        Denial {
            reason,
            action: f.action,
            upgrade_to: f.upgrade_to,
            retry_at: f.retry_at,
            message,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Allow {
        /// Shared with the account's records of the reservation.
        reservation_id: Arc<str>,
        held: Funding,
        expires_at: Timestamp,
    },
    /// Boxed: first answers are kept for retries, and most of them are allows.
    Deny(Box<Denial>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowStatus {
    pub name: &'static str,
    /// Committed usage in the window plus open holds on the plan.
    pub used: Micros,
    /// The part of `used` that is open holds.
    pub held: Micros,
    pub limit: Micros,
    /// When the committed usage counted now has all left the window.
    pub resets_at: Option<Timestamp>,
}

/// An account's windows and balance right after an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountStatus {
    /// The account's plan (for metrics and logs).
    pub plan: Arc<str>,
    pub windows: Vec<WindowStatus>,
    pub credit_balance: Micros,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveOutcome {
    pub decision: Decision,
    pub estimate: Micros,
    pub status: AccountStatus,
    /// An auto top-up purchase this operation started: the caller has it paid.
    pub top_up: Option<Purchase>,
    /// Denied for want of credits while a purchase is in flight, and not recorded (the request
    /// asked to wait for top-ups): ask again shortly.
    pub awaiting_top_up: bool,
    /// Shadow mode: allowed only because the account's plan is in shadow mode; this is the
    /// denial it would have had. Set on the first answer only (a retry repeats the ALLOW).
    pub shadow_denial: Option<Box<Denial>>,
}

/// What a Commit did; kept with a finished reservation so a retry gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReceipt {
    pub charged: Funding,
    pub charged_total: Funding,
    pub held: Funding,
    pub expires_at: Option<Timestamp>,
    pub may_continue: bool,
    /// Set when the next chunk of the task is not funded (boxed: rare, and receipts are kept
    /// for retries, one per finished task).
    pub denial: Option<Box<Denial>>,
}

impl CommitReceipt {
    /// The receipt of a final commit.
    pub fn finished(charged: Funding, charged_total: Funding) -> CommitReceipt {
        CommitReceipt {
            charged,
            charged_total,
            held: Funding::ZERO,
            expires_at: None,
            may_continue: false,
            denial: None,
        }
    }

    /// A sentence a frontend can show, from the receipt's facts (not stored: receipts are kept
    /// for retries, and the words are the same every time).
    pub fn message(&self) -> String {
        match (&self.denial, self.expires_at) {
            (Some(denial), _) => denial.message.clone(),
            (None, None) => format!(
                "Task finished: {} credits charged in all.",
                Credits(self.charged_total.total())
            ),
            (None, Some(_)) if self.held.credit > 0 => {
                "The plan's included usage is used up; the task continues on credits.".into()
            }
            (None, Some(_)) => String::new(),
        }
    }

    /// The receipt of a partial commit: the renewed hold, or why the next chunk is not funded.
    pub fn continuing(
        charged: Funding,
        charged_total: Funding,
        held: Funding,
        expires_at: Timestamp,
        denial: Option<Denial>,
    ) -> CommitReceipt {
        CommitReceipt {
            charged,
            charged_total,
            held,
            expires_at: Some(expires_at),
            may_continue: denial.is_none(),
            denial: denial.map(Box::new),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    pub receipt: CommitReceipt,
    pub status: AccountStatus,
    /// An auto top-up purchase this operation started: the caller has it paid.
    pub top_up: Option<Purchase>,
    /// The usage event this commit recorded (none when it charged nothing, or was a retry).
    pub event: Option<UsageEvent>,
    /// Shadow mode: the next chunk was funded only because the plan is in shadow mode; this
    /// is why it would not have been.
    pub shadow_denial: Option<Box<Denial>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseOutcome {
    pub released: Funding,
}

/// RevokeGrant: take back what is left of a grant's lot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeCommand {
    pub account_id: String,
    pub grant_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeOutcome {
    /// What the revocation took back (the same on every retry).
    pub revoked: Micros,
    pub credit_balance: Micros,
    /// An auto top-up purchase this operation started: the caller has it paid.
    pub top_up: Option<Purchase>,
}

/// SetAutoTopUp; its settings' shape was checked when they were made
/// ([`TopUpSettings::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetTopUpCommand {
    pub account_id: String,
    pub settings: TopUpSettings,
}

/// The outcome of a payment, to settle the purchase it paid for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleTopUpCommand {
    pub account_id: String,
    pub purchase_id: String,
    pub result: PaymentResult,
}

/// An account's auto top-up, as GetUsage and SetAutoTopUp show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopUpView {
    pub settings: TopUpSettings,
    pub last_attempt: Option<TopUpAttempt>,
    pub consecutive_declines: u32,
    pub in_flight: Option<Purchase>,
}

impl Default for TopUpView {
    /// An account that never configured auto top-up.
    fn default() -> Self {
        TopUpView {
            settings: TopUpSettings::UNSET,
            last_attempt: None,
            consecutive_declines: 0,
            in_flight: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopUpOutcome {
    pub view: TopUpView,
    /// A purchase this call started (turning it on below the threshold): the caller has it paid.
    pub top_up: Option<Purchase>,
    pub credit_balance: Micros,
}

/// What saving auto top-up settings would do now, worked out by the rule that saving runs
/// ([`AccountState::preview_top_up`](super::AccountState::preview_top_up)); nothing is changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopUpPreview {
    /// The settings and state as saving would leave them.
    pub view: TopUpView,
    /// Credits available now (the balance less what open holds keep): what the threshold is
    /// compared with.
    pub available: Micros,
    /// What saving would buy at once with the default payment method.
    pub purchase: Option<Micros>,
    /// What that purchase would be charged, at the configured price of credits.
    pub purchase_price: Option<Money>,
    /// A purchase already being paid, which saving would not repeat.
    pub in_flight: Option<Micros>,
}

impl TopUpPreview {
    /// The preview in words, for the person about to save (amounts in credits, exact).
    pub fn summary(&self) -> String {
        let settings = self.view.settings;
        let balance = format!("your balance is {} credits", Credits(self.available));
        let threshold = Credits(settings.threshold());
        if !settings.enabled() {
            return format!("{balance}; auto top-up stays off: saving buys nothing");
        }
        if self.available >= settings.threshold() {
            return format!(
                "{balance}, at or above the {threshold}-credit threshold: saving buys nothing now; \
                 below it, auto top-up buys back up to {} credits",
                Credits(settings.target())
            );
        }
        match (self.purchase, self.in_flight) {
            (Some(amount), _) => {
                let capped = (self.view.last_attempt.as_ref())
                    .filter(|a| a.outcome == super::top_up::AttemptOutcome::Capped)
                    .map_or(String::new(), |_| {
                        " (as much as this month's cap allows)".into()
                    });
                let price = (self.purchase_price).map_or(String::new(), |p| format!(" for {p}"));
                format!(
                    "{balance}, below the {threshold}-credit threshold: saving buys {} credits\
                     {price} now with your default payment method{capped}",
                    Credits(amount)
                )
            }
            (None, Some(paying)) => format!(
                "{balance}, below the {threshold}-credit threshold: a purchase of {} credits is \
                 already being paid, so saving buys nothing more now",
                Credits(paying)
            ),
            (None, None) => format!(
                "{balance}, below the {threshold}-credit threshold, but saving buys nothing now \
                 (this month's cap is reached, or a declined payment holds purchases back)"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantOutcome {
    /// The lot as granted (its remaining amount is after any debt it paid off).
    pub lot: CreditLot,
    pub credit_balance: Micros,
}

/// One charge, as recorded in an account's recent history and in the usage export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// The account's charges are numbered from 1, in the order they were made.
    pub seq: u64,
    pub at: Timestamp,
    /// Interned (see [`intern`]): every account's history names the same few products.
    #[serde(deserialize_with = "interned")]
    pub product: Arc<str>,
    /// Usage added by this charge (the difference between cumulative commits).
    pub usage: Usage,
    pub charged: Funding,
    /// Shared with the account's records of the reservation.
    pub reservation_id: Arc<str>,
    /// Interned, like `product`.
    #[serde(deserialize_with = "interned")]
    pub price_version: Arc<str>,
}

/// One shared copy of a short string that many records repeat (product names, price sheet
/// versions: a handful of values from config), instead of one allocation per record.
pub fn intern(text: &str) -> Arc<str> {
    // Sharded: this runs on every charge, on every core.
    static TABLE: std::sync::LazyLock<dashmap::DashSet<Arc<str>>> =
        std::sync::LazyLock::new(Default::default);
    if let Some(shared) = TABLE.get(text) {
        return shared.clone();
    }
    let shared: Arc<str> = Arc::from(text);
    TABLE.insert(shared.clone());
    shared
}

/// Deserializes a string field that is [`intern`]ed in memory, so that reading back a million
/// stored accounts keeps one copy of each plan, product, model and price version, as making them
/// did. A borrowed string is interned without an intermediate allocation.
pub(crate) fn interned<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
    struct Interned;
    impl serde::de::Visitor<'_> for Interned {
        type Value = Arc<str>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Arc<str>, E> {
            Ok(intern(text))
        }
    }
    d.deserialize_str(Interned)
}

impl UsageEvent {
    /// What recording a charge keeps true: numbered from 1, for an amount in range.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.seq == 0 || self.seq > i64::MAX as u64 {
            return Err(format!("event number {} is out of range", self.seq));
        }
        self.charged.check("charged")
    }

    /// The event's unique id, `ACCOUNT:SEQ`, by which export consumers deduplicate. The
    /// sequence number has no `:`, so the id is unique even when account ids contain one.
    pub fn id(&self, account_id: &str) -> String {
        format!("{account_id}:{}", self.seq)
    }
}

/// One usage event as delivered from the export stream to a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedEvent {
    /// What the consumer acknowledges (the stream entry); opaque.
    pub delivery_id: String,
    pub account_id: String,
    pub event: UsageEvent,
}

impl ExportedEvent {
    pub fn event_id(&self) -> String {
        self.event.id(&self.account_id)
    }
}

/// An open reservation, as shown by GetUsage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldView {
    pub reservation_id: String,
    pub product: String,
    pub held: Funding,
    pub charged: Funding,
    pub expires_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSnapshot {
    pub account: Account,
    pub status: AccountStatus,
    pub lots: Vec<CreditLot>,
    /// Newest first.
    pub recent: Vec<UsageEvent>,
    pub totals: LedgerTotals,
    /// Credits held by open reservations.
    pub credit_held: Micros,
    pub holds: Vec<HoldView>,
    pub top_up: TopUpView,
}
