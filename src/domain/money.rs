//! Money: every amount is an `i64` count of micro-credits (1 credit = 1,000,000 micros).
//! Integers only, so charging and granting are exact; the one place that rounds is pricing
//! (see [`crate::domain::pricing`]), and it rounds up. What credits cost people in a currency
//! ([`CreditPrice`]) is integers too, in the currency's minor units, and also rounds up.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An amount of credits in micro-credits. Signed because a balance may go below zero by a
/// documented commit overage; amounts in requests are validated to be positive.
pub type Micros = i64;

pub const MICROS_PER_CREDIT: Micros = 1_000_000;

/// Who pays for a piece of work: the plan's included allowance, prepaid credits, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
pub struct Funding {
    pub plan: Micros,
    pub credit: Micros,
}

impl Funding {
    pub const ZERO: Funding = Funding { plan: 0, credit: 0 };

    pub const fn new(plan: Micros, credit: Micros) -> Self {
        Self { plan, credit }
    }

    pub const fn total(self) -> Micros {
        self.plan + self.credit
    }

    pub const fn plus(self, other: Funding) -> Funding {
        Funding {
            plan: self.plan + other.plan,
            credit: self.credit + other.credit,
        }
    }
}

/// Checks an amount read back from storage: never negative, never past
/// [`MAX_EXACT_MICROS`](crate::domain::account::MAX_EXACT_MICROS), so that the sums the rules form
/// stay exact (and far from overflow).
pub(crate) fn check_amount(what: &str, amount: Micros) -> Result<(), String> {
    let max = crate::domain::account::MAX_EXACT_MICROS;
    if !(0..=max).contains(&amount) {
        return Err(format!("{what} is {amount}, outside 0..={max}"));
    }
    Ok(())
}

impl Funding {
    /// [`check_amount`] for both parts.
    pub(crate) fn check(self, what: &str) -> Result<(), String> {
        check_amount(&format!("{what} (plan)"), self.plan)?;
        check_amount(&format!("{what} (credit)"), self.credit)
    }
}

/// An ISO 4217 currency code: three capital letters (`USD`, `EUR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn parse(code: &str) -> Option<Currency> {
        let bytes: [u8; 3] = code.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(u8::is_ascii_uppercase)
            .then_some(Currency(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Three ASCII capitals, checked when made.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = String::deserialize(d)?;
        Currency::parse(&code).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "currency {code:?} is not an ISO 4217 code: three capital letters, e.g. USD"
            ))
        })
    }
}

/// What credits cost people: `credits` credits for `amount_minor` minor units (cents) of
/// `currency`, which has `minor_digits` digits after the point. The product sells 2,500
/// credits for 100.00 USD, the default.
///
/// **The rounding rule:** an amount of micro-credits costs its exact share of that price,
/// rounded up to the next minor unit, so a purchase is never charged below its credits' price
/// (at the default, 1 credit is 4 cents exactly, and one micro-credit costs a cent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditPrice {
    pub credits: u32,
    pub amount_minor: i64,
    pub currency: Currency,
    pub minor_digits: u8,
}

impl Default for CreditPrice {
    fn default() -> Self {
        CreditPrice {
            credits: 2_500,
            amount_minor: 10_000,
            currency: Currency(*b"USD"),
            minor_digits: 2,
        }
    }
}

impl CreditPrice {
    /// Why this price cannot be used, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.credits == 0 || self.amount_minor < 0 || self.minor_digits > 4 {
            return Err(format!(
                "top_up.price: credits must be at least 1, amount_minor 0 or more and \
                 minor_digits at most 4, got {} credits for {} minor units with {} digits",
                self.credits, self.amount_minor, self.minor_digits
            ));
        }
        Ok(())
    }

    /// What `micros` micro-credits cost, in minor units (rounded up; see the type).
    pub fn of(&self, micros: Micros) -> Money {
        let pack = i128::from(self.credits) * i128::from(MICROS_PER_CREDIT);
        let exact = i128::from(micros.max(0)) * i128::from(self.amount_minor);
        let minor = (exact + pack - 1) / pack.max(1);
        Money {
            minor: i64::try_from(minor).unwrap_or(i64::MAX),
            currency: self.currency,
            minor_digits: self.minor_digits,
        }
    }
}

