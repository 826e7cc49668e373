-- GrantCredits: add a credit lot (AccountState::grant). ARGV 4 grant id, 5 amount, 6 source,
-- 7 expires at (ms; quotad fills in the 12-month default), 8 grant fingerprint.
-- Returns {lot, balance}. Publishes the account id on the admin channel.
local gid, amount, source, ex, fp = ARGV[4], tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), ARGV[8]
if not load_account() then return err({ kind = 'account_not_found', id = ID }) end
settle()
local first = call('HGET', K_GRANTS, gid)
if first then
  first = decode(first)
  finish()
  if first.fp ~= fp then return err({ kind = 'grant_reused', id = gid }) end
  return J({ lot = raw(first.lot), balance = balance() })
end
if A.granted + amount > 9007199254740991 then -- 2^53 - 1: past it, doubles are not exact
  finish()
  return err({ kind = 'lifetime_grants_too_large' })
end
if ex <= NOW then
  finish()
  return err({ kind = 'expiry_not_in_future', at = ex })
end
local lot = { id = gid, src = source, g = amount, r = amount, ga = NOW, ex = ex }
grant_lot(lot)
local lot_json = J({ id = gid, source = source, granted = amount, remaining = lot.r, granted_at = NOW, expires_at = ex })
W('HSET', K_GRANTS, gid, encode({ fp = fp, lot = lot_json }))
finish()
publish_change()
return J({ lot = raw(lot_json), balance = balance() })
