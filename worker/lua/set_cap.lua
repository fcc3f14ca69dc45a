-- Store C. A worker starting writes its VIDQ_MAX_IN_FLIGHT, the deployment's
-- value; `vidq cap N` (an operator) overrides it, and that stands across
-- worker restarts until the deployment's value itself changes. Returns
-- {the value replaced or '', 'set' or 'kept' (the operator's C stood)}.
local config_key = KEYS[1]
local value, by_operator = ARGV[1], ARGV[2] == '1'
local old = redis.call('HGET', config_key, 'max_in_flight')
if by_operator then
  redis.call('HSET', config_key, 'max_in_flight', value, 'cap_set_by', 'operator')
else
  local deployed = redis.call('HGET', config_key, 'deployment_cap')
  redis.call('HSET', config_key, 'deployment_cap', value)
  if redis.call('HGET', config_key, 'cap_set_by') == 'operator'
      and (not deployed or deployed == value) then
    return {old or '', 'kept'}
  end
  redis.call('HSET', config_key, 'max_in_flight', value, 'cap_set_by', 'deployment')
end
if old ~= value then redis.call('HDEL', config_key, 'effective_cap', 'cap_credit') end
return {old or '', 'set'}
