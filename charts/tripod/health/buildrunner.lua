-- Argo CD health check for BuildRunner (build.tripod.dev/v1alpha1).
--
-- Install under resource.customizations.health.build.tripod.dev_BuildRunner
-- in argocd-cm (see README.md). Argo CD passes the live object as `obj`.
--
-- status.phase is Online|Offline|Draining and is absent until the runner's
-- `tripod agent` first connects.
--   Online   -> Healthy
--   Draining -> Suspended
--   Offline  -> Degraded
--   absent   -> Progressing
--
-- Why Draining is Suspended and not Progressing: draining is an
-- operator-requested state (the agent finishes its builds and takes no new
-- ones), not a transition the runner completes on its own; it stays Draining
-- until someone brings it back. Progressing would claim Argo CD should wait
-- for it to converge, so the Application would sit in Progressing for as long
-- as the runner is drained and `argocd app wait --health` / sync waves would
-- hang on it. Suspended is Argo CD's status for "paused on purpose" (like a
-- suspended CronJob or a paused Rollout) and ranks between Healthy and
-- Progressing when Argo CD aggregates the Application's health.
hs = {}

local status = obj.status
local phase = nil
if status ~= nil then
  phase = status.phase
end

local function detail()
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == "Ready" and c.message ~= nil and c.message ~= "" then
      return c.message
    end
  end
  return nil
end

local function with_detail(msg)
  local d = detail()
  if d ~= nil then
    return msg .. ": " .. d
  end
  return msg
end

local agent = ""
if status ~= nil and status.agentVersion ~= nil and status.agentVersion ~= "" then
  agent = " (agent " .. status.agentVersion .. ")"
end

if phase == "Online" then
  hs.status = "Healthy"
  hs.message = "Runner is online" .. agent
elseif phase == "Draining" then
  hs.status = "Suspended"
  hs.message = "Runner is draining: finishing its builds and taking no new ones"
elseif phase == "Offline" then
  hs.status = "Degraded"
  hs.message = with_detail("Runner is offline: its agent missed its heartbeats")
elseif phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the runner's agent to connect"
else
  hs.status = "Progressing"
  hs.message = "Runner is " .. tostring(phase)
end
return hs
