//! Account-scoped tokens: what the back office hands a person (through a page, or a support
//! tool acting for them) so that they can read and change their own account and nothing else,
//! without the admin token.
//!
//! A token names one account, a set of [`Ability`]s and when it expires, signed with
//! HMAC-SHA256 under one of the configured keys (`account_tokens.keys`, `KID:SECRET,…`): the
//! first key signs, every key verifies, so a key is rotated by putting the new one first, and
//! tokens signed with the old one stay valid until it is removed. The form is
//! `qat1.KID.PAYLOAD.SIGNATURE`, base64url without padding, PAYLOAD a small JSON object.
//!
//! [`AccountTokenLayer`] checks a token before any service sees the call: its signature and
//! expiry (by quotad's clock), and that the method is one its abilities allow. The account is
//! then in the request's extensions ([`AccountCaller`]), and the handlers of those methods
//! refuse a call about any other account ([`check_account`]).

use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic::codegen::http;

use crate::domain::Timestamp;
use crate::domain::time::Clock;

const PREFIX: &str = "qat1";

/// What an account token lets its holder do, on its own account only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ability {
    /// GetUsage and GetAccount.
    ReadUsage,
    /// SetAutoTopUp and PreviewAutoTopUp.
    ChangeTopUp,
}

impl Ability {
    pub const ALL: [Ability; 2] = [Ability::ReadUsage, Ability::ChangeTopUp];

    pub fn name(self) -> &'static str {
        match self {
            Ability::ReadUsage => "read_usage",
            Ability::ChangeTopUp => "change_top_up",
        }
    }

    pub fn parse(name: &str) -> Option<Ability> {
        Ability::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The ability a gRPC method needs from an account token, if one may call it at all.
    fn needed_for(path: &str) -> Option<Ability> {
        match path {
            "/quota.v1.QuotaService/GetUsage" | "/quota.v1.AdminService/GetAccount" => {
                Some(Ability::ReadUsage)
            }
            "/quota.v1.AdminService/SetAutoTopUp" | "/quota.v1.AdminService/PreviewAutoTopUp" => {
                Some(Ability::ChangeTopUp)
            }
            _ => None,
        }
    }
}

/// The holder of a valid account token, as the handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountCaller {
    pub account_id: String,
    pub abilities: Vec<Ability>,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    /// The account.
    a: String,
    /// Its abilities.
    b: Vec<Ability>,
    /// When it expires, ms since the epoch.
    e: i64,
}

/// The signing keys; the first signs.
pub struct AccountTokens {
    keys: Vec<(String, hmac::Key)>,
}

impl std::fmt::Debug for AccountTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("AccountTokens").field("keys", &ids).finish()
    }
}

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

impl AccountTokens {
    /// The keys of `KID:SECRET,KID:SECRET…` (none: no account tokens). A key id is 1 to 16
    /// letters, digits or `-`; a secret at least [`MIN_SECRET_BYTES`] bytes.
    pub fn parse(keys: &str) -> Result<Option<AccountTokens>, String> {
        let mut parsed = Vec::new();
        for entry in keys.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((id, secret)) = entry.split_once(':') else {
                return Err("account_tokens.keys: each key is KID:SECRET".into());
            };
            let id_ok = (1..=16).contains(&id.len())
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !id_ok {
                return Err(format!(
                    "account_tokens.keys: key id {id:?} must be 1 to 16 letters, digits or -"
                ));
            }
            if secret.len() < MIN_SECRET_BYTES {
                return Err(format!(
                    "account_tokens.keys: the secret of key {id:?} must be at least \
                     {MIN_SECRET_BYTES} bytes"
                ));
            }
            if parsed.iter().any(|(k, _)| k == id) {
                return Err(format!("account_tokens.keys: key id {id:?} is given twice"));
            }
            parsed.push((
                id.to_owned(),
                hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
            ));
        }
        Ok((!parsed.is_empty()).then_some(AccountTokens { keys: parsed }))
    }

    /// A token for `account_id` with `abilities`, valid until `expires_at`, signed with the
    /// first key.
    pub fn mint(&self, account_id: &str, abilities: &[Ability], expires_at: Timestamp) -> String {
        let (id, key) = &self.keys[0];
        let claims = Claims {
            a: account_id.to_owned(),
            b: abilities.to_vec(),
            e: expires_at.as_millis(),
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signed = format!("{PREFIX}.{id}.{payload}");
        let signature = URL_SAFE_NO_PAD.encode(hmac::sign(key, signed.as_bytes()).as_ref());
        format!("{signed}.{signature}")
    }

    /// The caller a token stands for, if its signature holds under a configured key and it has
    /// not expired at `now`.
    pub fn verify(&self, token: &str, now: Timestamp) -> Result<AccountCaller, Status> {
        let invalid = || Status::unauthenticated("invalid account token");
        let mut parts = token.split('.');
        let (Some(PREFIX), Some(id), Some(payload), Some(signature), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(invalid());
        };
        let Some((_, key)) = self.keys.iter().find(|(k, _)| k == id) else {
            return Err(Status::unauthenticated(
                "account token signed with a key quotad no longer has (rotated out): ask for a \
                 new one",
            ));
        };
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| invalid())?;
        let signed = &token[..token.len() - token.rsplit('.').next().map_or(0, str::len) - 1];
        hmac::verify(key, signed.as_bytes(), &signature).map_err(|_| invalid())?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or_else(invalid)?;
        if now.as_millis() >= claims.e {
            return Err(Status::unauthenticated(
                "account token expired: ask for a new one",
            ));
        }
        Ok(AccountCaller {
            account_id: claims.a,
            abilities: claims.b,
        })
    }
}

