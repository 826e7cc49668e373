-- Reserve: hold the priced estimate, or deny (AccountState::reserve). Creates the account on
-- first sight. ARGV 4 request id, 5 cost, 6 product, 7 plan hint ('' = default), 8 ttl (ms),
-- 9 reservation id, 10 request fingerprint, 11 estimate model, 12 wait for top-up (1/0).
-- Returns {decision: {allow: {id, held, expires_at}} | {deny: facts}, estimate, status,
-- shadow?}. The first answer to a request id is recorded, and a retry gets it back. With
-- ARGV 12 = 1, a deny for want of credits while an auto top-up purchase is in flight is answered
-- with awaiting = true and not recorded, so that quotad may wait for the purchase and ask again.
-- In shadow mode (plan.shadow) what would be a deny is allowed, held on the plan, and answered
-- with the deny's facts as shadow.
local request_id, cost, product, hint = ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7]
local ttl, rid, fp, model = tonumber(ARGV[8]), ARGV[9], ARGV[10], ARGV[11]

if not load_account() then create_account(ID, hint ~= '' and hint or P.default_plan) end
settle()
local first = read_record(K_REQ, K_REQZ, request_id)
local plan = plan_of()
if first then
  first = decode(first)
  finish()
  if first.fp ~= fp then return err({ kind = 'request_reused', id = request_id }) end
  if not plan then return plan_missing() end
  return J({ decision = raw(first.d), estimate = tonumber(first.e), status = status(plan) })
end
if not plan then
  finish()
  return plan_missing()
end

local hp, hc = fund(plan, product, cost)
if not hp and hc.shortfall == 'credits' and ARGV[12] == '1' then
  local top_up = tu_check()
  if A.tu_if ~= '' then
    finish()
    return J({
      decision = raw(J({ deny = hc })), estimate = cost, status = status(plan),
      top_up = top_up and raw(top_up) or nil, awaiting = true,
    })
  end
end
-- Shadow mode: the work goes ahead, held on the plan beyond its limits.
local shadow
if not hp and plan.shadow then shadow, hp, hc = hc, cost, 0 end
local decision
if hp then
  local r = {
    id = rid, product = product, estimate = cost, ttl = ttl, hp = hp, hc = hc, cp = 0, cc = 0, ex = NOW + ttl,
    usage = { model = model, i = 0, c = 0, o = 0, img = 0, fast = false },
  }
  W('HSET', K_OPEN, rid, encode_res(r))
  OPEN[rid] = r
  decision = format('{"allow":{"id":%s,"held":{"plan":%d,"credit":%d},"expires_at":%d}}', encode(rid), hp, hc, r.ex)
else
  decision = J({ deny = hc })
end
write_record(K_REQ, K_REQZ, request_id, format('{"fp":%s,"d":%s,"e":"%d"}', encode(fp), encode(decision), cost))
local top_up = tu_check()
finish()
return format('{"decision":%s,"estimate":%d,"status":%s%s%s}', decision, cost, status_text(plan),
  member('top_up', top_up), member('shadow', shadow and J(shadow)))
