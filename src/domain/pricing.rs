//! Pricing: what a piece of work costs in micro-credits, from its tokens, images and speed.
//!
//! The rule, applied once per priced quantity, is **round up to the next whole micro-credit**:
//!
//! ```text
//! exact = (input × input_price + cached × cached_price + output × output_price) / 1,000,000
//!         + images × image_price
//! cost  = ceil(exact × multiplier_percent / 100)     (multiplier 100, or the fast-mode one)
//! ```
//!
//! Prices are micro-credits per million tokens (and per image). The sum is formed exactly in
//! `u128` and divided once, so the result is never below the exact price (never under-charges),
//! exceeds it by less than one micro-credit, and is monotone in every quantity. An amount that
//! would not fit in `i64` is an error, never a wrapped number.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::money::Micros;

/// Token and image counts of a task (an estimate before it runs, actual usage after).
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
pub struct Usage {
    /// Shared, not copied, between a task's records; interned once recorded in a usage event.
    #[serde(deserialize_with = "super::decision::interned")]
    pub model: Arc<str>,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub images: u32,
    pub fast_mode: bool,
}

impl Usage {
    pub fn is_empty(&self) -> bool {
        self.input_tokens == 0
            && self.cached_input_tokens == 0
            && self.output_tokens == 0
            && self.images == 0
    }

    /// Field-wise `self − earlier`, floored at zero: the part of cumulative usage that is new.
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            model: self.model.clone(),
            input_tokens: self.input_tokens.saturating_sub(earlier.input_tokens),
            cached_input_tokens: self
                .cached_input_tokens
                .saturating_sub(earlier.cached_input_tokens),
            output_tokens: self.output_tokens.saturating_sub(earlier.output_tokens),
            images: self.images.saturating_sub(earlier.images),
            fast_mode: self.fast_mode,
        }
    }
}

/// Prices of one model, in micro-credits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input_per_mtok_micros: u64,
    pub cached_input_per_mtok_micros: u64,
    pub output_per_mtok_micros: u64,
    #[serde(default)]
    pub image_micros: u64,
}

/// A versioned price sheet. The version is recorded on every usage event it priced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSheet {
    pub version: String,
    /// Fast mode multiplies the price by this many percent (200 = twice the price).
    pub fast_mode_multiplier_percent: u32,
    pub models: BTreeMap<String, ModelPrice>,
}

/// Highest accepted price per million tokens or per image: one million credits.
pub const MAX_PRICE_MICROS: u64 = 1_000_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("unknown model {model:?}; allowed: {allowed}")]
    UnknownModel { model: String, allowed: String },
    #[error("the price does not fit in a 64-bit micro-credit amount")]
    Overflow,
}

impl PriceSheet {
    /// Cost of `usage` in micro-credits, rounded up (see the module docs).
    pub fn price(&self, usage: &Usage) -> Result<Micros, PricingError> {
        let model = self
            .models
            .get(&*usage.model)
            .ok_or_else(|| PricingError::UnknownModel {
                model: usage.model.to_string(),
                allowed: self.model_names(),
            })?;
        let mul = |a: u64, b: u64| u128::from(a).checked_mul(u128::from(b));
        let per_mtok = [
            mul(usage.input_tokens, model.input_per_mtok_micros),
            mul(
                usage.cached_input_tokens,
                model.cached_input_per_mtok_micros,
            ),
            mul(usage.output_tokens, model.output_per_mtok_micros),
            mul(u64::from(usage.images), model.image_micros).and_then(|m| m.checked_mul(1_000_000)),
        ];
        let mut scaled: u128 = 0;
        for term in per_mtok {
            scaled = scaled
                .checked_add(term.ok_or(PricingError::Overflow)?)
                .ok_or(PricingError::Overflow)?;
        }
        let percent = if usage.fast_mode {
            self.fast_mode_multiplier_percent
        } else {
            100
        };
        let scaled = scaled
            .checked_mul(u128::from(percent))
            .ok_or(PricingError::Overflow)?;
        let cost = scaled.div_ceil(1_000_000 * 100);
        Micros::try_from(cost).map_err(|_| PricingError::Overflow)
    }

