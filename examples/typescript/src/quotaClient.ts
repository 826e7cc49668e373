// A small quotad client for a Node backend: the part to copy.
//
// It wraps the generated stubs (see ../README.md) with what every caller needs:
//
// - the quota token (and, for back-office calls, the admin token) as `authorization` metadata;
// - retries of UNAVAILABLE (quotad starting, its store out of reach, a call past quotad's own
//   timeout) and RESOURCE_EXHAUSTED (quotad shedding load), with capped, jittered exponential
//   back-off, within one deadline per call. A retry sends the very same request, so it carries
//   the same ids: quotad acts once per (account, request_id) on Reserve, per reservation on a
//   final Commit or Release, per grant_id on GrantCredits, and a partial Commit carries
//   cumulative usage, so a repeated one charges nothing twice.
//
// Every other status is thrown at once: it will not change by asking again.

import * as grpc from "@grpc/grpc-js";
import { setTimeout as sleep } from "node:timers/promises";

import {
  AdminServiceClient,
  CommitResponse,
  Funding,
  GetUsageResponse,
  GrantCreditsResponse,
  QuotaServiceClient,
  ReleaseResponse,
  ReserveResponse,
  Usage,
  Account,
} from "./gen/quota/v1/quota";

const RETRYABLE = new Set<number>([grpc.status.UNAVAILABLE, grpc.status.RESOURCE_EXHAUSTED]);

const MICROS_PER_CREDIT = 1_000_000n;

/** Micro-credits as a decimal number of credits, exactly (no floating point). */
export function credits(micros: bigint): string {
  const sign = micros < 0n ? "-" : "";
  const abs = micros < 0n ? -micros : micros;
  const whole = abs / MICROS_PER_CREDIT;
  const frac = abs % MICROS_PER_CREDIT;
  if (frac === 0n) {
    return `${sign}${whole}`;
  }
  return `${sign}${whole}.${frac.toString().padStart(6, "0").replace(/0+$/, "")}`;
}

/** `16 credits (plan 12.5, credits 3.5)`. */
export function funding(f: Funding | undefined): string {
  const plan = f?.planMicros ?? 0n;
  const paid = f?.creditMicros ?? 0n;
  return `${credits(plan + paid)} credits (plan ${credits(plan)}, credits ${credits(paid)})`;
}

export interface ClientOptions {
  quotaToken?: string;
  adminToken?: string;
  /** Bounds each call including its retries. */
  deadlineMs?: number;
  firstBackoffMs?: number;
  maxBackoffMs?: number;
  log?: (line: string) => void;
}

type Callback<Res> = (err: grpc.ServiceError | null, res: Res) => void;
type Send<Res> = (
  metadata: grpc.Metadata,
  options: Partial<grpc.CallOptions>,
  callback: Callback<Res>,
) => unknown;

/**
 * QuotaService (and AdminService, for setup) calls with retries. Back-off starts at
 * `firstBackoffMs`, doubles per attempt up to `maxBackoffMs`, and each wait is drawn between
 * half and all of that (jitter), so that many clients that failed together do not retry
 * together.
 */
export class QuotaClient {
  readonly quota: QuotaServiceClient;
  readonly admin: AdminServiceClient;
  retries = 0;
  private readonly quotaToken?: string;
  private readonly adminToken?: string;
  private readonly deadlineMs: number;
  private readonly firstBackoffMs: number;
  private readonly maxBackoffMs: number;
  private readonly log: (line: string) => void;

  constructor(addr: string, options: ClientOptions = {}) {
    const credentials = grpc.credentials.createInsecure();
    // Reconnect attempts to a quotad that is not up yet stay well inside a call's deadline.
    const channelOptions = { "grpc.max_reconnect_backoff_ms": 2_000 };
    this.quota = new QuotaServiceClient(addr, credentials, channelOptions);
    this.admin = new AdminServiceClient(addr, credentials, channelOptions);
    this.quotaToken = options.quotaToken;
    this.adminToken = options.adminToken;
    this.deadlineMs = options.deadlineMs ?? 30_000;
    this.firstBackoffMs = options.firstBackoffMs ?? 100;
    this.maxBackoffMs = options.maxBackoffMs ?? 2_000;
    this.log = options.log ?? console.log;
  }

