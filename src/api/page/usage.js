// The usage page: one account's plan, windows, credits, running tasks, recent usage and auto
// top-up, read and changed through quotad's JSON door with the token the page was opened with.
//
// Amounts arrive as decimal strings of micro-credits and are shown and parsed with BigInt, so
// no amount ever passes through a floating-point number. Data is put in the page as text only.
"use strict";

const MICROS = 1000000n;
const $ = (id) => document.getElementById(id);
let session = null; // { token, account, canChangeTopUp }
let pending = null; // the SetAutoTopUp request the preview is about

// "16500000" → "16.5"; "1234000000" → "1,234".
function credits(micros) {
  let value = BigInt(micros ?? "0");
  const negative = value < 0n;
  if (negative) value = -value;
  let text = (value / MICROS).toLocaleString("en-US");
  const fraction = value % MICROS;
  if (fraction > 0n) text += "." + fraction.toString().padStart(6, "0").replace(/0+$/, "");
  return (negative ? "-" : "") + text;
}

// "12.5" → "12500000"; anything else (signs, exponents, a seventh decimal) → null.
function parseCredits(text) {
  const match = /^\s*(\d{1,12})(?:\.(\d{1,6}))?\s*$/.exec(text);
  if (!match) return null;
  return (BigInt(match[1]) * MICROS + BigInt((match[2] || "").padEnd(6, "0"))).toString();
}

function count(n) {
  return BigInt(n ?? "0").toLocaleString("en-US");
}

function when(iso) {
  if (!iso) return "—";
  return new Date(iso).toLocaleString("en-US", { dateStyle: "medium", timeStyle: "short", timeZone: "UTC" }) + " UTC";
}

// What an account-scoped token says about itself (its signature is quotad's to check).
function claims(token) {
  const parts = token.split(".");
  if (parts.length !== 4 || parts[0] !== "qat1") return null;
  try {
    return JSON.parse(atob(parts[2].replace(/-/g, "+").replace(/_/g, "/")));
  } catch {
    return null;
  }
}

