// quotad from a Node backend: a free user gets the upgrade prompt, a plus user's long agent
// task runs past the plan's included usage onto credits, and a cancelled task returns its hold.
//
//   node dist/demo.js [--addr HOST:PORT] [--quota-token T] [--admin-token T] [--run-id ID]
//
// The address and tokens also come from QUOTAD_ADDR, QUOTAD_QUOTA_TOKEN and QUOTAD_ADMIN_TOKEN
// (the admin token only for the setup: moving the plus account to its plan and granting it
// credits). It prints what happens, checks what it saw, and exits 1 when something is off.
// Every run uses fresh accounts (`--run-id` names them), so it can run again on the same quotad.
// Against quotad's default plans the plus task takes about ten chunks to use up its 150 credits;
// `examples/demo.toml` has small limits that get there in three.

import { randomBytes } from "node:crypto";
import { parseArgs } from "node:util";

import type { ServiceError } from "@grpc/grpc-js";
import { status } from "@grpc/grpc-js";

import {
  Action,
  actionToJSON,
  CommitResponse,
  Decision,
  denyReasonToJSON,
  ReserveResponse,
  Usage,
  WindowStatus,
} from "./gen/quota/v1/quota";
import { QuotaClient, credits, funding } from "./quotaClient";

// A chunk of agent work: 60k input, 40k cached input and 8k output tokens of gpt-5.5, which
// costs 16 credits on the default price sheet.
const CHUNK = { model: "gpt-5.5", inputTokens: 60_000n, cachedInputTokens: 40_000n, outputTokens: 8_000n };
// A small task of a free user: 4 credits asked for, a little less used.
const SMALL_ESTIMATE = Usage.fromPartial({ model: "gpt-5.5", inputTokens: 16_000n, outputTokens: 2_000n });
const SMALL_USED = Usage.fromPartial({ model: "gpt-5.5", inputTokens: 15_000n, outputTokens: 1_800n });

const GRANT_MICROS = 100_000_000n; // the plus user's credits
const MAX_CHUNKS = 60; // far more than any plan here needs; a task still going then is a bug
const MAX_SMALL_TASKS = 30;

/** The cumulative usage after `n` chunks: Commit always carries the task's total so far. */
function usageTimes(n: number): Usage {
  const k = BigInt(n);
  return Usage.fromPartial({
    model: CHUNK.model,
    inputTokens: CHUNK.inputTokens * k,
    cachedInputTokens: CHUNK.cachedInputTokens * k,
    outputTokens: CHUNK.outputTokens * k,
  });
}

function windows(ws: WindowStatus[]): string {
  return ws
    .map((w) => `${w.name} used ${credits(w.usedMicros)} / ${credits(w.limitMicros)} credits`)
    .join(", ");
}

/** What a frontend shows the user: the message, and the action as a button. */
function showDeny(r: ReserveResponse): void {
  let line = `  DENY   ${denyReasonToJSON(r.reason)}: action ${actionToJSON(r.action)}`;
  if (r.upgradeTo) {
    line += `, upgrade to ${r.upgradeTo}`;
  }
  if (r.retryAt) {
    line += `, retry at ${r.retryAt.toISOString()}`;
  }
  console.log(line);
  console.log(`  message: ${r.message}`);
}

/** What the demo expects to have seen; a failed check makes the exit status 1. */
class Checks {
  readonly failed: string[] = [];

  expect(ok: boolean, what: string): void {
    if (!ok) {
      this.failed.push(what);
      console.log(`  CHECK FAILED: ${what}`);
    }
  }
}

