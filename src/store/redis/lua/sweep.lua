-- Sweep: settle an account whose earliest hold has expired, so that holds of a client that
-- died are returned even if the account is never used again. Safe to run from every replica
-- at once: settling twice changes nothing more. Returns {next} (the next hold expiry, if any).
if not load_account() then
  call('ZREM', K_HOLDIDX, ID)
  call('ZREM', K_PURCHASEIDX, ID)
  return J({ gone = true })
end
settle()
finish()
local next_expiry = nil
for _, r in pairs(OPEN) do
  if next_expiry == nil or r.ex < next_expiry then next_expiry = r.ex end
end
-- The sweeper found the account in the index: make sure it leaves it when nothing is open
-- (an index entry the account does not remember, as after a restore, is dropped here).
if not next_expiry then call('ZREM', K_HOLDIDX, ID) end
return J({ next = next_expiry })
