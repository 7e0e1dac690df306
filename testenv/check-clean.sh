#!/usr/bin/env bash
# After the tests: waits (up to 3 minutes) for every Tripod node of this
# machine to finish its teardown, then fails if anything of one is left:
# processes (kubelet, containerd, shims, kwok, kube-proxy, CoreDNS), mounts (network namespaces
# among them), the bridge, blackhole routes, iptables and ip6tables rules or
# chains, cgroups, and — given the file `check-clean.sh --sysctls` wrote
# before the tests — changed sysctls.
#   check-clean.sh --sysctls FILE   records the sysctls a node changes
#   check-clean.sh [FILE]           checks (and compares with FILE)
set -uo pipefail
sysctls="kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes vm/overcommit_memory vm/panic_on_oom net/ipv4/ip_forward net/bridge/bridge-nf-call-iptables net/ipv4/conf/all/route_localnet"
if [ "${1:-}" = --sysctls ]; then
  for s in $sysctls; do echo "$s $(cat /proc/sys/$s)"; done > "$2"
  exit 0
fi
baseline="${1:-}"
deadline=$(( $(date +%s) + 180 ))
while [ -e /run/tripod-node/host.json ] || pgrep -f "/run/tripod-node|tripod-dev serve" >/dev/null; do
  if [ "$(date +%s)" -gt "$deadline" ]; then break; fi
  sleep 1
done
left=()
pgrep -af '/run/tripod-node|tripod-dev serve|cache/tripod/node/.*/bin/(kwok|containerd)|bin/kube-proxy|tools/coredns-' >/tmp/tripod-left.$$ && left+=("processes: $(tr '\n' ';' </tmp/tripod-left.$$)")
rm -f /tmp/tripod-left.$$
m=$(grep -c -e /run/tripod-node -e '/node/kubelet' -e '/node/containerd' /proc/self/mountinfo)
[ "$m" = 0 ] || left+=("$m mounts under the node's directories")
ip link show tripod0 >/dev/null 2>&1 && left+=("the bridge tripod0")
r=$(ip route | grep -c blackhole)
[ "$r" = 0 ] || left+=("$r blackhole routes")
t=$(iptables-save 2>/dev/null | grep -cE 'KUBE-|CNI-|tripod-no-pod-egress')
[ "$t" = 0 ] || left+=("$t iptables lines (KUBE-, CNI-, tripod)")
t=$(ip6tables-save 2>/dev/null | grep -cE 'KUBE-|CNI-')
[ "$t" = 0 ] || left+=("$t ip6tables lines (KUBE-, CNI-)")
c=$(ls -d /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods 2>/dev/null | wc -l)
[ "$c" = 0 ] || left+=("$c kubepods cgroups")
if [ -n "$baseline" ] && [ -f "$baseline" ]; then
  while read -r s v; do
    now=$(cat "/proc/sys/$s")
    [ "$now" = "$v" ] || left+=("sysctl $s is $now, was $v")
  done < "$baseline"
fi
[ -e /run/tripod-node/host.json ] && left+=("/run/tripod-node/host.json (teardown did not finish)")
if [ ${#left[@]} -gt 0 ]; then
  echo "check-clean: a Tripod node left this behind:" >&2
  printf '  - %s\n' "${left[@]}" >&2
  exit 1
fi
echo "check-clean: nothing of the test nodes is left (processes, mounts, network, iptables, cgroups${baseline:+, sysctls})"
