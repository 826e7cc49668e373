//! Money: every amount is an `i64` count of micro-credits (1 credit = 1,000,000 micros).
//! Integers only, so charging and granting are exact; the one place that rounds is pricing
//! (see [`crate::domain::pricing`]), and it rounds up.

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
