-- wrk script for S1: POST one small JSON message per request on keep-alive connections.
wrk.method = "POST"
wrk.body = '{"data":{"x":1}}'
wrk.headers["Content-Type"] = "application/json"
