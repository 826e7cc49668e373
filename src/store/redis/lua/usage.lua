-- GetUsage: settle, then describe the account (AccountState::snapshot). ARGV 4 how many recent
-- events. Returns {account, status, lots, recent, totals, credit_held, holds, top_up,
-- stable_until?}: stable_until is the first instant at which time alone changes the answer (a
-- hold or a lot expires, committed usage leaves a window), absent if none, so that a replica
-- keeps its copy no longer than that.
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
local stable_until = nil
local function sooner(at)
  if at > NOW and (stable_until == nil or at < stable_until) then stable_until = at end
end
for _, h in ipairs(holds) do sooner(h.expires_at) end
for _, l in ipairs(LOTS) do sooner(l.ex) end
sooner(A.w5h) -- when the oldest bucket leaves (-1: the window is empty)
sooner(A.wwh)
local _, credit_held = held()
return J({
  account = account_json(), status = status(plan), lots = lots, recent = recent, holds = holds,
  totals = { granted = A.granted, spent = A.spent, expired = A.expired, revoked = A.revoked, balance = balance() },
  credit_held = credit_held, top_up = tu_view(), stable_until = stable_until,
})
