#!/usr/bin/env bash
# Undo deploy/demo.sh: remove the demo's containers and overlay network, the OVS bridge (with its
# gateway ports), Powerplane's nftables table, and stop
# the daemons the demo started (recorded under /run/powerplane-demo) and only those. Daemons that
# were already running before the demo are left alone. Idempotent: safe to run at any time.
#
#   deploy/demo-down.sh [--keep-logs]
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/deploy/lib.sh"

keep_logs=0
for arg in "$@"; do
  case "$arg" in
    --keep-logs) keep_logs=1 ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg (try --help)" ;;
  esac
done

cidr=${DEMO_CIDR:-10.0.6.0/24}
bridge=${DEMO_BRIDGE:-powerplane0}
state=/run/powerplane-demo
dockerd_sock=/var/run/docker.sock
proxy_sock=/run/powerplane/docker.sock
[ "$(id -u)" = 0 ] || die "run me as root"
export PATH="${POWERPLANE_VENV:-/opt/powerplane}/bin:$PATH"

say "demo containers"
# Through the proxy when it answers, so the network hook releases addresses and sandboxes.
sandboxes=()
if docker_ping "$proxy_sock"; then api=$proxy_sock; else api=$dockerd_sock; fi
if docker_ping "$api"; then
  containers=$(docker -H "unix://$api" ps -aq --filter label=powerplane-demo=1)
  for id in $containers; do
    sandboxes+=("$(docker -H "unix://$api" inspect -f \
      '{{index .Config.Labels "io.powerplane.sandbox"}}' "$id" 2>/dev/null || true)")
    note "removing $id"
    docker -H "unix://$api" rm -f "$id" >/dev/null
  done
fi

say "overlay network $cidr"
if [ -f "$state/consul.pid" ]; then
  note "the demo's Consul dev agent keeps state in memory: stopping it removes the network"
elif consul_ready 127.0.0.1:8500 && command -v powerplane >/dev/null; then
  for name in $(powerplane network list --json 2>/dev/null | python3 -c '
import json, sys
for network in json.load(sys.stdin):
    if network.get("cidr") == sys.argv[1]:
        print(network["name"])' "$cidr" || true); do
    note "powerplane network rm $name"
    powerplane network rm "$name" || true
  done
fi

say "powerplane serve"
stop_pidfile "$state/serve.pid" "powerplane serve"

say "leftover sandboxes"
if docker_ping "$dockerd_sock"; then
  # The network hook removes a container's sandbox with it; this only catches a sandbox left
  # behind when the proxy was not running. Only the demo containers' own sandboxes are touched.
  for id in "${sandboxes[@]}"; do
    if [ -n "$id" ] && docker -H "unix://$dockerd_sock" inspect "$id" >/dev/null 2>&1; then
      note "removing sandbox $id"
      docker -H "unix://$dockerd_sock" rm -f "$id" >/dev/null
    fi
  done
  if [ -f "$state/imported-image" ]; then
    image=$(cat "$state/imported-image")
    note "removing the image $image the demo imported"
    docker -H "unix://$dockerd_sock" rmi "$image" >/dev/null 2>&1 || true
    rm -f "$state/imported-image"
  fi
fi

say "Open vSwitch bridge $bridge"
if ovs-vsctl --timeout=3 show >/dev/null 2>&1; then
  ovs-vsctl --timeout=5 --if-exists del-br "$bridge"
fi

say "Powerplane's nftables table"
# Gone by itself when the last container left through the proxy; not when serve was down.
if command -v nft >/dev/null && nft list table inet powerplane >/dev/null 2>&1; then
  nft delete table inet powerplane
  note "removed table inet powerplane"
fi

say "daemons the demo started"
stop_pidfile "$state/dockerd.pid" dockerd
if [ -f "$state/made-docker0" ]; then
  note "removing the docker0 bridge the demo's dockerd made"
  ip link del docker0 2>/dev/null || true
  rm -f "$state/made-docker0"
fi
if [ -f "$state/started-docker-service" ]; then
  note "stopping docker.service"
  systemctl stop docker.service docker.socket || true
  rm -f "$state/started-docker-service"
fi
stop_pidfile "$state/ovs-vswitchd.pid" ovs-vswitchd
stop_pidfile "$state/ovsdb-server.pid" ovsdb-server
stop_pidfile "$state/consul.pid" "consul agent -dev"

if [ "$keep_logs" = 0 ]; then
  rm -f /var/log/powerplane.log /var/log/powerplane-consul.log /var/log/powerplane-dockerd.log
fi
rmdir "$state" 2>/dev/null || true
say "done"
