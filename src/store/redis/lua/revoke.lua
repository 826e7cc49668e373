-- RevokeGrant: take back what is left of a grant's lot, a refund or a chargeback
-- (AccountState::revoke). Acts once: a retry answers what the first call took back.
-- ARGV 4 grant id. Returns {revoked, balance}. Publishes the account id on the admin channel.
local gid = ARGV[4]
if not load_account() then return err({ kind = 'account_not_found', id = ID }) end
settle()
local record = call('HGET', K_GRANTS, gid)
if not record then
  finish()
  return err({ kind = 'grant_not_found', id = gid })
end
record = decode(record)
local revoked = tonumber(record.rv)
if not revoked then
  revoked = 0
  local kept = {}
  for _, l in ipairs(LOTS) do
    if l.id == gid then
      revoked = l.r
      W('HDEL', K_LOTS, l.id)
    else
      kept[#kept + 1] = l
    end
  end
  LOTS = kept
  A.revoked = A.revoked + revoked
  record.rv = int(revoked)
  W('HSET', K_GRANTS, gid, encode(record))
end
local top_up = tu_check()
finish()
publish_change()
return J({ revoked = revoked, balance = balance(), top_up = top_up and raw(top_up) or nil })
