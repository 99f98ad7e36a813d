-- A varied HTTP load for wrk (-s): no two consecutive requests alike, so that nothing can pay
-- off by remembering the previous request. Each request is built anew from a counter and
-- wrk's random numbers: a different path and query, x-dev absent / alice / bob / carol (carol
-- matches no intercept), 0-6 extra headers of 1-200 bytes, and one request in 8 a POST with a
-- body of 1-4096 bytes. Deterministic per thread (fixed seed), so runs are comparable.
local counter = 0
local devs = { false, "alice", "bob", "carol" }
local filler = string.rep("abcdefghijklmnopqrstuvwxyz0123456789", 120)

function init(args)
  math.randomseed(20261202)
end

function request()
  counter = counter + 1
  local path = string.format("/api/v%d/items/%d?q=%d&page=%d",
    counter % 3 + 1, counter, math.random(1, 1000000), counter % 17)
  local headers = { ["User-Agent"] = "wrk-varied", ["Accept"] = "*/*" }
  local dev = devs[counter % 4 + 1]
  if dev then headers["x-dev"] = dev end
  for i = 1, math.random(0, 6) do
    local size = math.random(1, 200)
    local start = math.random(1, #filler - size)
    headers["x-extra-" .. i] = string.sub(filler, start, start + size - 1)
  end
  if counter % 8 == 0 then
    local size = math.random(1, 4096)
    return wrk.format("POST", path, headers, string.sub(filler .. filler, 1, size))
  end
  return wrk.format("GET", path, headers, nil)
end