async function freeUserUntilDenied(client: QuotaClient, account: string, checks: Checks): Promise<void> {
  console.log(`== free account ${account}: small tasks until the plan says no`);
  for (let n = 1; n <= MAX_SMALL_TASKS; n++) {
    // The request id comes from the task: the same on every retry of this Reserve.
    const r = await client.reserve(account, `${account}-task-${n}`, "codex", SMALL_ESTIMATE, "free");
    console.log(`task ${n}: reserve ${credits(r.estimateMicros)} credits`);
    if (r.decision === Decision.DENY) {
      showDeny(r);
      checks.expect(r.action === Action.UPGRADE_PLAN, "a free account is offered an upgrade");
      checks.expect(r.upgradeTo !== "", "the upgrade names a plan");
      checks.expect(r.message !== "", "the deny carries a message to show");
      checks.expect(n > 1, "the free account ran a task before its limit");
      return;
    }
    console.log(`  ALLOW  held ${funding(r.held)}`);
    const c = await client.commit(account, r.reservationId, SMALL_USED, true);
    console.log(`  final commit: charged ${funding(c.charged)}; ${windows(c.windows)}`);
  }
  checks.expect(false, `a free account was denied within ${MAX_SMALL_TASKS} tasks`);
}

/**
 * A long agent task reporting cumulative usage after every chunk. It holds one chunk ahead;
 * each partial commit charges what is new and renews the hold, on credits once the plan's
 * included usage is used up. Returns the credits it spent, in micro-credits.
 */
async function longTaskOntoCredits(client: QuotaClient, account: string, checks: Checks): Promise<bigint> {
  const r = await client.reserve(account, `${account}-long`, "codex", usageTimes(1));
  console.log(`task long (codex): reserve ${credits(r.estimateMicros)} credits per chunk`);
  if (r.decision !== Decision.ALLOW) {
    showDeny(r);
    checks.expect(false, "the plus account may start its task");
    return 0n;
  }
  console.log(`  ALLOW  held ${funding(r.held)}`);
  let chargedPlan = 0n;
  let chargedCredits = 0n;
  let onCreditsSince: number | undefined;
  let chunks = 0;
  let final: CommitResponse | undefined;
  while (final === undefined) {
    chunks++;
    // ... one chunk of agent work happens here ...
    const soFar = usageTimes(chunks);
    // The demo's task ends one chunk after credits started paying.
    const last = onCreditsSince !== undefined || chunks === MAX_CHUNKS;
    const c = await client.commit(account, r.reservationId, soFar, last);
    chargedPlan += c.charged?.planMicros ?? 0n;
    chargedCredits += c.charged?.creditMicros ?? 0n;
    let line = `  chunk ${chunks}, ${last ? "final" : "partial"} commit: charged ${funding(c.charged)}`;
    if (last) {
      final = c;
    } else if (c.mayContinue) {
      line += "; may continue";
      if ((c.charged?.creditMicros ?? 0n) > 0n && onCreditsSince === undefined) {
        onCreditsSince = chunks;
        line += "  <- the plan's included usage ran out: credits pay from here";
      }
    } else {
      // The next chunk is not funded: stop the work and finish with what was used.
      console.log(line);
      console.log(
        `  not funded further: ${denyReasonToJSON(c.reason)}, action ${actionToJSON(c.action)}: ${c.message}`,
      );
      final = await client.commit(account, r.reservationId, soFar, true);
      line = `  stopped, final commit: charged ${funding(final.charged)}`;
    }
    console.log(line);
  }
  const total = final.chargedTotal;
  const totalPlan = total?.planMicros ?? 0n;
  const totalCredits = total?.creditMicros ?? 0n;
  console.log(`  task total: ${funding(total)}; ${windows(final.windows)}`);
  checks.expect(onCreditsSince !== undefined, "the task went on past the plan onto credits");
  checks.expect(totalPlan > 0n && totalCredits > 0n, "the task was paid by both");
  checks.expect(
    totalPlan === chargedPlan && totalCredits === chargedCredits,
    "the commits' charges add up to the task's total",
  );
  checks.expect(!final.mayContinue, "a final commit ends the task");
  checks.expect(
    (final.held?.planMicros ?? 0n) === 0n && (final.held?.creditMicros ?? 0n) === 0n,
    "a final commit holds nothing",
  );
  return totalCredits;
}