/// An amount of a currency in its minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
    pub minor_digits: u8,
}

impl fmt::Display for Money {
    /// `68` cents of USD → `0.68 USD`; with no minor digits, `68 JPY`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = u32::from(self.minor_digits);
        if digits == 0 {
            return write!(f, "{} {}", self.minor, self.currency);
        }
        let unit = 10_i64.pow(digits);
        let sign = if self.minor < 0 { "-" } else { "" };
        let abs = self.minor.unsigned_abs();
        let (major, minor) = (abs / unit as u64, abs % unit as u64);
        let width = digits as usize;
        write!(f, "{sign}{major}.{minor:0width$} {}", self.currency)
    }
}

/// Displays micros as a decimal credit amount without rounding: `16000000` → `16`,
/// `1500` → `0.0015`, `-2500000` → `-2.5`.
pub struct Credits(pub Micros);

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let whole = abs / MICROS_PER_CREDIT as u64;
        let frac = abs % MICROS_PER_CREDIT as u64;
        if frac == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let digits = format!("{frac:06}");
            write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// Parses a decimal credit amount (`"25"`, `"0.5"`, `"12.000001"`) into micros exactly.
/// More than six decimal places, signs, exponents and overflow are rejected.
pub fn parse_credits(text: &str) -> Option<Micros> {
    let (whole, frac) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && frac.is_empty() || !all_digits(whole) || !all_digits(frac) {
        return None;
    }
    if frac.len() > 6 {
        return None;
    }
    let whole: Micros = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let frac_micros: Micros = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    whole
        .checked_mul(MICROS_PER_CREDIT)?
        .checked_add(frac_micros)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn credits_cost_their_share_of_the_price_rounded_up_to_the_cent() {
        let price = CreditPrice::default();
        let cost = |micros| price.of(micros);
        assert_eq!(cost(17 * MICROS_PER_CREDIT).minor, 68);
        assert_eq!(cost(17 * MICROS_PER_CREDIT).to_string(), "0.68 USD");
        assert_eq!(cost(2_500 * MICROS_PER_CREDIT).to_string(), "100.00 USD");
        assert_eq!(cost(1).minor, 1, "never below the credits' price");
        assert_eq!(cost(0).minor, 0);
        let yen = CreditPrice {
            credits: 3,
            amount_minor: 100,
            currency: Currency::parse("JPY").unwrap(),
            minor_digits: 0,
        };
        assert_eq!(yen.of(MICROS_PER_CREDIT).to_string(), "34 JPY");
        assert_eq!(yen.of(3 * MICROS_PER_CREDIT).to_string(), "100 JPY");
        assert_eq!(Currency::parse("usd"), None);
        assert_eq!(Currency::parse("US"), None);
        let huge = price.of(i64::MAX);
        assert!(huge.minor > 0, "no overflow");
    }

    #[test]
    fn displays_exact_decimals() {
        assert_eq!(Credits(16_000_000).to_string(), "16");
        assert_eq!(Credits(1_500).to_string(), "0.0015");
        assert_eq!(Credits(-2_500_000).to_string(), "-2.5");
        assert_eq!(Credits(0).to_string(), "0");
    }

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(parse_credits("25"), Some(25_000_000));
        assert_eq!(parse_credits("0.5"), Some(500_000));
        assert_eq!(parse_credits(".25"), Some(250_000));
        assert_eq!(parse_credits("12.000001"), Some(12_000_001));
        for bad in [
            "",
            ".",
            "1.0000001",
            "-1",
            "1e6",
            "abc",
            "99999999999999999999",
        ] {
            assert_eq!(parse_credits(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip(m in 0i64..i64::MAX) {
            prop_assert_eq!(parse_credits(&Credits(m).to_string()), Some(m));
        }
    }
}
