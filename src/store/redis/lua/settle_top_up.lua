-- Settle an auto top-up purchase with the payment's result (AccountState::settle_top_up). An
-- approved purchase becomes a lot (source auto_top_up, id the purchase id); an answer for a
-- purchase that is not in flight changes nothing. ARGV 4 purchase id, 5 approved | declined |
-- failed, 6 payment id (approved) or error, 7 the lot's expiry (ms; quotad adds 12 months).
-- Returns {view, top_up?, balance}. Publishes the account id on the admin channel.
local pid, kind, detail, lot_expiry = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
if not load_account() then return err({ kind = 'account_not_found', id = ID }) end
settle()
if A.tu_if ~= '' then
  local p = decode(A.tu_if)
  local amount = tonumber(p.amount)
  if p.id == pid and kind == 'approved' then
    A.tu_if = ''
    tu_roll_month()
    A.tu_bought = A.tu_bought + amount
    A.tu_decl, A.tu_quiet = 0, ''
    tu_attempt(amount, 'succeeded', '', detail)
    local lot = { id = pid, src = 'auto_top_up', g = amount, r = amount, ga = NOW, ex = lot_expiry }
    grant_lot(lot)
    local lot_json = J({ id = pid, source = 'auto_top_up', granted = amount, remaining = lot.r, granted_at = NOW, expires_at = lot_expiry })
    W('HSET', K_GRANTS, pid, encode({ fp = '0', lot = lot_json }))
  elseif p.id == pid and kind == 'declined' then
    A.tu_if = ''
    A.tu_decl = A.tu_decl + 1
    A.tu_quiet = int(NOW + P.top_up.decline_backoff_ms)
    local error = detail
    if A.tu_decl >= P.top_up.max_declines then
      A.tu_en = '0'
      error = error .. '; auto top-up turned off after ' .. int(A.tu_decl) .. ' declines in a row'
    end
    tu_attempt(amount, 'declined', error, '')
  elseif p.id == pid then
    tu_attempt(amount, 'failed', detail, '')
  end
end
local purchase = tu_check()
finish()
publish_change()
return J({ view = tu_view(), top_up = purchase and raw(purchase) or nil, balance = balance() })
