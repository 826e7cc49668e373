-- GetUsage: settle, then describe the account (AccountState::snapshot). ARGV 4 how many recent
-- events. Returns {account, status, lots, recent, totals, credit_held, holds}.
local limit = tonumber(ARGV[4])
if not load_account() then return err({ kind = 'account_not_found', id = ID }) end
settle()
local plan = plan_of()
finish()
if not plan then return plan_missing() end
local holds = array()
for _, r in pairs(OPEN) do
  holds[#holds + 1] = { id = r.id, product = r.product, held = { plan = r.hp, credit = r.hc },
                        charged = { plan = r.cp, credit = r.cc }, expires_at = r.ex }
end
table.sort(holds, function(a, b)
  if a.expires_at ~= b.expires_at then return a.expires_at < b.expires_at end
  return a.id < b.id
end)
local lots = array()
for i, l in ipairs(LOTS) do
  lots[i] = { id = l.id, source = l.src, granted = l.g, remaining = l.r, granted_at = l.ga, expires_at = l.ex }
end
local recent = array()
if limit > 0 then
  for i, entry in ipairs(call('XREVRANGE', K_HIST, '+', '-', 'COUNT', limit)) do recent[i] = raw(entry[2][2]) end
end
local _, credit_held = held()
return J({
  account = account_json(), status = status(plan), lots = lots, recent = recent, holds = holds,
  totals = { granted = A.granted, spent = A.spent, expired = A.expired, revoked = A.revoked, balance = balance() },
  credit_held = credit_held, top_up = tu_view(),
})
