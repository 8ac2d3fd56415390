-- wrk script of scenario 5: sustained heartbeats, one request per
-- registered service in turn (`svc-00000` .. `svc-<N-1>`), so every entry of
-- the registry is touched. N comes from BENCH_SERVICES.
local services = tonumber(os.getenv("BENCH_SERVICES")) or 10000
local next_id = 0

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function setup(thread)
  -- Spread the threads over the services.
  thread:set("offset", math.random(0, services - 1))
end

function init(args)
  next_id = tonumber(offset) or 0
end

function request()
  next_id = (next_id + 1) % services
  local body = string.format('{"service_id":"svc-%05d","status":"healthy"}', next_id)
  return wrk.format(nil, "/api/registry/heartbeat", nil, body)
end
