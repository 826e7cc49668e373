//! Account-scoped tokens over real gRPC, on both stores: the back office mints a token for one
//! account and a set of abilities (AdminService.MintAccountToken); its holder may call what the
//! abilities allow for that account only, until the token expires by quotad's clock; a key
//! rotation keeps old tokens valid until the old key is removed.

use crate::support;

use quotad::api::pb;
use quotad::api::pb::admin_service_client::AdminServiceClient;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use quotad::config::Config;
use support::{BearerToken, TestServer, on_every_store};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const K1: &str = "k1:0123456789abcdef0123456789abcdef";
const K2: &str = "k2:fedcba9876543210fedcba9876543210";

on_every_store!(
    a_token_reads_and_changes_its_own_account_only,
    a_token_expires_by_quotads_clock,
    minting_checks_its_input,
);

fn with_keys(keys: &str) -> Config {
    let mut config = Config::default();
    config.account_tokens.keys = keys.into();
    config
}

async fn mint(server: &TestServer, account: &str, abilities: &[&str], ttl: u32) -> String {
    let request = pb::MintAccountTokenRequest {
        account_id: account.into(),
        abilities: abilities.iter().map(|a| a.to_string()).collect(),
        ttl_seconds: ttl,
    };
    let minted = server.admin().await.mint_account_token(request).await;
    minted.unwrap().into_inner().token
}

type Quota = QuotaServiceClient<InterceptedService<Channel, BearerToken>>;
type Admin = AdminServiceClient<InterceptedService<Channel, BearerToken>>;

async fn holding(server: &TestServer, token: &str) -> (Quota, Admin) {
    let bearer = BearerToken(Some(token.into()));
    let channel = server.channel().await;
    (
        QuotaServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        AdminServiceClient::with_interceptor(channel, bearer),
    )
}

fn usage(account: &str) -> pb::GetUsageRequest {
    pb::GetUsageRequest {
        account_id: account.into(),
        recent_limit: 5,
    }
}

fn top_up(account: &str) -> pb::SetAutoTopUpRequest {
    pb::SetAutoTopUpRequest {
        account_id: account.into(),
        enabled: true,
        threshold_micros: 5_000_000,
        target_micros: 20_000_000,
        monthly_cap_micros: 0,
    }
}

