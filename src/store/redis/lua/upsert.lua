-- UpsertAccount: create an account or change its plan and credit eligibility; windows, holds
-- and credits stay. ARGV 4 plan, 5 credit purchase allowed (1/0). Returns {account}.
-- Publishes the account id on the admin channel.
if not load_account() then create_account(ID, ARGV[4]) end
settle()
A.plan, A.cpa = ARGV[4], ARGV[5]
finish()
publish_change()
return J({ account = account_json() })