async function cancelledTask(client: QuotaClient, account: string, checks: Checks): Promise<void> {
  const r = await client.reserve(account, `${account}-cancelled`, "excel", usageTimes(1));
  console.log(`task cancelled (excel): reserve ${credits(r.estimateMicros)} credits`);
  if (r.decision !== Decision.ALLOW) {
    showDeny(r);
    checks.expect(false, "the plus account may start a second task");
    return;
  }
  console.log(`  ALLOW  held ${funding(r.held)}`);
  // The user presses stop before the task used anything: Release returns the hold. (Had it
  // used something since its last commit, a final Commit with that usage would end it
  // instead: Release charges nothing.)
  const { released } = await client.release(account, r.reservationId);
  console.log(`  cancelled: Release returned ${funding(released)}`);
  checks.expect(
    released?.planMicros === r.held?.planMicros && released?.creditMicros === r.held?.creditMicros,
    "Release returns the whole hold",
  );
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      addr: { type: "string", default: process.env.QUOTAD_ADDR ?? "127.0.0.1:50051" },
      "quota-token": { type: "string", default: process.env.QUOTAD_QUOTA_TOKEN },
      "admin-token": { type: "string", default: process.env.QUOTAD_ADMIN_TOKEN },
      "run-id": { type: "string", default: `demo-${randomBytes(4).toString("hex")}` },
      // Seconds per call, retries included.
      deadline: { type: "string", default: "30" },
    },
  });
  const addr = values.addr!;
  const runId = values["run-id"]!;
  const adminToken = values["admin-token"];
  const deadlineSeconds = Number(values.deadline);
  if (!adminToken) {
    console.error("the demo's setup needs the admin token: --admin-token or QUOTAD_ADMIN_TOKEN");
    return 2;
  }
  if (!(deadlineSeconds > 0)) {
    console.error(`--deadline: a number of seconds above 0, not ${values.deadline}`);
    return 2;
  }

  console.log(`quotad at ${addr}, accounts ${runId}-*`);
  const client = new QuotaClient(addr, {
    quotaToken: values["quota-token"],
    adminToken,
    deadlineMs: deadlineSeconds * 1000,
  });
  const checks = new Checks();
  try {
    await freeUserUntilDenied(client, `${runId}-free`, checks);

    const plus = `${runId}-plus`;
    console.log(`== plus account ${plus}: a long task onto credits, then a cancelled one`);
    await client.setPlan(plus, "plus");
    const { lot } = await client.grant(plus, `${plus}-purchase-1`, GRANT_MICROS);
    console.log(`setup: plan plus, granted ${credits(lot?.grantedMicros ?? 0n)} credits (${lot?.lotId})`);
    const spent = await longTaskOntoCredits(client, plus, checks);
    await cancelledTask(client, plus, checks);

    const u = await client.usage(plus);
    console.log(
      `usage: plan ${u.plan}; ${windows(u.windows)}; balance ${credits(u.creditBalanceMicros)} credits; ` +
        `spent ${credits(u.ledger?.spentMicros ?? 0n)}; ${u.holds.length} open holds`,
    );
    checks.expect(u.ledger?.spentMicros === spent, "the ledger shows what the task spent");
    checks.expect(u.creditBalanceMicros === GRANT_MICROS - spent, "the balance is the grant less that");
    checks.expect(u.holds.length === 0, "no reservation is left open");
  } catch (err) {
    const e = err as ServiceError;
    if (e.code === undefined) {
      throw err;
    }
    console.log(`FAILED: ${status[e.code]}: ${e.details}`);
    return 1;
  } finally {
    client.close();
  }

  if (client.retries > 0) {
    console.log(`${client.retries} calls were retried`);
  }
  if (checks.failed.length > 0) {
    console.log(`FAILED: ${checks.failed.length} checks: ${checks.failed.join("; ")}`);
    return 1;
  }
  console.log("all checks passed");
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    console.error(err);
    process.exitCode = 1;
  },
);
