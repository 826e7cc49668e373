-- SetAutoTopUp (AccountState::set_top_up): change the settings, and buy at once when turning it
-- on (or raising the threshold) finds the account below the threshold. The settings' shape was
-- checked when quotad made them (TopUpSettings::new), so it is not checked again here.
-- ARGV 4 enabled (1/0), 5 threshold, 6 target, 7 monthly cap ('' = none).
-- Returns {view, top_up?, balance}; top_up is a purchase to pay.
if not load_account() then return err({ kind = 'account_not_found', id = ID }) end
settle()
local enabled = ARGV[4] == '1'
if enabled and not tu_eligible() then
  finish()
  return err({ kind = 'top_up_not_allowed', id = ID, plan = A.plan })
end
local was_on, old_threshold = A.tu_en == '1', A.tu_th
A.tu_en = enabled and '1' or '0'
A.tu_th, A.tu_tg, A.tu_cap = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
if enabled and not was_on then
  -- Turned on again: earlier declines no longer hold it back.
  A.tu_decl, A.tu_quiet = 0, ''
end
local purchase = nil
if enabled and (not was_on or A.tu_th > old_threshold) then purchase = tu_check() end
finish()
return J({ view = tu_view(), top_up = purchase and raw(purchase) or nil, balance = balance() })