  close(): void {
    this.quota.close();
    this.admin.close();
  }

  private async call<Res>(what: string, token: string | undefined, send: Send<Res>): Promise<Res> {
    const metadata = new grpc.Metadata();
    if (token) {
      metadata.set("authorization", `Bearer ${token}`);
    }
    const deadline = Date.now() + this.deadlineMs;
    for (let attempt = 0; ; attempt++) {
      try {
        return await new Promise<Res>((resolve, reject) => {
          send(metadata, { deadline }, (err, res) => (err ? reject(err) : resolve(res)));
        });
      } catch (err) {
        const e = err as grpc.ServiceError;
        if (!RETRYABLE.has(e.code)) {
          throw err;
        }
        const backoff = Math.min(this.maxBackoffMs, this.firstBackoffMs * 2 ** attempt);
        const wait = backoff / 2 + (Math.random() * backoff) / 2;
        if (Date.now() + wait >= deadline) {
          throw err;
        }
        this.retries++;
        this.log(
          `  retry ${attempt + 1}: ${what} answered ${grpc.status[e.code]} (${e.details}); ` +
            `again in ${(wait / 1000).toFixed(2)} s with the same ids`,
        );
        await sleep(wait);
      }
    }
  }

  // QuotaService: the calls a frontend makes around every task.

  /**
   * May the task start, and who pays? `requestId` must be the same on every retry (derive it
   * from your own task id), so that a retry never holds twice.
   */
  reserve(
    accountId: string,
    requestId: string,
    product: string,
    estimate: Usage,
    planHint = "",
  ): Promise<ReserveResponse> {
    const request = { accountId, requestId, product, estimate, planHint, ttlSeconds: 0 };
    return this.call(`Reserve ${requestId}`, this.quotaToken, (md, opts, cb) =>
      this.quota.reserve(request, md, opts, cb),
    );
  }

  /** Reports the task's cumulative usage so far (not the last chunk's). */
  commit(
    accountId: string,
    reservationId: string,
    usageSoFar: Usage,
    final: boolean,
  ): Promise<CommitResponse> {
    const request = { accountId, reservationId, usage: usageSoFar, final };
    return this.call(`Commit ${reservationId}`, this.quotaToken, (md, opts, cb) =>
      this.quota.commit(request, md, opts, cb),
    );
  }

  /** The task was cancelled: return what its reservation still holds. */
  release(accountId: string, reservationId: string): Promise<ReleaseResponse> {
    const request = { accountId, reservationId };
    return this.call(`Release ${reservationId}`, this.quotaToken, (md, opts, cb) =>
      this.quota.release(request, md, opts, cb),
    );
  }

  usage(accountId: string): Promise<GetUsageResponse> {
    const request = { accountId, recentLimit: 0 };
    return this.call("GetUsage", this.quotaToken, (md, opts, cb) =>
      this.quota.getUsage(request, md, opts, cb),
    );
  }

  // AdminService: the billing back office (the demo's setup only).

  setPlan(accountId: string, plan: string): Promise<Account> {
    const request = { account: { accountId, plan, creditPurchaseAllowed: true } };
    return this.call("UpsertAccount", this.adminToken, (md, opts, cb) =>
      this.admin.upsertAccount(request, md, opts, cb),
    );
  }

  grant(accountId: string, grantId: string, amountMicros: bigint): Promise<GrantCreditsResponse> {
    const request = { accountId, grantId, amountMicros, source: "", expiresAt: undefined };
    return this.call("GrantCredits", this.adminToken, (md, opts, cb) =>
      this.admin.grantCredits(request, md, opts, cb),
    );
  }
}
