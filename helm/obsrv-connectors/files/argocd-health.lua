-- Argo CD health check for obsrv.io/Connector (Lua 5.1, as Argo CD's gopher-lua runs it).
-- Install: argocd-cm key `resource.customizations.health.obsrv.io_Connector` (see docs/gitops.md).
--
-- Reads the kstatus conditions the operator writes (Ready, Reconciling, Stalled), status.phase,
-- status.lastError and spec.state:
--   Degraded    Stalled=True, phase Degraded|Failed, or Ready=False with an error
--   Suspended   spec.state Paused|Stopped (or phase Paused|Stopped)
--   Progressing status not yet written or stale, Reconciling=True, pods not ready yet
--   Healthy     Ready=True
local hs = {}

local function condition(status, type_)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function message(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason .. ": " .. c.message
    end
    return c.message
  end
  return fallback
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = condition(status, "Ready")
local reconciling = condition(status, "Reconciling")
local stalled = condition(status, "Stalled")
local phase = status.phase
local state = (obj.spec and obj.spec.state) or "Running"
local lastError = status.lastError
local errorMessage = nil
if lastError ~= nil then
  errorMessage = (lastError.reason or "Error") .. ": " .. (lastError.message or "")
end

if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = message(stalled, "Stalled")
  return hs
end

if phase == "Degraded" or phase == "Failed" then
  hs.status = "Degraded"
  hs.message = errorMessage or message(ready, "Connector is " .. phase)
  return hs
end

if state == "Paused" or state == "Stopped" or phase == "Paused" or phase == "Stopped" then
  hs.status = "Suspended"
  if (state == "Stopped" or phase == "Stopped") and (status.readyReplicas or 0) > 0 then
    hs.message = "Connector is stopping (spec.state: Stopped): " .. tostring(status.readyReplicas) .. " pods still run"
  elseif state == "Stopped" or phase == "Stopped" then
    hs.message = "Connector is stopped (spec.state: Stopped, no pods run)"
  else
    hs.message = "Connector is paused (spec.state: Paused, pods kept, not reading)"
  end
  return hs
end

if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = message(reconciling, "Reconciling")
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message(ready, "Ready")
  return hs
end

if ready ~= nil and ready.status == "False" and lastError ~= nil then
  hs.status = "Degraded"
  hs.message = errorMessage
  return hs
end

hs.status = "Progressing"
local wanted = status.replicas or 0
local up = status.readyReplicas or 0
hs.message = message(ready, "Waiting for connector pods: " .. tostring(up) .. "/" .. tostring(wanted) .. " ready")
return hs