    pub fn model_names(&self) -> String {
        self.models
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks a sheet from configuration; the error says which entry is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.version.trim().is_empty() {
            return Err("pricing.version must not be empty".into());
        }
        if !(100..=10_000).contains(&self.fast_mode_multiplier_percent) {
            return Err(format!(
                "pricing.fast_mode_multiplier_percent must be between 100 and 10000, got {}",
                self.fast_mode_multiplier_percent
            ));
        }
        if self.models.is_empty() {
            return Err("pricing.models must name at least one model".into());
        }
        for (name, p) in &self.models {
            let prices = [
                ("input_per_mtok_micros", p.input_per_mtok_micros),
                (
                    "cached_input_per_mtok_micros",
                    p.cached_input_per_mtok_micros,
                ),
                ("output_per_mtok_micros", p.output_per_mtok_micros),
                ("image_micros", p.image_micros),
            ];
            for (field, value) in prices {
                if value > MAX_PRICE_MICROS {
                    return Err(format!(
                        "pricing.models.{name}.{field} must be at most {MAX_PRICE_MICROS}, got {value}"
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Default for PriceSheet {
    /// The default sheet. A typical spreadsheet task on `gpt-5.5` (60k input, 40k cached input,
    /// 8k output tokens) costs 16 credits.
    fn default() -> Self {
        let model = |input: u64, cached: u64, output: u64, image: u64| ModelPrice {
            input_per_mtok_micros: input,
            cached_input_per_mtok_micros: cached,
            output_per_mtok_micros: output,
            image_micros: image,
        };
        PriceSheet {
            version: "2026-11-01".into(),
            fast_mode_multiplier_percent: 200,
            models: BTreeMap::from([
                (
                    "gpt-5.5".into(),
                    model(125_000_000, 12_500_000, 1_000_000_000, 5_000_000),
                ),
                (
                    "gpt-5.5-mini".into(),
                    model(25_000_000, 2_500_000, 200_000_000, 5_000_000),
                ),
            ]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::money::MICROS_PER_CREDIT;
    use proptest::prelude::*;

    fn usage(model: &str, input: u64, cached: u64, output: u64, images: u32, fast: bool) -> Usage {
        Usage {
            model: model.into(),
            input_tokens: input,
            cached_input_tokens: cached,
            output_tokens: output,
            images,
            fast_mode: fast,
        }
    }

    #[test]
    fn typical_spreadsheet_task_costs_5_to_30_credits() {
        let cost = PriceSheet::default()
            .price(&usage("gpt-5.5", 60_000, 40_000, 8_000, 0, false))
            .unwrap();
        assert_eq!(cost, 16 * MICROS_PER_CREDIT);
        assert!((5 * MICROS_PER_CREDIT..=30 * MICROS_PER_CREDIT).contains(&cost));
    }

    #[test]
    fn fast_mode_and_images_cost_more() {
        let sheet = PriceSheet::default();
        let slow = sheet
            .price(&usage("gpt-5.5", 60_000, 40_000, 8_000, 0, false))
            .unwrap();
        let fast = sheet
            .price(&usage("gpt-5.5", 60_000, 40_000, 8_000, 0, true))
            .unwrap();
        assert_eq!(fast, 2 * slow);
        let image = sheet.price(&usage("gpt-5.5", 0, 0, 0, 1, false)).unwrap();
        assert_eq!(image, 5 * MICROS_PER_CREDIT);
    }

    #[test]
    fn rounds_up_once() {
        // One input token on the mini model is 25 micros exactly; one cached token 2.5 → 3.
        let sheet = PriceSheet::default();
        assert_eq!(
            sheet
                .price(&usage("gpt-5.5-mini", 1, 0, 0, 0, false))
                .unwrap(),
            25
        );
        assert_eq!(
            sheet
                .price(&usage("gpt-5.5-mini", 0, 1, 0, 0, false))
                .unwrap(),
            3
        );
        // Two cached tokens are 5 exactly: rounding happens on the sum, not per token.
        assert_eq!(
            sheet
                .price(&usage("gpt-5.5-mini", 0, 2, 0, 0, false))
                .unwrap(),
            5
        );
    }

    #[test]
    fn unknown_model_names_the_allowed_ones() {
        let err = PriceSheet::default()
            .price(&usage("gpt-4", 1, 0, 0, 0, false))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown model \"gpt-4\"; allowed: gpt-5.5, gpt-5.5-mini"
        );
    }

    #[test]
    fn huge_quantities_are_an_error_not_a_wrap() {
        let mut sheet = PriceSheet::default();
        sheet
            .models
            .get_mut("gpt-5.5")
            .unwrap()
            .output_per_mtok_micros = MAX_PRICE_MICROS;
        let err = sheet
            .price(&usage("gpt-5.5", 0, 0, u64::MAX, 0, true))
            .unwrap_err();
        assert_eq!(err, PricingError::Overflow);
    }

    fn any_usage() -> impl Strategy<Value = Usage> {
        (
            prop::sample::select(vec!["gpt-5.5", "gpt-5.5-mini"]),
            0u64..50_000_000,
            0u64..50_000_000,
            0u64..50_000_000,
            0u32..100,
            any::<bool>(),
        )
            .prop_map(|(m, i, c, o, img, f)| usage(m, i, c, o, img, f))
    }

    proptest! {
        #[test]
        fn never_under_charges(u in any_usage()) {
            let sheet = PriceSheet::default();
            let p = &sheet.models[&*u.model];
            let exact_times_1e8 = (u.input_tokens as u128 * p.input_per_mtok_micros as u128
                + u.cached_input_tokens as u128 * p.cached_input_per_mtok_micros as u128
                + u.output_tokens as u128 * p.output_per_mtok_micros as u128
                + u.images as u128 * p.image_micros as u128 * 1_000_000)
                * if u.fast_mode { sheet.fast_mode_multiplier_percent as u128 } else { 100 };
            let cost = sheet.price(&u).unwrap() as u128;
            prop_assert!(cost * 100_000_000 >= exact_times_1e8);
            prop_assert!(cost * 100_000_000 < exact_times_1e8 + 100_000_000);
        }

        #[test]
        fn is_monotone(u in any_usage(), field in 0usize..5, extra in 1u64..1_000_000) {
            let sheet = PriceSheet::default();
            let mut more = u.clone();
            match field {
                0 => more.input_tokens += extra,
                1 => more.cached_input_tokens += extra,
                2 => more.output_tokens += extra,
                3 => more.images += (extra % 50) as u32 + 1,
                _ => more.fast_mode = true,
            }
            prop_assert!(sheet.price(&more).unwrap() >= sheet.price(&u).unwrap());
        }
    }
}