async function call(method, body) {
  const response = await fetch("/v1/" + method, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer " + session.token },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({ code: "UNKNOWN", message: "quotad answered " + response.status }));
  if (!response.ok) {
    const error = new Error(answer.message || response.statusText);
    error.code = answer.code;
    error.field = answer.field;
    throw error;
  }
  return answer;
}

function say(message) {
  $("status").textContent = message;
}

function alarm(message) {
  $("alert").textContent = message;
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function row(table, cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.appendChild(element("td", cell));
  table.querySelector("tbody").appendChild(tr);
}

function fillTable(id, items, cells) {
  const table = $(id);
  table.querySelector("tbody").replaceChildren();
  for (const item of items) row(table, cells(item));
  table.hidden = items.length === 0;
  $(id + "-empty").hidden = items.length !== 0;
}

const WINDOW_NAMES = { "5h": "5-hour window", weekly: "Weekly limit" };

function renderWindows(windows) {
  const list = $("windows");
  list.replaceChildren();
  for (const w of windows) {
    const used = BigInt(w.usedMicros), held = BigInt(w.heldMicros), limit = BigInt(w.limitMicros);
    const item = element("li");
    item.appendChild(element("div", WINDOW_NAMES[w.name] || w.name, "name"));
    const meter = element("div", undefined, "meter");
    meter.setAttribute("aria-hidden", "true");
    const share = (part) => (limit > 0n ? Number((part * 1000n) / limit) / 10 : 0);
    const usedBar = element("div", undefined, "used");
    usedBar.style.width = Math.min(100, share(used - held)) + "%";
    const heldBar = element("div", undefined, "held");
    heldBar.style.width = Math.min(100, share(held)) + "%";
    meter.append(usedBar, heldBar);
    item.appendChild(meter);
    let text = `${credits(w.usedMicros)} of ${credits(w.limitMicros)} credits used`;
    if (held > 0n) text += ` (${credits(w.heldMicros)} held by running tasks)`;
    item.appendChild(element("div", text));
    item.appendChild(element("div", "Resets " + when(w.resetsAt), "muted"));
    list.appendChild(item);
  }
}

function renderLedger(ledger) {
  const list = $("ledger");
  list.replaceChildren();
  const entries = [
    ["Available", ledger.availableMicros],
    ["Held by running tasks", ledger.heldMicros],
    ["Granted", ledger.grantedMicros],
    ["Spent", ledger.spentMicros],
    ["Expired", ledger.expiredMicros],
    ["Refunded", ledger.revokedMicros],
  ];
  for (const [name, micros] of entries) {
    list.appendChild(element("dt", name));
    list.appendChild(element("dd", credits(micros) + " credits"));
  }
}

function tokens(u) {
  let text = `in ${count(u.inputTokens)}`;
  if (BigInt(u.cachedInputTokens || "0") > 0n) text += ` (cached ${count(u.cachedInputTokens)})`;
  text += ` · out ${count(u.outputTokens)}`;
  if (u.images > 0) text += ` · ${u.images} image${u.images === 1 ? "" : "s"}`;
  return text;
}

function paidBy(f) {
  const plan = BigInt(f.planMicros), paid = BigInt(f.creditMicros);
  const parts = [];
  if (plan > 0n || paid === 0n) parts.push(`plan ${credits(f.planMicros)}`);
  if (paid > 0n) parts.push(`credits ${credits(f.creditMicros)}`);
  return parts.join(" · ");
}

function renderTopUp(t, purchaseAllowed) {
  let state = t.enabled
    ? `On: when available credits fall below ${credits(t.thresholdMicros)}, buy back up to ${credits(t.targetMicros)}`
    : "Off.";
  if (t.enabled && BigInt(t.monthlyCapMicros) > 0n) state += `, at most ${credits(t.monthlyCapMicros)} a month`;
  if (t.enabled) state += ".";
  if (t.inFlightPurchaseId) state += ` Buying ${credits(t.inFlightMicros)} credits now.`;
  if (t.lastAttempt) {
    const outcome = { SUCCEEDED: "bought", DECLINED: "declined", FAILED: "failed" }[t.lastAttempt.outcome] || t.lastAttempt.outcome;
    state += ` Last purchase: ${credits(t.lastAttempt.amountMicros)} credits ${outcome}, ${when(t.lastAttempt.at)}.`;
  }
  if (t.consecutiveDeclines > 0) state += ` ${t.consecutiveDeclines} declined in a row.`;
  $("top-up-state").textContent = state;
  if (!pending) {
    $("top-up-enabled").checked = t.enabled;
    const amount = (micros) => (BigInt(micros) > 0n ? credits(micros).replace(/,/g, "") : "");
    $("top-up-threshold").value = amount(t.thresholdMicros);
    $("top-up-target").value = amount(t.targetMicros);
    $("top-up-cap").value = amount(t.monthlyCapMicros);
  }
  const mayChange = session.canChangeTopUp && purchaseAllowed;
  $("top-up-form").hidden = !mayChange;
  $("top-up-readonly").hidden = mayChange;
  $("top-up-readonly").textContent = purchaseAllowed
    ? "This access can read usage but not change auto top-up."
    : "Auto top-up buys credits, which this account's plan cannot use: upgrade to use it.";
}

function render(u) {
  $("who").textContent = "Account " + session.account;
  $("plan").textContent = u.plan;
  $("purchase").textContent = u.creditPurchaseAllowed
    ? "Credits keep you working when the included usage runs out."
    : "Upgrade your plan to keep working when the included usage runs out.";
  renderWindows(u.windows);
  $("balance").textContent = credits(u.creditBalanceMicros);
  $("price").textContent = u.creditPrice ? "Price: " + u.creditPrice.summary + "." : "";
  renderLedger(u.ledger || {});
  fillTable("lots", u.lots, (l) => [(l.source || "grant").replace(/_/g, " "), credits(l.remainingMicros), credits(l.grantedMicros), when(l.expiresAt)]);
  fillTable("holds", u.holds, (h) => [h.product, paidBy(h.held), paidBy(h.charged), when(h.expiresAt)]);
  fillTable("recent", u.recent, (e) => [
    when(e.at),
    e.product,
    e.model + (e.usage && e.usage.fastMode ? " (fast)" : ""),
    tokens(e.usage || {}),
    paidBy(e.charged || { planMicros: "0", creditMicros: "0" }),
  ]);
  renderTopUp(u.autoTopUp || {}, u.creditPurchaseAllowed);
  $("usage").hidden = false;
}

async function load() {
  say("Loading…");
  try {
    const usage = await call("QuotaService/GetUsage", { accountId: session.account, recentLimit: 20 });
    alarm("");
    render(usage);
    say("Up to date as of " + new Date().toLocaleTimeString("en-US") + ".");
  } catch (error) {
    $("usage").hidden = true;
    $("who").textContent = "";
    say("");
    if (error.code === "PERMISSION_DENIED" || error.code === "UNAUTHENTICATED") {
      alarm(`This access does not open account ${session.account}: ${error.message}`);
      showSignIn();
    } else {
      alarm(error.message);
    }
  }
}

const FIELDS = { threshold_micros: "top-up-threshold", target_micros: "top-up-target", monthly_cap_micros: "top-up-cap" };

function markInvalid(id) {
  for (const input of document.querySelectorAll("#top-up-form input")) input.removeAttribute("aria-invalid");
  if (id) {
    $(id).setAttribute("aria-invalid", "true");
    $(id).focus();
  }
}

async function review(event) {
  event.preventDefault();
  alarm("");
  const request = { accountId: session.account, enabled: $("top-up-enabled").checked };
  for (const [field, id, name] of [
    ["thresholdMicros", "top-up-threshold", "The threshold"],
    ["targetMicros", "top-up-target", "The target"],
    ["monthlyCapMicros", "top-up-cap", "The monthly cap"],
  ]) {
    const text = $(id).value;
    if (field === "monthlyCapMicros" && text.trim() === "") {
      request[field] = "0";
      continue;
    }
    const micros = parseCredits(text);
    if (micros === null) {
      markInvalid(id);
      alarm(`${name} must be an amount of credits, such as 5 or 12.5 (up to six decimals).`);
      return;
    }
    request[field] = micros;
  }
  markInvalid(null);
  try {
    const preview = await call("AdminService/PreviewAutoTopUp", request);
    pending = request;
    $("preview-summary").textContent = preview.summary.charAt(0).toUpperCase() + preview.summary.slice(1) + ".";
    $("preview").hidden = false;
    $("preview").focus();
  } catch (error) {
    markInvalid(FIELDS[error.field]);
    alarm(error.message);
  }
}

async function confirm() {
  if (!pending) return;
  const button = $("preview-confirm");
  button.disabled = true;
  try {
    await call("AdminService/SetAutoTopUp", pending);
    pending = null;
    $("preview").hidden = true;
    await load();
    say("Auto top-up saved.");
    $("top-up-state").focus();
  } catch (error) {
    alarm(error.message);
  } finally {
    button.disabled = false;
  }
}

function cancel() {
  pending = null;
  $("preview").hidden = true;
  $("top-up-review").focus();
}

function showSignIn() {
  $("sign-in").hidden = false;
}

async function open(token, account) {
  const said = claims(token);
  const name = account || (said && said.a);
  if (!name) {
    showSignIn();
    alarm("Name the account to look up: the admin token opens any account.");
    return;
  }
  session = { token, account: name, canChangeTopUp: !said || (said.b || []).includes("change_top_up") };
  $("sign-in").hidden = true;
  if (!said) {
    // Support staff: the admin token mints an hour's token for this account, so the page's
    // calls are the ones a person's own token makes (and pass wherever those pass).
    try {
      const minted = await call("AdminService/MintAccountToken", {
        accountId: name,
        abilities: ["read_usage", "change_top_up"],
        ttlSeconds: 3600,
      });
      session.token = minted.token;
      // The admin token leaves the tab's storage; the account's token takes its place.
      sessionStorage.setItem("quotad.token", minted.token);
      sessionStorage.setItem("quotad.account", name);
    } catch (error) {
      // Without account tokens configured, the admin token itself is used.
      if (error.code !== "FAILED_PRECONDITION") {
        alarm(error.message);
        showSignIn();
        return;
      }
    }
  }
  await load();
}

// A link carries the token in the fragment (#token=…&account=…), which is never sent to a
// server; it moves to this tab's storage and leaves the address bar. Whether there was one.
function fromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (!params.get("token")) return false;
  sessionStorage.setItem("quotad.token", params.get("token"));
  sessionStorage.setItem("quotad.account", params.get("account") || "");
  history.replaceState(null, "", location.pathname + location.search);
  return true;
}

function openStored() {
  const token = sessionStorage.getItem("quotad.token");
  if (token) {
    open(token, sessionStorage.getItem("quotad.account"));
  } else {
    showSignIn();
  }
}

function start() {
  fromFragment();
  // Another link opened in this tab: the page follows it.
  window.addEventListener("hashchange", () => {
    if (fromFragment()) {
      pending = null;
      $("preview").hidden = true;
      openStored();
    }
  });
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("quotad.token", $("token").value.trim());
    sessionStorage.setItem("quotad.account", $("account").value.trim());
    open($("token").value.trim(), $("account").value.trim());
  });
  $("top-up-form").addEventListener("submit", review);
  $("preview-confirm").addEventListener("click", confirm);
  $("preview-cancel").addEventListener("click", cancel);
  $("refresh").addEventListener("click", load);
  $("sign-out").addEventListener("click", () => {
    sessionStorage.clear();
    session = null;
    $("usage").hidden = true;
    say("Signed out.");
    showSignIn();
  });
  $("top-up-state").tabIndex = -1;
  openStored();
}

start();
