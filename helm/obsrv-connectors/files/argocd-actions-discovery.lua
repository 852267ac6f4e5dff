-- Argo CD resource actions for obsrv.io/Connector: which of pause / resume / stop apply now.
local actions = {}
local state = "Running"
if obj.spec ~= nil and obj.spec.state ~= nil then
  state = obj.spec.state
end
actions["pause"] = {["disabled"] = state == "Paused"}
actions["resume"] = {["disabled"] = state == "Running"}
actions["stop"] = {["disabled"] = state == "Stopped"}
return actions
