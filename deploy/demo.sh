#!/usr/bin/env bash
# Powerplane in one command, on a fresh Debian 12 machine (as root):
#
#   deploy/demo.sh        install what is missing, start Consul (dev agent on loopback), Open
#                         vSwitch, dockerd if none answers and `powerplane serve`, then run two
#                         containers on one overlay network and show one pinging the other.
#   deploy/demo-down.sh   remove everything this made.
#
# Idempotent: what already runs is used as it is and never restarted. Only what this script
# started is recorded (under /run/powerplane-demo) and later stopped by demo-down.sh.
#
# Environment:
#   DEMO_CIDR          overlay subnet of the two containers (default 10.0.6.0/24)
#   DEMO_IMAGE         image of the containers and sandboxes (default busybox:latest)
#   DEMO_UNDERLAY_IP   this host's underlay address for VXLAN to other hosts (default: none,
#                      a single-host demo needs no tunnels)
#   DEMO_DATAPATH      system or netdev (default: system when the openvswitch module loads)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/deploy/lib.sh"

cidr=${DEMO_CIDR:-10.0.6.0/24}
image=${DEMO_IMAGE:-busybox:latest}
state=/run/powerplane-demo
dockerd_sock=/var/run/docker.sock
proxy_sock=/run/powerplane/docker.sock
proxy_url=unix://$proxy_sock
serve_log=/var/log/powerplane.log

[ "$(id -u)" = 0 ] || die "run me as root (the demo installs packages and starts daemons)"
mkdir -p "$state"

say "installing what is missing (deploy/install.sh)"
"$here/deploy/install.sh"
export PATH="${POWERPLANE_VENV:-/opt/powerplane}/bin:$PATH"

# ---- Consul -------------------------------------------------------------------------------
say "Consul"
if consul_ready 127.0.0.1:8500; then
  note "a Consul agent already answers on 127.0.0.1:8500: using it"
elif alive "$state/consul.pid"; then
  wait_until 30 "Consul to elect a leader" consul_ready 127.0.0.1:8500
else
  note "starting a Consul dev agent on 127.0.0.1 (state in memory; log /var/log/powerplane-consul.log)"
  nohup consul agent -dev -client 127.0.0.1 -bind 127.0.0.1 \
    -hcl 'disable_update_check = true' >/var/log/powerplane-consul.log 2>&1 &
  echo $! > "$state/consul.pid"
  wait_until 30 "Consul to elect a leader" consul_ready 127.0.0.1:8500
fi

# ---- Open vSwitch --------------------------------------------------------------------------
say "Open vSwitch"
datapath=${DEMO_DATAPATH:-}
if [ -z "$datapath" ]; then
  if [ -d /sys/module/openvswitch ] || modprobe openvswitch 2>/dev/null; then
    datapath=system
  else
    datapath=netdev
    note "no openvswitch kernel module here: using the userspace (netdev) datapath"
  fi
fi
if ovs-vsctl --timeout=3 show >/dev/null 2>&1; then
  note "ovsdb-server already answers: using it"
else
  note "starting ovsdb-server and ovs-vswitchd (logs in /var/log/openvswitch)"
  mkdir -p /var/run/openvswitch /etc/openvswitch /var/log/openvswitch
  [ -f /etc/openvswitch/conf.db ] ||
    ovsdb-tool create /etc/openvswitch/conf.db /usr/share/openvswitch/vswitch.ovsschema
  # Default pidfiles: ovs-appctl and ovs-vsctl find the daemons' control sockets through them.
  # Copies in $state are what demo-down.sh stops.
  ovsdb-server /etc/openvswitch/conf.db --remote=punix:/var/run/openvswitch/db.sock \
    --pidfile --log-file=/var/log/openvswitch/ovsdb-server.log --detach --no-chdir
  cp /var/run/openvswitch/ovsdb-server.pid "$state/ovsdb-server.pid"
  ovs-vsctl --no-wait init
  ovs-vswitchd unix:/var/run/openvswitch/db.sock --pidfile \
    --log-file=/var/log/openvswitch/ovs-vswitchd.log --detach --no-chdir
  cp /var/run/openvswitch/ovs-vswitchd.pid "$state/ovs-vswitchd.pid"
