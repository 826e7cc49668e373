-- Release: return a reservation's hold (AccountState::release). ARGV 4 reservation id.
-- Returns {released}.
local rid = ARGV[4]
if not load_account() then return err({ kind = 'account_not_found', id = ID }) end
settle()
local r = OPEN[rid]
if r then
  W('HDEL', K_OPEN, rid)
  OPEN[rid] = nil
  close(rid, { k = 'released', rp = int(r.hp), rc = int(r.hc) })
  finish()
  return J({ released = { plan = r.hp, credit = r.hc } })
end
finish()
local closed = read_record(K_CLOSED, K_CLOSEDZ, rid)
if not closed then return err({ kind = 'reservation_not_found', id = rid }) end
closed = decode(closed)
if closed.k == 'committed' then return err({ kind = 'already_committed', id = rid, by_commit = false }) end
return J({ released = { plan = tonumber(closed.rp), credit = tonumber(closed.rc) } })
