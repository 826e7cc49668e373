"""A small quotad client for a Python backend: the part to copy.

It wraps the generated stubs (see ../README.md) with what every caller needs:

- the quota token (and, for back-office calls, the admin token) as `authorization` metadata;
- retries of UNAVAILABLE (quotad starting, its store out of reach, a call past quotad's own
  timeout) and RESOURCE_EXHAUSTED (quotad shedding load), with capped, jittered exponential
  back-off, within one deadline per call. A retry sends the very same request, so it carries
  the same ids: quotad acts once per (account, request_id) on Reserve, per reservation on a
  final Commit or Release, per grant_id on GrantCredits, and a partial Commit carries
  cumulative usage, so a repeated one charges nothing twice.

Every other status is raised at once: it will not change by asking again.
"""

import os
import random
import sys
import time

import grpc

_GEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen")
sys.path.insert(0, _GEN)
try:
    from quota.v1 import quota_pb2 as pb  # noqa: E402
    from quota.v1 import quota_pb2_grpc as pb_grpc  # noqa: E402
except ImportError as err:  # pragma: no cover - only without generated stubs
    raise SystemExit(
        f"the generated stubs are missing ({err}); from examples/python run:\n"
        "  mkdir -p gen && python -m grpc_tools.protoc -I ../../proto --python_out=gen "
        "--pyi_out=gen --grpc_python_out=gen quota/v1/quota.proto"
    ) from err

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

MICROS_PER_CREDIT = 1_000_000


def credits(micros: int) -> str:
    """Micro-credits as a decimal number of credits, exactly (no floating point)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_CREDIT)
    if frac == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:06d}".rstrip("0")


def funding(f) -> str:
    """`16 credits (plan 12.5, credits 3.5)`."""
    total = f.plan_micros + f.credit_micros
    return f"{credits(total)} credits (plan {credits(f.plan_micros)}, credits {credits(f.credit_micros)})"


class QuotaClient:
    """QuotaService (and AdminService, for setup) calls with retries.

    `deadline` bounds each call including its retries, in seconds. Back-off starts at
    `first_backoff`, doubles per attempt up to `max_backoff`, and each wait is drawn between
    half and all of that (jitter), so that many clients that failed together do not retry
    together.
    """

    def __init__(
        self,
        addr: str,
        quota_token: str | None = None,
        admin_token: str | None = None,
        deadline: float = 30.0,
        first_backoff: float = 0.1,
        max_backoff: float = 2.0,
        log=print,
    ):
        # Reconnect attempts to a quotad that is not up yet stay well inside a call's deadline.
        self.channel = grpc.insecure_channel(
            addr, options=[("grpc.max_reconnect_backoff_ms", 2000)]
        )
        self.quota = pb_grpc.QuotaServiceStub(self.channel)
        self.admin = pb_grpc.AdminServiceStub(self.channel)
        self.quota_token = quota_token
        self.admin_token = admin_token
        self.deadline = deadline
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.log = log
        self.retries = 0

    def close(self):
        self.channel.close()

    def _call(self, method, request, token, what):
        metadata = [("authorization", f"Bearer {token}")] if token else []
        deadline = time.monotonic() + self.deadline
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return method(request, timeout=max(remaining, 0.001), metadata=metadata)
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise
                backoff = min(self.max_backoff, self.first_backoff * 2**attempt)
                wait = random.uniform(backoff / 2, backoff)
                if time.monotonic() + wait >= deadline:
                    raise
                attempt += 1
                self.retries += 1
                self.log(
                    f"  retry {attempt}: {what} answered {err.code().name} ({err.details()}); "
                    f"again in {wait:.2f} s with the same ids"
                )
                time.sleep(wait)

    # QuotaService: the calls a frontend makes around every task.

    def reserve(self, account_id, request_id, product, estimate, plan_hint=""):
        """May the task start, and who pays? `request_id` must be the same on every retry
        (derive it from your own task id), so that a retry never holds twice."""
        request = pb.ReserveRequest(
            account_id=account_id,
            request_id=request_id,
            product=product,
            estimate=estimate,
            plan_hint=plan_hint,
        )
        return self._call(self.quota.Reserve, request, self.quota_token, f"Reserve {request_id}")

    def commit(self, account_id, reservation_id, usage_so_far, final):
        """Reports the task's cumulative usage so far (not the last chunk's)."""
        request = pb.CommitRequest(
            account_id=account_id,
            reservation_id=reservation_id,
            usage=usage_so_far,
            final=final,
        )
        return self._call(self.quota.Commit, request, self.quota_token, f"Commit {reservation_id}")

    def release(self, account_id, reservation_id):
        """The task was cancelled: return what its reservation still holds."""
        request = pb.ReleaseRequest(account_id=account_id, reservation_id=reservation_id)
        return self._call(
            self.quota.Release, request, self.quota_token, f"Release {reservation_id}"
        )

    def usage(self, account_id):
        request = pb.GetUsageRequest(account_id=account_id)
        return self._call(self.quota.GetUsage, request, self.quota_token, "GetUsage")

    # AdminService: the billing back office (the demo's setup only).

    def set_plan(self, account_id, plan):
        request = pb.UpsertAccountRequest(
            account=pb.Account(account_id=account_id, plan=plan, credit_purchase_allowed=True)
        )
        return self._call(self.admin.UpsertAccount, request, self.admin_token, "UpsertAccount")

    def grant(self, account_id, grant_id, amount_micros):
        request = pb.GrantCreditsRequest(
            account_id=account_id, grant_id=grant_id, amount_micros=amount_micros
        )
        return self._call(self.admin.GrantCredits, request, self.admin_token, "GrantCredits")
