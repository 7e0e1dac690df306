#!/usr/bin/env bash
# After the tests: waits (up to 3 minutes) for every Tripod node of this
# machine to finish its teardown, then fails if anything of one is left:
# processes (kubelet, containerd, shims, kwok), mounts, network namespaces,
# the bridge, blackhole routes, iptables rules or chains, changed sysctls.
set -uo pipefail
deadline=$(( $(date +%s) + 180 ))
while [ -e /run/tripod-node/host.json ] || pgrep -f "/run/tripod-node|tripod-dev serve" >/dev/null; do
  if [ "$(date +%s)" -gt "$deadline" ]; then break; fi
  sleep 1
done
left=()
pgrep -af '/run/tripod-node|tripod-dev serve|cache/tripod/node/.*/bin/(kwok|containerd)' >/tmp/tripod-left.$$ && left+=("processes: $(tr '\n' ';' </tmp/tripod-left.$$)")
rm -f /tmp/tripod-left.$$
m=$(grep -c -e /run/tripod-node -e '/node/kubelet' -e '/node/containerd' /proc/self/mountinfo)
[ "$m" = 0 ] || left+=("$m mounts under the node's directories")
ip link show tripod0 >/dev/null 2>&1 && left+=("the bridge tripod0")
r=$(ip route | grep -c blackhole)
[ "$r" = 0 ] || left+=("$r blackhole routes")
t=$(iptables-save 2>/dev/null | grep -cE 'KUBE-|CNI-|tripod-no-pod-egress')
[ "$t" = 0 ] || left+=("$t iptables lines (KUBE-, CNI-, tripod)")
[ -e /run/tripod-node/host.json ] && left+=("/run/tripod-node/host.json (teardown did not finish)")
if [ ${#left[@]} -gt 0 ]; then
  echo "check-clean: a Tripod node left this behind:" >&2
  printf '  - %s\n' "${left[@]}" >&2
  exit 1
fi
echo "check-clean: nothing of the test nodes is left (processes, mounts, network, iptables)"