fi
if ! ovs-appctl --timeout=3 version >/dev/null 2>&1; then
  die "ovsdb-server runs but ovs-vswitchd does not answer; start it (systemctl start openvswitch-switch)"
fi

# ---- dockerd -------------------------------------------------------------------------------
say "Docker"
if docker_ping "$dockerd_sock"; then
  note "dockerd already answers on $dockerd_sock: using it"
elif [ -d /run/systemd/system ]; then
  note "starting docker.service"
  systemctl start docker
  touch "$state/started-docker-service"
  wait_until 60 "dockerd" docker_ping "$dockerd_sock"
else
  note "starting dockerd (log /var/log/powerplane-dockerd.log)"
  # dockerd makes a docker0 bridge that outlives it; demo-down removes it only if it is ours.
  ip link show docker0 >/dev/null 2>&1 || touch "$state/made-docker0"
  nohup dockerd -H "unix://$dockerd_sock" --pidfile "$state/dockerd.pid" \
    >/var/log/powerplane-dockerd.log 2>&1 &
  wait_until 60 "dockerd" docker_ping "$dockerd_sock"
fi
if ! docker -H "unix://$dockerd_sock" image inspect "$image" >/dev/null 2>&1; then
  note "making the $image image from Debian's busybox-static (no registry needed)"
  import_busybox "unix://$dockerd_sock" "$image"
  echo "$image" > "$state/imported-image"
fi

# ---- powerplane serve ----------------------------------------------------------------------
say "powerplane serve"
if alive "$state/serve.pid" && docker_ping "$proxy_sock"; then
  note "already running (pid $(cat "$state/serve.pid"))"
else
  # Only the unix socket (group docker, mode 0660): a plain TCP port would make every local
  # user root on this host.
  serve_args=(--listen "$proxy_url"
              --docker "unix://$dockerd_sock" --consul 127.0.0.1:8500
              --adapters "$here/deploy/adapters.yml" --datapath "$datapath"
              --sandbox-image "$image")
  if [ -n "${DEMO_UNDERLAY_IP:-}" ]; then serve_args+=(--underlay-ip "$DEMO_UNDERLAY_IP"); fi
  note "powerplane serve ${serve_args[*]}"
  note "log: $serve_log"
  nohup powerplane serve "${serve_args[@]}" >>"$serve_log" 2>&1 &
  echo $! > "$state/serve.pid"
  if ! wait_until 30 "the Powerplane proxy" docker_ping "$proxy_sock"; then
    tail -n 20 "$serve_log" >&2
    exit 1
  fi
fi
# Ready means listeners, Consul session and data plane are all up (serve writes it down).
# (`powerplane status` says what it still waits for.)
wait_until 60 "Powerplane to be ready" grep -q '"state": "ready"' /run/powerplane/status.json

# ---- two containers on one overlay network -------------------------------------------------
say "two containers on the overlay network $cidr"
export DOCKER_HOST=$proxy_url
for name in pp-demo-1 pp-demo-2; do
  running=$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null || true)
  if [ "$running" = true ]; then
    note "$name already runs"
    continue
  fi
  [ -z "$running" ] || docker rm -f "$name" >/dev/null
  note "docker run -d --name $name -e SOCKETPLANE_CIDR=$cidr $image sleep 1d"
  docker run -d --name "$name" --label powerplane-demo=1 -e "SOCKETPLANE_CIDR=$cidr" \
    "$image" sleep 1d >/dev/null
done

ip_of() {
  docker exec "$1" ip -4 -o addr show dev eth0 | awk '{ split($4, a, "/"); print a[1]; exit }'
}
ip1=$(ip_of pp-demo-1)
ip2=$(ip_of pp-demo-2)
if [ -z "$ip1" ] || [ -z "$ip2" ]; then
  die "the containers have no overlay address (see $serve_log)"
fi
note "pp-demo-1 has $ip1, pp-demo-2 has $ip2"

say "pp-demo-1 pings pp-demo-2"
docker exec pp-demo-1 ping -c 3 -W 2 "$ip2"

cat <<MSG

Done. Point your Docker client at Powerplane (root and members of the docker group):

    export DOCKER_HOST=$proxy_url

    docker run --rm -e SOCKETPLANE_CIDR=$cidr $image ping -c 1 $ip1
    powerplane network list

Remove everything the demo made: $here/deploy/demo-down.sh
MSG
