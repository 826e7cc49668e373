-- Commit: charge a task's cumulative usage (AccountState::commit). ARGV 4 reservation id,
-- 5 cumulative cost, 6 final (1/0), 7 commit fingerprint, 8 usage JSON {model, i, c, o, img,
-- fast} with counts as decimal strings, 9 price version, 10 recent-event capacity, 11 the export
-- stream's length limit when KEYS[14] is the export stream itself ('' when it is the slot's
-- outbox, see redis/export.rs).
-- Returns {receipt: {final, charged, total, held?, expires_at?, denial?}, status, event?,
-- shadow?} (shadow: the next chunk was funded by shadow mode; the deny facts it would have had).
local rid, cost, is_final, fp = ARGV[4], tonumber(ARGV[5]), ARGV[6] == '1', ARGV[7]
local u = decode(ARGV[8])
local usage = { model = u.model, i = tonumber(u.i), c = tonumber(u.c), o = tonumber(u.o), img = tonumber(u.img), fast = u.fast }
local price_version, capacity = ARGV[9], tonumber(ARGV[10])

if not load_account() then return err({ kind = 'account_not_found', id = ID }) end
settle()
local plan = plan_of()
if not plan then
  finish()
  return plan_missing()
end
local r = OPEN[rid]
if not r then
  local closed = read_record(K_CLOSED, K_CLOSEDZ, rid)
  finish()
  if not closed then return err({ kind = 'reservation_not_found', id = rid }) end
  closed = decode(closed)
  if closed.k == 'committed' then
    if is_final and closed.fp == fp then return J({ receipt = raw(closed.receipt), status = status(plan) }) end
    return err({ kind = 'already_committed', id = rid, by_commit = true })
  end
  if closed.k == 'released' then return err({ kind = 'already_released', id = rid }) end
  return err({ kind = 'reservation_expired', id = rid, at = tonumber(closed.at) })
end

-- Out of the open set while the account's other state is read, as in the Rust model.
OPEN[rid] = nil
local delta = max(cost - (r.cp + r.cc), 0)
local hold_plan = min(delta, r.hp)
local hold_credit = min(delta - hold_plan, r.hc)
local beyond = delta - hold_plan - hold_credit
r.hp, r.hc = 0, 0
-- Beyond the hold: plan allowance first, then credits on the credits route, else plan overage.
local beyond_plan = beyond
if route(plan, r.product) == 'credits' then
  beyond_plan = min(beyond, max(plan_room(plan) - hold_plan, 0))
end
local cp, cc = hold_plan + beyond_plan, hold_credit + beyond - beyond_plan
add_usage(WINDOWS[1], cp)
add_usage(WINDOWS[2], cp)
spend(cc)
r.cp, r.cc = r.cp + cp, r.cc + cc
local event = nil
if delta > 0 then
  -- Recorded for GetUsage (bounded) and, atomically with the charge, for the usage export.
  A.evseq = A.evseq + 1
  local was = r.usage
  local i, c, o, img = max(usage.i - was.i, 0), max(usage.c - was.c, 0), max(usage.o - was.o, 0),
    max(usage.img - was.img, 0)
  local product, model, fast = encode(r.product), encode(usage.model), usage.fast and 'true' or 'false'
  event = format('{"seq":%d,"at":%d,"product":%s,"reservation_id":%s,"price_version":%s,'
    .. '"charged":{"plan":%d,"credit":%d},"usage":{"model":%s,"i":%d,"c":%d,"o":%d,"img":%d,"fast":%s}}',
    A.evseq, NOW, product, encode(rid), encode(price_version), cp, cc, model, i, c, o, img, fast)
  if capacity > 0 then W('XADD', K_HIST, 'MAXLEN', ARGV[10], '*', 'e', event) end
  if ARGV[11] == '' then
    call('XADD', K_OUTBOX, '*', 'a', ID, 'e', event)
  else
    -- The entry as the relay would write it (wire::export_json, README "Entry format").
    local id = ID .. ':' .. int(A.evseq)
    call('XADD', K_OUTBOX, 'MAXLEN', '~', ARGV[11], '*', 'id', id, 'event', format(
      '{"id":%s,"account_id":%s,"seq":%d,"at_ms":%d,"product":%s,"model":%s,"input_tokens":%d,'
      .. '"cached_input_tokens":%d,"output_tokens":%d,"images":%d,"fast_mode":%s,"plan_micros":%d,'
      .. '"credit_micros":%d,"reservation_id":%s,"price_version":%s}',
      encode(id), encode(ID), A.evseq, NOW, product, model, i, c, o, img, fast, cp, cc, encode(rid),
      encode(price_version)))
  end
end
local had = r.usage
r.usage = { model = usage.model, fast = usage.fast, i = max(had.i, usage.i), c = max(had.c, usage.c),
            o = max(had.o, usage.o), img = max(had.img, usage.img) }

local receipt, shadow
if is_final then
  receipt = format('{"final":true,"charged":{"plan":%d,"credit":%d},"total":{"plan":%d,"credit":%d}}',
    cp, cc, r.cp, r.cc)
  W('HDEL', K_OPEN, rid)
  close(rid, format('{"k":"committed","fp":%s,"receipt":%s}', encode(fp), encode(receipt)))
else
  r.ex = NOW + r.ttl
  local hp, hc = fund(plan, r.product, r.estimate)
  local denial = nil
  if hp then
    r.hp, r.hc = hp, hc
  elseif plan.shadow then
    -- Shadow mode: the next chunk goes ahead on the plan, as a Reserve would.
    shadow, r.hp, r.hc = hc, r.estimate, 0
  else
    denial = hc
  end
  receipt = J({ final = false, charged = { plan = cp, credit = cc }, total = { plan = r.cp, credit = r.cc },
                held = { plan = r.hp, credit = r.hc }, expires_at = r.ex, denial = denial })
  OPEN[rid] = r
  W('HSET', K_OPEN, rid, encode_res(r))
end
local top_up = tu_check()
finish()
return format('{"receipt":%s,"status":%s%s%s%s}', receipt, status_text(plan), member('top_up', top_up),
  member('event', event), member('shadow', shadow and J(shadow)))
