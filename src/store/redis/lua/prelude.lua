-- quotad: the part every account operation shares. The library (library.rs) is this prelude
-- followed by one function per operation, each running begin() and then its body; it is loaded
-- once with FUNCTION LOAD and called with FCALL. Redis runs a function atomically, so an
-- operation on an account is one step and one round trip. This is a port of the rules in
-- src/domain/account/; the store contract suite runs the same tests against both.
--
-- KEYS (all hash-tagged by the account id, so they live in one Cluster slot):
--   1 acct     HASH  id, plan, cpa (credit purchase allowed 0/1), granted, spent, expired,
--                    revoked, debt, w5t, wwt (committed totals of the windows), and the auto
--                    top-up (domain/top_up.rs): tu_en (0/1), tu_th, tu_tg, tu_cap ('' = none),
--                    tu_seq (purchases started), tu_month, tu_bought, tu_decl (declines in a
--                    row), tu_quiet ('' or ms), tu_if (purchase in flight, JSON or ''), tu_last
--                    (last attempt, JSON or ''), evseq (charges recorded, the last event's
--                    seq), hx and pi (what the hold and purchase indexes hold for it, 0: nothing),
--                    w5h w5b w5a wwh wwb wwa (the windows' ends, see advance());
--                    a field is absent until it first differs from its default (0 or '')
--   2 w5       LIST  "bucket:amount" of the 5h window, oldest first (5-minute buckets)
--   3 ww       LIST  "bucket:amount" of the weekly window, oldest first (1-hour buckets)
--   4 lots     HASH  lot id -> {src, g (granted), r (remaining), ga (granted at), ex (expires at)}
--   5 open     HASH  reservation id -> open reservation
--   6 closed   HASH  reservation id -> how it ended (kept for retries)
--   7 closedz  ZSET  reservation id scored by when it ended (to forget in order)
--   8 req      HASH  request id -> first answer to a Reserve
--   9 reqz     ZSET  request id scored by when it was answered
--  10 grants   HASH  grant id -> {fp, lot, rv (what a revocation took back, once revoked)}
--  11 hist     STREAM the recent usage events (field e: event JSON), trimmed to the newest
--                    limits.recent_events
--  12 holdidx  ZSET  (one per Cluster slot, shared by the accounts of that slot) account id
--                    scored by its earliest open hold expiry, for the sweeper
--  13 purchidx ZSET  (one per slot) account id scored by when its auto top-up purchase in
--                    flight started, so that a replica can resume one a dead replica left
--  14 outbox   STREAM (one per slot) every charge's event (fields a: account id, e: event JSON)
--                    until the relay (redis/export.rs) has copied it into the export stream;
--                    for a Commit on a standalone Redis, the account's export stream itself
-- ARGV: 1 policy (JSON, see redis.rs), 2 now (ms since the epoch), 3 account id, 4.. the
-- operation's own.
--
-- Numbers: Lua numbers are IEEE doubles, which hold every integer up to 2^53 exactly, and the
-- scripts only add, subtract and compare integers (the one division, of an instant by a bucket
-- length, is floored and far from rounding trouble). quotad bounds every amount so that sums
-- stay below 2^53 micro-credits. Numbers are always written out with %d, never tostring, which
-- would round to 14 digits; records store them as decimal strings.
--
-- Results are JSON text built by J below; errors of the rules are results too ({"err": ...}).

-- What a call works on. The library is loaded once and its functions run one at a time, so
-- these are set afresh by begin() (at the end of this file) at the start of every call, and
-- nothing carries over from one call to the next but the decoded policy.
local K_ACCT, K_W5, K_WW, K_LOTS, K_OPEN, K_CLOSED, K_CLOSEDZ, K_REQ, K_REQZ, K_GRANTS, K_HIST, K_HOLDIDX
local K_PURCHASEIDX, K_OUTBOX
local P, P_TEXT -- the policy, decoded again only when its text changes
local NOW, NOW_TEXT, ID -- NOW_TEXT: as sent, for commands (a number would be formatted again)

-- The standard functions a call uses, as locals: a global is a lookup in the globals table at
-- every use, a local is not. They are set by init() on the library's first call (at FUNCTION
-- LOAD the libraries are not reachable yet). `globals` is defined before the names are made
-- local, so it reads the globals.
local function globals()
  return redis.call, redis.pcall, string.format, string.match, cjson.encode, cjson.decode, tonumber,
    pairs, ipairs, unpack, type, setmetatable, getmetatable, math.max, math.min, math.floor,
    table.concat, table.sort
