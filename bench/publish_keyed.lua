-- wrk script for S1K: S1 with a fresh Idempotency-Key on every request.
wrk.method = "POST"
wrk.body = '{"data":{"x":1}}'
wrk.headers["Content-Type"] = "application/json"

math.randomseed(os.time())
local run = string.format("%d-%d", os.time(), math.random(1, 1000000000))
local sent = 0

function request()
  sent = sent + 1
  wrk.headers["Idempotency-Key"] = run .. "-" .. sent
  return wrk.format()
end
