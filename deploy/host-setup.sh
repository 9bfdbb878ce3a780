#!/usr/bin/env bash
# Set up one host of a Powerplane cluster (systemd, Debian 12, as root); Vagrant provisions with it.
#
#   deploy/host-setup.sh --index N --nodes IP1,IP2,... [--underlay-ip IP] [--servers K]
#                        [--datapath system|netdev]
#
#   --index N         this host's position in --nodes, from 1            [POWERPLANE_NODE_INDEX]
#   --nodes LIST      every host's underlay IP, comma-separated           [POWERPLANE_NODE_IPS]
#   --underlay-ip IP  this host's underlay IP (default: entry N of LIST)  [POWERPLANE_UNDERLAY_IP]
#   --servers K       how many of the first hosts run Consul servers      [POWERPLANE_CONSUL_SERVERS]
#                     (default: 3, or every host when there are fewer)
#   --datapath D      OVS datapath for powerplane (default system)        [POWERPLANE_DATAPATH]
#   --config-only DIR write this host's generated config files into DIR and stop (no root needed)
#
# It installs Docker, Open vSwitch, Consul and Powerplane (deploy/install.sh), writes the Consul
# configuration (hosts 1..K are servers expecting K peers and forming the cluster as they join;
# later hosts are clients; everyone retries joining the servers), /etc/default/powerplane, the
# systemd units, and enables and starts docker, openvswitch-switch, consul and powerplane.
# Idempotent: a rerun changes only what differs and restarts only services whose config changed.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/deploy/lib.sh"

index=${POWERPLANE_NODE_INDEX:-}
nodes=${POWERPLANE_NODE_IPS:-}
underlay_ip=${POWERPLANE_UNDERLAY_IP:-}
servers=${POWERPLANE_CONSUL_SERVERS:-}
datapath=${POWERPLANE_DATAPATH:-system}
config_only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --index) index=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --underlay-ip) underlay_ip=$2; shift 2 ;;
    --servers) servers=$2; shift 2 ;;
    --datapath) datapath=$2; shift 2 ;;
    --config-only) config_only=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (try --help)" ;;
  esac
done

IFS=, read -r -a node_ips <<< "$nodes"
count=${#node_ips[@]}
[ "$count" -ge 1 ] || die "--nodes is required: every host's underlay IP, comma-separated"
# in_range VALUE LOW HIGH: VALUE is an integer from LOW to HIGH.
in_range() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]; }
in_range "$index" 1 "$count" || die "--index must be between 1 and $count"
underlay_ip=${underlay_ip:-${node_ips[$((index - 1))]}}
servers=${servers:-$((count < 3 ? count : 3))}
in_range "$servers" 1 "$count" || die "--servers must be between 1 and $count"
case "$datapath" in system|netdev) ;; *) die "--datapath must be system or netdev" ;; esac

say "host $index of $count: underlay $underlay_ip, Consul $([ "$index" -le "$servers" ] && echo server || echo client)"

# install_file SRC DEST MODE: copy when different; prints "changed" when it wrote.
install_file() {
  if ! cmp -s "$1" "$2"; then
    install -D -m "$3" "$1" "$2"
    echo changed
  fi
}

if [ -n "$config_only" ]; then
  tmp=$config_only
  mkdir -p "$tmp"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
fi

say "Consul configuration"
retry_join=$(printf '"%s", ' "${node_ips[@]:0:$servers}")
retry_join=${retry_join%, }
if [ "$index" -le "$servers" ]; then
  cp "$here/deploy/consul/server.json" "$tmp/10-powerplane.json"
  extra="\"bootstrap_expect\": $servers,"
else
  cp "$here/deploy/consul/client.json" "$tmp/10-powerplane.json"
  extra=""
fi
cat > "$tmp/50-node.json" <<JSON
{
  "node_name": "$(hostname -s)",
  "bind_addr": "$underlay_ip",
  "client_addr": "127.0.0.1",
  $extra
  "retry_join": [$retry_join]
}
JSON
say "Powerplane configuration"
cat > "$tmp/powerplane.env" <<ENV
# Written by deploy/host-setup.sh; see docs/configuration.md for every variable.
POWERPLANE_UNDERLAY_IP=$underlay_ip
POWERPLANE_CONSUL=127.0.0.1:8500
POWERPLANE_LISTEN=unix:///run/powerplane/docker.sock
POWERPLANE_DOCKER=unix:///var/run/docker.sock
POWERPLANE_ADAPTERS=/etc/powerplane/adapters.yml
POWERPLANE_DATAPATH=$datapath
POWERPLANE_LOG_LEVEL=info
ENV
if [ -n "$config_only" ]; then
  say "config written to $config_only"
  exit 0
fi
[ "$(id -u)" = 0 ] || die "run me as root"
[ -d /run/systemd/system ] ||
  die "systemd is not running here; on a machine without it use deploy/demo.sh"

say "packages and powerplane (deploy/install.sh)"
"$here/deploy/install.sh"
consul validate "$tmp/10-powerplane.json" "$tmp/50-node.json" >/dev/null

say "installing configuration"
consul_changed=$(
  install_file "$tmp/10-powerplane.json" /etc/consul.d/10-powerplane.json 0644
  install_file "$tmp/50-node.json" /etc/consul.d/50-node.json 0644
  install_file "$here/deploy/systemd/consul.service" /etc/systemd/system/consul.service 0644
)
install -d -o consul -g consul -m 0750 /var/lib/consul
powerplane_changed=$(
  install_file "$tmp/powerplane.env" /etc/default/powerplane 0644
  install_file "$here/deploy/adapters.yml" /etc/powerplane/adapters.yml 0644
  install_file "$here/deploy/systemd/powerplane.service" /etc/systemd/system/powerplane.service 0644
)
# Interactive shells on this host talk to Docker through Powerplane.
printf 'export DOCKER_HOST=unix:///run/powerplane/docker.sock\n' > "$tmp/profile.sh"
install_file "$tmp/profile.sh" /etc/profile.d/powerplane.sh 0644 >/dev/null

if [ "$datapath" = system ]; then
  say "openvswitch kernel module"
  modprobe openvswitch || die "the openvswitch module does not load: use --datapath netdev"
fi

say "services"
systemctl daemon-reload
systemctl enable --quiet docker.service openvswitch-switch.service consul.service \
  powerplane.service
systemctl start docker.service openvswitch-switch.service
if [ -n "$consul_changed" ]; then systemctl restart consul.service; else systemctl start consul.service; fi
if [ -n "$powerplane_changed" ]; then
  systemctl restart powerplane.service
else
  systemctl start powerplane.service
fi

if ! docker -H unix:///var/run/docker.sock image inspect busybox:latest >/dev/null 2>&1; then
  say "busybox image from Debian's busybox-static"
  import_busybox unix:///var/run/docker.sock busybox:latest
fi

say "waiting for the Powerplane proxy"
wait_until 60 "powerplane.service (journalctl -u powerplane)" \
  docker_ping /run/powerplane/docker.sock
if [ "$index" -lt "$servers" ]; then
  note "Consul elects a leader once all $servers servers have joined; until then network"
  note "operations wait with a clear error while plain Docker calls pass"
fi
say "host $index ready: export DOCKER_HOST=unix:///run/powerplane/docker.sock"