/// Refuses a call about `account_id` by the holder of another account's token.
pub fn check_account<T>(request: &tonic::Request<T>, account_id: &str) -> Result<(), Status> {
    match request.extensions().get::<AccountCaller>() {
        Some(caller) if caller.account_id != account_id => Err(Status::permission_denied(
            "this account token is for another account",
        )),
        _ => Ok(()),
    }
}

/// Checks account tokens before the services see a call (see the module doc).
#[derive(Clone)]
pub struct AccountTokenLayer {
    tokens: Option<Arc<AccountTokens>>,
    clock: Arc<dyn Clock>,
}

impl AccountTokenLayer {
    pub fn new(tokens: Option<Arc<AccountTokens>>, clock: Arc<dyn Clock>) -> Self {
        AccountTokenLayer { tokens, clock }
    }
}

impl<S> tower::Layer<S> for AccountTokenLayer {
    type Service = AccountTokenCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccountTokenCheck {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AccountTokenCheck<S> {
    inner: S,
    layer: AccountTokenLayer,
}

impl<S> AccountTokenCheck<S> {
    /// Whether the call may go on, with the caller it stands for when it bears an account
    /// token.
    fn check<B>(&self, request: &http::Request<B>) -> Result<Option<AccountCaller>, Status> {
        let bearer = (request.headers().get("authorization"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(token) =
            bearer.filter(|t| t.starts_with(PREFIX) && t[PREFIX.len()..].starts_with('.'))
        else {
            return Ok(None);
        };
        let Some(tokens) = &self.layer.tokens else {
            return Err(Status::unauthenticated(
                "account tokens are not enabled on this quotad (account_tokens.keys is unset)",
            ));
        };
        let caller = tokens.verify(token, self.layer.clock.now())?;
        let path = request.uri().path();
        match Ability::needed_for(path) {
            Some(needed) if caller.abilities.contains(&needed) => Ok(Some(caller)),
            Some(needed) => Err(Status::permission_denied(format!(
                "this account token lacks the ability {:?} that {path} needs",
                needed.name()
            ))),
            None => Err(Status::permission_denied(format!(
                "an account token may not call {path}: only GetUsage and GetAccount \
                 (read_usage), SetAutoTopUp and PreviewAutoTopUp (change_top_up)"
            ))),
        }
    }
}

/// A call's answer: the inner service's, or the refusal made here. No allocation per call:
/// the inner future (the forwarding layer's, boxed already) is `Unpin`.
pub enum Checked<F> {
    Passed(F),
    Refused(Option<http::Response<tonic::body::Body>>),
}

impl<F, E> std::future::Future for Checked<F>
where
    F: std::future::Future<Output = Result<http::Response<tonic::body::Body>, E>> + Unpin,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Checked::Passed(inner) => std::pin::Pin::new(inner).poll(cx),
            Checked::Refused(refused) => {
                Poll::Ready(Ok(refused.take().expect("a refusal is answered once")))
            }
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for AccountTokenCheck<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Checked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.check(&request) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                Checked::Passed(self.inner.call(request))
            }
            Err(status) => Checked::Refused(Some(status.into_http())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1:0123456789abcdef0123456789abcdef";
    const K2: &str = "k2:fedcba9876543210fedcba9876543210";

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn a_token_holds_its_account_and_abilities_until_it_expires() {
        let tokens = AccountTokens::parse(K1).unwrap().unwrap();
        let token = tokens.mint("acct-1", &[Ability::ReadUsage], at(2_000));
        let caller = tokens.verify(&token, at(1_999)).unwrap();
        assert_eq!(caller.account_id, "acct-1");
        assert_eq!(caller.abilities, [Ability::ReadUsage]);
        let expired = tokens.verify(&token, at(2_000)).unwrap_err();
        assert!(expired.message().contains("expired"), "{expired:?}");
        // Any change to any part breaks the signature.
        let mut forged = token.clone();
        forged.replace_range(10..11, if &token[10..11] == "A" { "B" } else { "A" });
        assert_eq!(
            tokens.verify(&forged, at(0)).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(tokens.verify("qat1.k1.e30.AAAA", at(0)).is_err());
        assert!(tokens.verify("nonsense", at(0)).is_err());
    }

    #[test]
    fn rotation_keeps_old_tokens_until_their_key_is_removed() {
        let old = AccountTokens::parse(K1).unwrap().unwrap();
        let token = old.mint("a", &Ability::ALL, at(10_000));
        let rotating = AccountTokens::parse(&format!("{K2},{K1}"))
            .unwrap()
            .unwrap();
        assert!(rotating.verify(&token, at(0)).is_ok());
        assert!(
            rotating
                .mint("a", &Ability::ALL, at(10_000))
                .starts_with("qat1.k2.")
        );
        let rotated = AccountTokens::parse(K2).unwrap().unwrap();
        let err = rotated.verify(&token, at(0)).unwrap_err();
        assert!(err.message().contains("rotated out"), "{err:?}");
    }

    #[test]
    fn keys_are_checked() {
        assert!(AccountTokens::parse("").unwrap().is_none());
        for bad in ["k1", "k1:short", "bad id!:0123456789abcdef0123456789abcdef"] {
            assert!(AccountTokens::parse(bad).is_err(), "{bad}");
        }
        assert!(AccountTokens::parse(&format!("{K1},{K1}")).is_err());
    }
}
