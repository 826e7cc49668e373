-- GetAccount: read the account record; changes nothing. Returns {account}.
if not load_account() then return err({ kind = 'account_not_found', id = ID }) end
return J({ account = account_json() })