async fn a_token_reads_and_changes_its_own_account_only(store: support::TestStore) {
    let server = TestServer::start_with(with_keys(K1), store).await;
    support::plus_account(&server, "p").await;
    support::plus_account(&server, "q").await;

    let reader = mint(&server, "p", &["read_usage"], 600).await;
    let (mut quota, mut admin) = holding(&server, &reader).await;
    quota.get_usage(usage("p")).await.unwrap();
    let account = pb::GetAccountRequest {
        account_id: "p".into(),
    };
    assert_eq!(
        admin.get_account(account).await.unwrap().into_inner().plan,
        "plus"
    );
    let other = quota.get_usage(usage("q")).await.unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied, "{other:?}");
    assert!(other.message().contains("another account"), "{other:?}");
    // An ability it lacks, and methods no account token may call.
    let lacking = admin.set_auto_top_up(top_up("p")).await.unwrap_err();
    assert_eq!(lacking.code(), Code::PermissionDenied);
    assert!(lacking.message().contains("change_top_up"), "{lacking:?}");
    let reserve = pb::ReserveRequest {
        account_id: "p".into(),
        request_id: "r1".into(),
        product: "codex".into(),
        estimate: Some(support::costing(1)),
        ..Default::default()
    };
    let refused = quota.reserve(reserve).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let grant = pb::GrantCreditsRequest {
        account_id: "p".into(),
        grant_id: "g".into(),
        amount_micros: 1_000_000,
        ..Default::default()
    };
    assert_eq!(
        admin.grant_credits(grant).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let mint_more = pb::MintAccountTokenRequest {
        account_id: "p".into(),
        abilities: vec!["change_top_up".into()],
        ttl_seconds: 60,
    };
    assert_eq!(
        admin
            .mint_account_token(mint_more)
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Changing auto top-up: the preview and the change, on its own account only.
    let changer = mint(&server, "p", &["read_usage", "change_top_up"], 600).await;
    let (mut quota, mut admin) = holding(&server, &changer).await;
    let preview = admin.preview_auto_top_up(top_up("p")).await.unwrap();
    assert_eq!(preview.into_inner().purchase_micros, 20_000_000);
    admin.set_auto_top_up(top_up("p")).await.unwrap();
    let other = admin.set_auto_top_up(top_up("q")).await.unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    let shown = support::usage_until(&mut server.quota().await, "p", |u| {
        u.credit_balance_micros == 20_000_000
    })
    .await;
    assert!(shown.auto_top_up.unwrap().enabled);
    quota.get_usage(usage("p")).await.unwrap();
}

async fn a_token_expires_by_quotads_clock(store: support::TestStore) {
    let server = TestServer::start_with(with_keys(K1), store).await;
    support::plus_account(&server, "p").await;
    let token = mint(&server, "p", &["read_usage"], 60).await;
    let (mut quota, _) = holding(&server, &token).await;
    quota.get_usage(usage("p")).await.unwrap();
    server.clock.advance_secs(59);
    quota.get_usage(usage("p")).await.unwrap();
    server.clock.advance_secs(1);
    let expired = quota.get_usage(usage("p")).await.unwrap_err();
    assert_eq!(expired.code(), Code::Unauthenticated);
    assert!(expired.message().contains("expired"), "{expired:?}");
}

async fn minting_checks_its_input(store: support::TestStore) {
    let server = TestServer::start_with(with_keys(K1), store).await;
    support::plus_account(&server, "p").await;
    let mut admin = server.admin().await;
    let ask = |abilities: &[&str], ttl: u32, account: &str| pb::MintAccountTokenRequest {
        account_id: account.into(),
        abilities: abilities.iter().map(|a| a.to_string()).collect(),
        ttl_seconds: ttl,
    };
    for (request, code, field) in [
        (
            ask(&["read_usage", "fly"], 60, "p"),
            Code::InvalidArgument,
            "abilities",
        ),
        (ask(&[], 60, "p"), Code::InvalidArgument, "abilities"),
        (
            ask(&["read_usage"], 86_401, "p"),
            Code::InvalidArgument,
            "ttl_seconds",
        ),
        (ask(&["read_usage"], 60, "nobody"), Code::NotFound, ""),
    ] {
        let err = admin.mint_account_token(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().starts_with(field), "{err:?}");
    }
    // Without keys, no tokens are minted, and none are taken.
    let plain = TestServer::start(store).await;
    let err = (plain.admin().await)
        .mint_account_token(ask(&["read_usage"], 60, "p"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let token = mint(&server, "p", &["read_usage"], 60).await;
    let (mut quota, _) = holding(&plain, &token).await;
    assert_eq!(
        quota.get_usage(usage("p")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

/// A key rotation: a token signed with the old key stays valid while the old key is still
/// configured beside the new one, and is refused once it is removed; new tokens are signed with
/// the new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_old_tokens_until_the_old_key_is_removed() {
    let before = TestServer::start_with(with_keys(K1), support::TestStore::Memory).await;
    support::plus_account(&before, "p").await;
    let old = mint(&before, "p", &["read_usage"], 600).await;

    let during =
        TestServer::start_with(with_keys(&format!("{K2},{K1}")), support::TestStore::Memory).await;
    support::plus_account(&during, "p").await;
    let (mut quota, _) = holding(&during, &old).await;
    quota.get_usage(usage("p")).await.unwrap();
    assert!(
        mint(&during, "p", &["read_usage"], 600)
            .await
            .starts_with("qat1.k2.")
    );

    let after = TestServer::start_with(with_keys(K2), support::TestStore::Memory).await;
    support::plus_account(&after, "p").await;
    let (mut quota, _) = holding(&after, &old).await;
    let refused = quota.get_usage(usage("p")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("rotated out"), "{refused:?}");
}
