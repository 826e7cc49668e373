"""quotad from a Python backend: a free user gets the upgrade prompt, a plus user's long agent
task runs past the plan's included usage onto credits, and a cancelled task returns its hold.

    python quota_demo.py [--addr HOST:PORT] [--quota-token T] [--admin-token T] [--run-id ID]

The address and tokens also come from QUOTAD_ADDR, QUOTAD_QUOTA_TOKEN and QUOTAD_ADMIN_TOKEN
(the admin token only for the setup: moving the plus account to its plan and granting it
credits). It prints what happens, checks what it saw, and exits 1 when something is off.
Every run uses fresh accounts (`--run-id` names them), so it can run again on the same quotad.
Against quotad's default plans the plus task takes about ten chunks to use up its 150 credits;
`examples/demo.toml` has small limits that get there in three.
"""

import argparse
import os
import secrets
import sys

import grpc

from quota_client import QuotaClient, credits, funding, pb

# A chunk of agent work: 60k input, 40k cached input and 8k output tokens of gpt-5.5, which
# costs 16 credits on the default price sheet.
CHUNK = dict(model="gpt-5.5", input_tokens=60_000, cached_input_tokens=40_000, output_tokens=8_000)
# A small task of a free user: 4 credits asked for, a little less used.
SMALL_ESTIMATE = dict(model="gpt-5.5", input_tokens=16_000, output_tokens=2_000)
SMALL_USED = dict(model="gpt-5.5", input_tokens=15_000, output_tokens=1_800)

GRANT_MICROS = 100_000_000  # the plus user's credits
MAX_CHUNKS = 60  # far more than any plan here needs; a task still going then is a bug
MAX_SMALL_TASKS = 30


def usage_times(chunk: dict, n: int) -> "pb.Usage":
    """The cumulative usage after `n` chunks: Commit always carries the task's total so far."""
    return pb.Usage(
        model=chunk["model"],
        input_tokens=chunk.get("input_tokens", 0) * n,
        cached_input_tokens=chunk.get("cached_input_tokens", 0) * n,
        output_tokens=chunk.get("output_tokens", 0) * n,
    )


def windows(ws) -> str:
    return ", ".join(
        f"{w.name} used {credits(w.used_micros)} / {credits(w.limit_micros)} credits" for w in ws
    )


def show_deny(r) -> None:
    """What a frontend shows the user: the message, and the action as a button."""
    reason = pb.DenyReason.Name(r.reason)
    action = pb.Action.Name(r.action)
    line = f"  DENY   {reason}: action {action}"
    if r.upgrade_to:
        line += f", upgrade to {r.upgrade_to}"
    if r.HasField("retry_at"):
        line += f", retry at {r.retry_at.ToJsonString()}"
    print(line)
    print(f"  message: {r.message}")


class Checks:
    """What the demo expects to have seen; a failed check makes the exit status 1."""

    def __init__(self):
        self.failed = []

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failed.append(what)
            print(f"  CHECK FAILED: {what}")


def free_user_until_denied(client: QuotaClient, account: str, checks: Checks) -> None:
    print(f"== free account {account}: small tasks until the plan says no")
    for n in range(1, MAX_SMALL_TASKS + 1):
        task = f"{account}-task-{n}"
        estimate = pb.Usage(**SMALL_ESTIMATE)
        # The request id comes from the task: the same on every retry of this Reserve.
        r = client.reserve(account, task, "codex", estimate, plan_hint="free")
        if r.decision == pb.DENY:
            print(f"task {n}: reserve {credits(r.estimate_micros)} credits")
            show_deny(r)
            checks.expect(r.action == pb.UPGRADE_PLAN, "a free account is offered an upgrade")
            checks.expect(bool(r.upgrade_to), "the upgrade names a plan")
            checks.expect(bool(r.message), "the deny carries a message to show")
            checks.expect(n > 1, "the free account ran a task before its limit")
            return
        print(f"task {n}: reserve {credits(r.estimate_micros)} credits")
        print(f"  ALLOW  held {funding(r.held)}")
        c = client.commit(account, r.reservation_id, pb.Usage(**SMALL_USED), final=True)
        print(f"  final commit: charged {funding(c.charged)}; {windows(c.windows)}")
    checks.expect(False, f"a free account was denied within {MAX_SMALL_TASKS} tasks")