end
local call, rpcall, format, match, encode, decode, tonumber, pairs, ipairs, unpack, type, setmetatable, getmetatable
local max, min, floor, concat, sort

-- Writes to the account's keys go through W, which notes the key: finish() refreshes the
-- lifetime of the keys this call wrote (each TTL, set when the key was last written, covers
-- what the key holds), not of every key on every call.
local DIRTY = {}
-- The lifetime of a written key, as text for PEXPIRE, when it is not the account's (set by
-- begin(): the windows keep their span, the records the retention).
local TTL = {}
local function W(command, key, ...)
  DIRTY[key] = true
  return call(command, key, ...)
end

local function int(x) return format('%d', x) end

-- JSON output ------------------------------------------------------------------------------
local ARRAY, RAW = {}, {}
local function array(t) return setmetatable(t or {}, ARRAY) end
local function raw(s) return setmetatable({ s = s }, RAW) end
local function J(v)
  local t = type(v)
  if t == 'number' then return int(v) end
  if t == 'string' then return encode(v) end
  if t == 'boolean' then return v and 'true' or 'false' end
  if v == nil then return 'null' end
  local mt = getmetatable(v)
  if mt == RAW then return v.s end
  local parts = {}
  if mt == ARRAY then
    for i = 1, #v do parts[i] = J(v[i]) end
    return '[' .. concat(parts, ',') .. ']'
  end
  -- Keys are the scripts' own identifiers, never user text: quoting them is enough.
  for k, x in pairs(v) do parts[#parts + 1] = '"' .. k .. '":' .. J(x) end
  return '{' .. concat(parts, ',') .. '}'
end
local function err(e) return J({ err = e }) end

-- The account record ------------------------------------------------------------------------
local A = nil -- the account hash as a table, numbers converted
local NUMERIC = {
  granted = true, spent = true, expired = true, revoked = true, debt = true, w5t = true, wwt = true,
  tu_th = true, tu_tg = true, tu_seq = true, tu_month = true, tu_bought = true, tu_decl = true,
  evseq = true, hx = true, pi = true, w5h = true, w5b = true, w5a = true, wwh = true, wwb = true, wwa = true,
}
local TEXT = { tu_en = '0', tu_cap = '', tu_quiet = '', tu_if = '', tu_last = '' }

-- A record with every field at its default (as NUMERIC and TEXT say; init() checks). Made by a
-- constructor so that the table is sized once, not grown field by field.
local function blank(id, plan, cpa)
  return {
    id = id, plan = plan, cpa = cpa, tu_en = '0', tu_cap = '', tu_quiet = '', tu_if = '', tu_last = '',
    granted = 0, spent = 0, expired = 0, revoked = 0, debt = 0, w5t = 0, wwt = 0, tu_th = 0, tu_tg = 0,
    tu_seq = 0, tu_month = 0, tu_bought = 0, tu_decl = 0, evseq = 0, hx = 0, pi = 0, w5h = 0, w5b = 0,
    w5a = 0, wwh = 0, wwb = 0, wwa = 0,
  }
end

-- The fields as the hash held them when loaded (numbers converted, as in A; absent ones at
-- their defaults, id, plan and cpa at false): save_account() writes back only what changed
-- (rewriting the whole record was the costliest command of a call), and formats only those.
local SAVED = nil

local function load_account()
  local flat = call('HGETALL', K_ACCT)
  if #flat == 0 then return false end
  A, SAVED = blank(false, false, false), blank(false, false, false)
  for i = 1, #flat, 2 do
    local k, v = flat[i], flat[i + 1]
    -- (+ 0 rather than tonumber, which parses a string twice; these are always our digits)
    if NUMERIC[k] then v = v + 0 end
    SAVED[k], A[k] = v, v
  end
  return true
end

local function create_account(id, plan)
  A, SAVED = blank(id, plan, '1'), blank(false, false, false)
end

-- A field never written reads as its default (load_account), so it is written only once it
-- differs: most accounts never touch auto top-up, and a short hash is quicker to read. Numbers
-- are compared as numbers and formatted only when changed.
local function save_account()
  local fields, n = {}, 0
  for k, v in pairs(A) do
    if SAVED[k] ~= v then
      fields[n + 1], fields[n + 2], n = k, NUMERIC[k] and int(v) or v, n + 2
      SAVED[k] = v
    end
  end
  if n > 0 then call('HSET', K_ACCT, unpack(fields)) end
end

local function plan_of()
  return P.plans[A.plan]
end

-- Windows -----------------------------------------------------------------------------------
local WINDOWS = {
  { key = K_W5, total = 'w5t', head = 'w5h', tb = 'w5b', ta = 'w5a', name = '5h', len = 5 * 3600000,
    bucket = 300000, limit = 'l5' },
  { key = K_WW, total = 'wwt', head = 'wwh', tb = 'wwb', ta = 'wwa', name = 'weekly', len = 7 * 86400000,
    bucket = 3600000, limit = 'lw' },
}

local function parse_bucket(s)
  local b, a = match(s, '^(-?%d+):(-?%d+)$')
  return tonumber(b), tonumber(a)
end

local function leaves_at(w, b) return (b + 1) * w.bucket + w.len end

-- The account record mirrors each list's ends: when its head bucket leaves (w5h, wwh) and
-- its tail bucket and amount (w5b/w5a, wwb/wwa); -1 when the list is empty, 0 when not known
-- (a record written before the mirror). A call then reads a list only when a bucket leaves,
-- instead of up to three times.
local function empty(w)
  A[w.total], A[w.head], A[w.tb], A[w.ta] = 0, -1, -1, 0
end

local function advance(w)
  local at = A[w.head]
  if at == -1 or at > NOW then return end
  while true do
    local head = call('LINDEX', w.key, '0')
    if not head then return empty(w) end -- an expired list means all of it had left
    local b, a = parse_bucket(head)
    at = leaves_at(w, b)
    if at > NOW then
      A[w.head] = at
      return
    end
    W('LPOP', w.key)
    A[w.total] = A[w.total] - a
  end
end

local function read_tail(w)
  if A[w.tb] ~= 0 then return end
  local tail = call('LINDEX', w.key, '-1')
  if tail then A[w.tb], A[w.ta] = parse_bucket(tail) else A[w.tb], A[w.ta] = -1, 0 end
end

-- After advance() (settle), so the head is known.
local function add_usage(w, amount)
  if amount == 0 then return end
  local b = floor(NOW / w.bucket)
  read_tail(w)
  if A[w.tb] >= b then
    -- (pcall: should the list have expired under a clock running ahead, start it again below)
    local ok = rpcall('LSET', w.key, '-1', format('%d:%d', A[w.tb], A[w.ta] + amount))
    if type(ok) == 'table' and ok.ok then
      DIRTY[w.key] = true
      A[w.ta] = A[w.ta] + amount
      A[w.total] = A[w.total] + amount
      return
    end
    empty(w)
  end
  W('RPUSH', w.key, format('%d:%d', b, amount))
  A[w.tb], A[w.ta] = b, amount
  if A[w.head] == -1 then A[w.head] = leaves_at(w, b) end
  A[w.total] = A[w.total] + amount
end

local function resets_at(w)
  read_tail(w)
  if A[w.tb] == -1 then return nil end
  return leaves_at(w, A[w.tb])
end

-- The earliest instant >= NOW at which committed usage is at most target (nil: never).
local function committed_at_most_at(w, target)
  if target < 0 then return nil end
  local remaining = A[w.total]
  if remaining <= target then return NOW end
  for _, entry in ipairs(call('LRANGE', w.key, '0', '-1')) do
    local b, a = parse_bucket(entry)
    remaining = remaining - a
    if remaining <= target then return leaves_at(w, b) end
  end
  return nil
end

-- Credit lots -------------------------------------------------------------------------------
local function decode_lot(id, s)
  local l = decode(s)
  return { id = id, src = l.src, g = tonumber(l.g), r = tonumber(l.r), ga = tonumber(l.ga), ex = tonumber(l.ex) }
end

local function encode_lot(l)
  return encode({ src = l.src, g = int(l.g), r = int(l.r), ga = int(l.ga), ex = int(l.ex) })
end

local function lot_rank(l) return l.src == 'promo' and 0 or 1 end

-- Consumption order: earliest expiry, promotional before purchased, oldest grant, lot id.
local function before(a, b)
  if a.ex ~= b.ex then return a.ex < b.ex end
  local ra, rb = lot_rank(a), lot_rank(b)
  if ra ~= rb then return ra < rb end
  if a.ga ~= b.ga then return a.ga < b.ga end
  return a.id < b.id
end

local LOTS = nil -- lots with credits left, in consumption order
local function load_lots()
  LOTS = {}
  if A.granted == 0 then return end -- never granted a lot (grant_lot counts every one)
  local flat = call('HGETALL', K_LOTS)
  for i = 1, #flat, 2 do LOTS[#LOTS + 1] = decode_lot(flat[i], flat[i + 1]) end
  sort(LOTS, before)
end

local function expire_lots()
  local kept = {}
  for _, l in ipairs(LOTS) do
    if l.ex <= NOW then
      A.expired = A.expired + l.r
      W('HDEL', K_LOTS, l.id)
    else
      kept[#kept + 1] = l
    end
  end
  LOTS = kept
end

local function balance()
  local sum = 0
  for _, l in ipairs(LOTS) do sum = sum + l.r end
  return sum - A.debt
end

local function spend(amount)
  A.spent = A.spent + amount
  local left = amount
  local kept = {}
  for _, l in ipairs(LOTS) do
    if left > 0 then
      local take = min(l.r, left)
      l.r = l.r - take
      left = left - take
      if l.r == 0 then
        W('HDEL', K_LOTS, l.id)
      else
        W('HSET', K_LOTS, l.id, encode_lot(l))
      end
    end
    if l.r > 0 then kept[#kept + 1] = l end
  end
  LOTS = kept
  A.debt = A.debt + left
end

-- Adds a lot, paying off debt from it first; returns the amount that paid off debt.
local function grant_lot(l)
  A.granted = A.granted + l.g
  local pay_off = min(A.debt, l.r)
  A.debt = A.debt - pay_off
  l.r = l.r - pay_off
  if l.r > 0 then
    W('HSET', K_LOTS, l.id, encode_lot(l))
    LOTS[#LOTS + 1] = l
    sort(LOTS, before)
  end
  return pay_off
end

-- Reservations ------------------------------------------------------------------------------
local function decode_res(id, s)
  local r = decode(s)
  return {
    id = id, product = r.product, estimate = tonumber(r.est), ttl = tonumber(r.ttl), hp = tonumber(r.hp),
    hc = tonumber(r.hc), cp = tonumber(r.cp), cc = tonumber(r.cc), ex = tonumber(r.ex),
    usage = { model = r.model, i = tonumber(r.ui), c = tonumber(r.uc), o = tonumber(r.uo),
              img = tonumber(r.uimg), fast = r.fast },
  }
end

-- One format call instead of a table for cjson: this runs on every Reserve and Commit.
local RES_FORMAT = '{"product":%s,"est":"%d","ttl":"%d","hp":"%d","hc":"%d","cp":"%d","cc":"%d","ex":"%d",'
  .. '"model":%s,"ui":"%d","uc":"%d","uo":"%d","uimg":"%d","fast":%s}'
local function encode_res(r)
  local u = r.usage
  return format(RES_FORMAT, encode(r.product), r.estimate, r.ttl, r.hp, r.hc, r.cp, r.cc, r.ex,
    encode(u.model), u.i, u.c, u.o, u.img, u.fast and 'true' or 'false')
end

local OPEN = nil -- open reservations by id
local function load_open()
  OPEN = {}
  -- hx (finish) is 0 exactly when the account has no open hold: most calls of a busy
  -- account find none and skip the read.
  if A.hx == 0 then return end
  local flat = call('HGETALL', K_OPEN)
  for i = 1, #flat, 2 do OPEN[flat[i]] = decode_res(flat[i], flat[i + 1]) end
end

local function held()
  local plan, credit = 0, 0
  for _, r in pairs(OPEN) do
    plan = plan + r.hp
    credit = credit + r.hc
  end
  return plan, credit
end

-- Idempotency records (closed reservations, first answers to Reserves) are kept in a hash and
-- scored by when they were made in a sorted set. The rules forget a record once it is past the
-- retention (AccountState::settle); here a record past it is treated as forgotten when read
-- (read_record), and deleted when the next record of its kind is written (write_record): a
-- call that writes none reads no sorted set, and a record outlives its retention only until
-- the next write (or the key's own lifetime, the retention, runs out).

-- The record of `id`, or nil if there is none within the retention.
local function read_record(hash, zset, id)
  local record = call('HGET', hash, id)
  if not record then return nil end
  local at = call('ZSCORE', zset, id)
  if at and tonumber(at) <= NOW - P.retention_ms then return nil end
  return record
end

-- Writes a record, first deleting those past the retention (at most 1,000 a call, so a call's
-- work stays bounded; the rest go with the next records).
local function write_record(hash, zset, id, text)
  local old = call('ZRANGEBYSCORE', zset, '-inf', int(NOW - P.retention_ms), 'LIMIT', '0', '1000')
  if #old > 0 then
    W('HDEL', hash, unpack(old))
    W('ZREM', zset, unpack(old))
  end
  W('HSET', hash, id, text)
  W('ZADD', zset, NOW_TEXT, id)
end

-- How a reservation ended. `how`: a table, or its JSON text already made.
local function close(id, how)
  if type(how) ~= 'string' then how = encode(how) end
  write_record(K_CLOSED, K_CLOSEDZ, id, how)
end

-- Applies what time has done up to NOW (see AccountState::settle).
local function settle()
  load_open()
  for id, r in pairs(OPEN) do
    if r.ex <= NOW then
      W('HDEL', K_OPEN, id)
      close(id, { k = 'expired', rp = int(r.hp), rc = int(r.hc), at = int(r.ex) })
      OPEN[id] = nil
    end
  end
  load_lots()
  expire_lots()
  advance(WINDOWS[1])
  advance(WINDOWS[2])
end

-- Decisions ---------------------------------------------------------------------------------
local function plan_room(plan)
  local hp = held()
  local room = nil
  for _, w in ipairs(WINDOWS) do
    local r = max(plan[w.limit] - A[w.total] - hp, 0)
    if room == nil or r < room then room = r end
  end
  return room
end

local function credits_available()
  local _, hc = held()
  return balance() - hc
end

-- 'credits', or nil plus the deny's {barred, action, upgrade_to}.
local function route(plan, product)
  local product_credits = P.products[product] == true
  local function upgrade()
    if plan.up then return 'upgrade_plan', plan.up end
    return 'wait_for_reset', nil
  end
  if plan.credits and product_credits and A.cpa == '1' then return 'credits' end
  if plan.credits and product_credits then
    local action, to = upgrade()
    return nil, { barred = true, action = action, up = to }
  end
  if plan.credits then return nil, { barred = false, action = 'wait_for_reset' } end
  local action, to = upgrade()
  return nil, { barred = false, action = action, up = to }
end

-- When the windows can fund `need` again with `hp` held on the plan, and whether the weekly
-- window binds.
local function plan_refill(plan, need, hp)
  local fits = {}
  for i, w in ipairs(WINDOWS) do
    local at = committed_at_most_at(w, plan[w.limit] - hp - need)
    if at then fits[i] = { never = 0, at = at } else fits[i] = { never = 1, at = resets_at(w) or NOW } end
  end
  local f, wk = fits[1], fits[2]
  local weekly = wk.never > f.never or (wk.never == f.never and wk.at > f.at)
  local at = weekly and wk.at or f.at
  if at <= NOW then at = nil end
  return weekly, at
end

-- Returns plan part, credit part; or nil and the denial facts.
local function fund(plan, product, cost)
  local room = plan_room(plan)
  if cost <= room then return cost, 0 end
  local kind, deny = route(plan, product)
  if kind == 'credits' then
    local available = credits_available()
    local need = cost - room
    if available >= need then return room, need end
    local _, retry = plan_refill(plan, cost - max(available, 0), held())
    -- After declines, buying more will not help until the payment method is fixed.
    local action = A.tu_decl > 0 and 'update_payment_method' or 'buy_credits'
    return nil, { shortfall = 'credits', need = need, available = max(available, 0),
                  action = action, retry_at = retry, plan = A.plan, product = product }
  end
  local weekly, retry = plan_refill(plan, cost, held())
  return nil, { shortfall = deny.barred and 'barred' or 'window', weekly = weekly, action = deny.action,
                upgrade_to = deny.up, retry_at = retry, plan = A.plan, product = product }
end

-- Every answer carries the status, so it is formatted in one go rather than through J.
local WINDOW_FORMAT = '{"name":"%s","used":%d,"held":%d,"limit":%d,"resets_at":%d}'
local EMPTY_WINDOW_FORMAT = '{"name":"%s","used":%d,"held":%d,"limit":%d,"resets_at":null}'
local function window_json(w, plan, hp)
  local at = resets_at(w)
  return format(at and WINDOW_FORMAT or EMPTY_WINDOW_FORMAT, w.name, A[w.total] + hp, hp, plan[w.limit], at)
end

local function status_text(plan)
  local hp = held()
  return format('{"plan":%s,"windows":[%s,%s],"balance":%d}', encode(A.plan),
    window_json(WINDOWS[1], plan, hp), window_json(WINDOWS[2], plan, hp), balance())
end
local function status(plan) return raw(status_text(plan)) end

-- ',"name":text' for an optional member of an answer formatted by hand ('' when absent).
local function member(name, text)
  if text == nil then return '' end
  return ',"' .. name .. '":' .. text
end

-- Auto top-up (a port of domain/top_up.rs) ---------------------------------------------------

-- The calendar month (UTC) of an instant, as months since January of year 0.
local function month_index(ms)
  local z = floor(ms / 86400000) + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return y * 12 + m - 1
end

-- floor(a / b) for non-negative integers, exact (the division of doubles is corrected).
local function idiv(a, b)
  local q = floor(a / b)
  while q * b > a do q = q - 1 end
  while (q + 1) * b <= a do q = q + 1 end
  return q
end

local function tu_eligible()
  local plan = plan_of()
  return A.cpa == '1' and plan ~= nil and plan.credits == true
end

local function tu_roll_month()
  local month = month_index(NOW)
  if month ~= A.tu_month then
    A.tu_month = month
    A.tu_bought = 0
  end
end

local function tu_attempt(amount, outcome, error, payment_id)
  A.tu_last = J({ at = NOW, amount = amount, outcome = outcome, error = error, payment_id = payment_id })
end

-- The trigger (TopUp::check); returns the purchase JSON it started, or nil.
local function tu_check()
  if A.tu_en ~= '1' or A.tu_if ~= '' or not tu_eligible() then return nil end
  local available = credits_available()
  if available >= A.tu_th then return nil end
  if A.tu_quiet ~= '' and NOW < tonumber(A.tu_quiet) then return nil end
  tu_roll_month()
  local unit = max(P.top_up.purchase_unit_micros, 1)
  local short = A.tu_tg - available
  local wanted = idiv(short, unit) * unit
  if wanted < short then wanted = wanted + unit end
  local allowed = wanted
  if A.tu_cap ~= '' then
    allowed = min(idiv(max(tonumber(A.tu_cap) - A.tu_bought, 0), unit) * unit, wanted)
  end
  if allowed < wanted then
    tu_attempt(allowed, 'capped', 'the monthly cap allows ' .. int(allowed) .. ' of the ' .. int(wanted)
      .. ' micro-credits needed to reach the target', '')
    if allowed == 0 then return nil end
  end
  A.tu_seq = A.tu_seq + 1
  A.tu_if = J({ id = 'topup:' .. A.id .. ':' .. int(A.tu_seq), amount = allowed, started_at = NOW })
  if allowed == wanted then tu_attempt(allowed, 'pending', '', '') end
  return A.tu_if
end

local function tu_view()
  local view = { enabled = A.tu_en == '1', threshold = A.tu_th, target = A.tu_tg, declines = A.tu_decl }
  if A.tu_cap ~= '' then view.cap = tonumber(A.tu_cap) end
  if A.tu_last ~= '' then view.last = raw(A.tu_last) end
  if A.tu_if ~= '' then view.in_flight = raw(A.tu_if) end
  return view
end

local function plan_missing()
  return err({ kind = 'plan_missing', plan = A.plan })
end

-- Bookkeeping after a change: the sweeper's index and the keys' lifetimes.
local function finish()
  -- The slot's indexes change only when the earliest hold or the purchase in flight does; the
  -- account remembers what it last indexed (hx, pi; 0 = not indexed).
  local next_expiry = nil
  for _, r in pairs(OPEN) do
    if next_expiry == nil or r.ex < next_expiry then next_expiry = r.ex end
  end
  if (next_expiry or 0) ~= A.hx then
    if next_expiry then
      call('ZADD', K_HOLDIDX, int(next_expiry), A.id)
    else
      call('ZREM', K_HOLDIDX, A.id)
    end
    A.hx = next_expiry or 0
  end
  local started = 0
  if A.tu_if ~= '' then started = tonumber(decode(A.tu_if).started_at) end
  if started ~= A.pi then
    if started ~= 0 then
      call('ZADD', K_PURCHASEIDX, int(started), A.id)
    else
      call('ZREM', K_PURCHASEIDX, A.id)
    end
    A.pi = started
  end
  save_account()
  local keep = P.account_ttl_ms
  for _, l in ipairs(LOTS) do keep = max(keep, l.ex - NOW + P.account_ttl_ms) end
  keep = int(keep)
  call('PEXPIRE', K_ACCT, keep)
  for k in pairs(DIRTY) do
    local ttl = TTL[k]
    call('PEXPIRE', k, ttl == nil and keep or ttl)
  end
end

local function publish_change()
  call('PUBLISH', P.admin_channel, A.id)
end

local function account_json()
  return { id = A.id, plan = A.plan, cpa = A.cpa == '1' }
end

-- Every function starts with this call (account functions through begin()).
local function init()
  if call then return end
  call, rpcall, format, match, encode, decode, tonumber, pairs, ipairs, unpack, type, setmetatable,
    getmetatable, max, min, floor, concat, sort = globals()
  for _, w in ipairs(WINDOWS) do w.ttl = format('%d', w.len + w.bucket) end
  -- blank() must hold every field with its default.
  local b = blank(false, false, false)
  for k in pairs(NUMERIC) do assert(b[k] == 0, k) end
  for k, default in pairs(TEXT) do assert(b[k] == default, k) end
end

-- Every account function starts with this call.
local function begin(keys, args)
  K_ACCT, K_W5, K_WW, K_LOTS, K_OPEN, K_CLOSED, K_CLOSEDZ, K_REQ, K_REQZ, K_GRANTS, K_HIST, K_HOLDIDX =
    keys[1], keys[2], keys[3], keys[4], keys[5], keys[6], keys[7], keys[8], keys[9], keys[10], keys[11], keys[12]
  K_PURCHASEIDX, K_OUTBOX = keys[13], keys[14]
  init()
  if args[1] ~= P_TEXT then
    P, P_TEXT = decode(args[1]), args[1]
    P.retention_text = int(P.retention_ms)
  end
  NOW, NOW_TEXT, ID = tonumber(args[2]), args[2], args[3]
  DIRTY, SAVED, A, LOTS, OPEN = {}, nil, nil, nil, nil
  WINDOWS[1].key, WINDOWS[2].key = K_W5, K_WW
  local r = P.retention_text
  TTL = { [K_W5] = WINDOWS[1].ttl, [K_WW] = WINDOWS[2].ttl, [K_CLOSED] = r, [K_CLOSEDZ] = r, [K_REQ] = r, [K_REQZ] = r }
end
