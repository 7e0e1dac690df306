-- Argo CD health check for ImageBuild (build.tripod.dev/v1alpha1).
--
-- Install under resource.customizations.health.build.tripod.dev_ImageBuild
-- in argocd-cm (see README.md). Argo CD passes the live object as `obj`.
--
-- Tripod writes the kstatus conditions Ready, Reconciling and Stalled on
-- every status update, each with observedGeneration, and status.phase is one
-- of Pending|Scheduling|Building|Succeeded|Failed|Cancelled. Precedence:
--   1. status not yet written, or it describes an older generation -> Progressing
--   2. Stalled=True   -> Degraded   (the build failed, the spec is invalid, or
--                                    the API server refuses its build Pods)
--   3. Ready=True     -> Healthy    (the image was pushed; show its pinned ref)
--   4. phase Cancelled -> Suspended (stopped on purpose by spec.cancel)
--   5. Reconciling=True -> Progressing with the controller's message
--   6. anything else  -> Progressing
hs = {}

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end

local function waiting()
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to observe generation " .. tostring(generation or 1)
  return hs
end

local status = obj.status
if status == nil then
  return waiting()
end

local function condition(t)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == t then
      return c
    end
  end
  return nil
end

-- A status Tripod wrote always carries observedGeneration; a status without
-- one has not observed anything yet.
if generation ~= nil then
  if status.observedGeneration == nil or status.observedGeneration < generation then
    return waiting()
  end
  local ready = condition("Ready")
  if ready ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
    return waiting()
  end
end

local function text(c, fallback)
  if c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = text(stalled, "Build stalled")
  return hs
end

local ready = condition("Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  if status.image ~= nil and status.image.pinned ~= nil and status.image.pinned ~= "" then
    hs.message = "Built " .. status.image.pinned
  else
    hs.message = text(ready, "Build succeeded")
  end
  return hs
end

if status.phase == "Cancelled" then
  hs.status = "Suspended"
  local msg = "Build cancelled"
  if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
    msg = msg .. ": " .. ready.message
  end
  hs.message = msg
  return hs
end

local reconciling = condition("Reconciling")
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = text(reconciling, "Build " .. tostring(status.phase or "in progress"))
  return hs
end

hs.status = "Progressing"
if status.phase ~= nil then
  hs.message = "Build is " .. status.phase
else
  hs.message = "Waiting for the build to start"
end
return hs