def long_task_onto_credits(client: QuotaClient, account: str, checks: Checks) -> int:
    """A long agent task reporting cumulative usage after every chunk. It holds one chunk
    ahead; each partial commit charges what is new and renews the hold, on credits once the
    plan's included usage is used up. Returns the credits it spent, in micro-credits."""
    task = f"{account}-long"
    r = client.reserve(account, task, "codex", usage_times(CHUNK, 1))
    print(f"task long (codex): reserve {credits(r.estimate_micros)} credits per chunk")
    if r.decision != pb.ALLOW:
        show_deny(r)
        checks.expect(False, "the plus account may start its task")
        return 0
    print(f"  ALLOW  held {funding(r.held)}")
    reservation = r.reservation_id
    charged_plan = charged_credits = 0
    on_credits_since = None
    chunks = 0
    final = None
    while final is None:
        chunks += 1
        # ... one chunk of agent work happens here ...
        so_far = usage_times(CHUNK, chunks)
        # The demo's task ends one chunk after credits started paying.
        last = on_credits_since is not None or chunks == MAX_CHUNKS
        c = client.commit(account, reservation, so_far, final=last)
        charged_plan += c.charged.plan_micros
        charged_credits += c.charged.credit_micros
        label = "final commit" if last else "partial commit"
        line = f"  chunk {chunks}, {label}: charged {funding(c.charged)}"
        if last:
            final = c
        elif c.may_continue:
            line += "; may continue"
            if c.charged.credit_micros > 0 and on_credits_since is None:
                on_credits_since = chunks
                line += "  <- the plan's included usage ran out: credits pay from here"
        else:
            # The next chunk is not funded: stop the work and finish with what was used.
            print(line)
            print(
                f"  not funded further: {pb.DenyReason.Name(c.reason)}, action "
                f"{pb.Action.Name(c.action)}: {c.message}"
            )
            final = client.commit(account, reservation, so_far, final=True)
            line = f"  stopped, final commit: charged {funding(final.charged)}"
        print(line)
    total = final.charged_total
    print(f"  task total: {funding(total)}; {windows(final.windows)}")
    checks.expect(on_credits_since is not None, "the task went on past the plan onto credits")
    checks.expect(total.plan_micros > 0 and total.credit_micros > 0, "the task was paid by both")
    checks.expect(
        (total.plan_micros, total.credit_micros) == (charged_plan, charged_credits),
        "the commits' charges add up to the task's total",
    )
    checks.expect(not final.may_continue, "a final commit ends the task")
    checks.expect(
        final.held.plan_micros == 0 and final.held.credit_micros == 0,
        "a final commit holds nothing",
    )
    return total.credit_micros


def cancelled_task(client: QuotaClient, account: str, checks: Checks) -> None:
    task = f"{account}-cancelled"
    r = client.reserve(account, task, "excel", usage_times(CHUNK, 1))
    print(f"task cancelled (excel): reserve {credits(r.estimate_micros)} credits")
    if r.decision != pb.ALLOW:
        show_deny(r)
        checks.expect(False, "the plus account may start a second task")
        return
    print(f"  ALLOW  held {funding(r.held)}")
    # The user presses stop before the task used anything: Release returns the hold. (Had it
    # used something since its last commit, a final Commit with that usage would end it
    # instead: Release charges nothing.)
    released = client.release(account, r.reservation_id).released
    print(f"  cancelled: Release returned {funding(released)}")
    checks.expect(
        (released.plan_micros, released.credit_micros)
        == (r.held.plan_micros, r.held.credit_micros),
        "Release returns the whole hold",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default=os.environ.get("QUOTAD_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--quota-token", default=os.environ.get("QUOTAD_QUOTA_TOKEN"))
    parser.add_argument("--admin-token", default=os.environ.get("QUOTAD_ADMIN_TOKEN"))
    parser.add_argument("--run-id", default=f"demo-{secrets.token_hex(4)}")
    parser.add_argument(
        "--deadline", type=float, default=30.0, help="seconds per call, retries included"
    )
    args = parser.parse_args()
    if not args.admin_token:
        parser.error("the demo's setup needs the admin token: --admin-token or QUOTAD_ADMIN_TOKEN")

    print(f"quotad at {args.addr}, accounts {args.run_id}-*")
    client = QuotaClient(args.addr, args.quota_token, args.admin_token, args.deadline)
    checks = Checks()
    try:
        free_user_until_denied(client, f"{args.run_id}-free", checks)

        plus = f"{args.run_id}-plus"
        print(f"== plus account {plus}: a long task onto credits, then a cancelled one")
        client.set_plan(plus, "plus")
        lot = client.grant(plus, f"{plus}-purchase-1", GRANT_MICROS).lot
        print(f"setup: plan plus, granted {credits(lot.granted_micros)} credits ({lot.lot_id})")
        spent = long_task_onto_credits(client, plus, checks)
        cancelled_task(client, plus, checks)

        u = client.usage(plus)
        print(
            f"usage: plan {u.plan}; {windows(u.windows)}; balance "
            f"{credits(u.credit_balance_micros)} credits; spent {credits(u.ledger.spent_micros)}; "
            f"{len(u.holds)} open holds"
        )
        checks.expect(u.ledger.spent_micros == spent, "the ledger shows what the task spent")
        checks.expect(
            u.credit_balance_micros == GRANT_MICROS - spent, "the balance is the grant less that"
        )
        checks.expect(len(u.holds) == 0, "no reservation is left open")
    except grpc.RpcError as err:
        print(f"FAILED: {err.code().name}: {err.details()}")
        return 1
    finally:
        client.close()

    if client.retries:
        print(f"{client.retries} calls were retried")
    if checks.failed:
        print(f"FAILED: {len(checks.failed)} checks: {'; '.join(checks.failed)}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
