# Shell helpers shared by deploy/install.sh, demo.sh, demo-down.sh and host-setup.sh (and
# tests/support/baseimage.py, for the apt mirror).
# Sourced, not run: the caller sets `set -euo pipefail`.
# shellcheck shell=bash

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# alive PIDFILE: the process named in PIDFILE runs. A zombie counts as dead (init may take a
# few seconds to reap it), so /proc/PID/stat is read rather than trusting `kill -0`.
alive() {
  local pid state
  [ -s "$1" ] || return 1
  pid=$(tr -d '[:space:]' < "$1")
  [ -r "/proc/$pid/stat" ] || return 1
  state=$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
  [ "$state" != Z ] && [ "$state" != X ]
}

# stop_pidfile PIDFILE NAME: SIGTERM the process in PIDFILE, SIGKILL after 15 s; remove PIDFILE.
stop_pidfile() {
  local pidfile=$1 name=$2 pid i
  if alive "$pidfile"; then
    pid=$(tr -d '[:space:]' < "$pidfile")
    note "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 150); do
      alive "$pidfile" || break
      if [ "$i" = 150 ]; then kill -KILL "$pid" 2>/dev/null || true; fi
      sleep 0.1
    done
  fi
  rm -f "$pidfile"
}

# wait_until SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.2 s until it succeeds.
wait_until() {
  local seconds=$1 what=$2 tries
  shift 2
  tries=$((seconds * 5))
  until "$@" >/dev/null 2>&1; do
    tries=$((tries - 1))
    [ "$tries" -gt 0 ] || die "timed out after ${seconds}s waiting for $what"
    sleep 0.2
  done
}

# docker_ping SOCKET: a Docker API (dockerd or the Powerplane proxy) answers on SOCKET.
docker_ping() {
  [ -S "$1" ] && [ "$(curl -sf --max-time 2 --unix-socket "$1" http://docker/_ping)" = OK ]
}

# consul_ready [HOST:PORT]: Consul answers and has elected a leader.
consul_ready() {
  local leader
  leader=$(curl -sf --max-time 2 "http://${1:-127.0.0.1:8500}/v1/status/leader") || return 1
  [ -n "$leader" ] && [ "$leader" != '""' ]
}

# import_busybox DOCKER_URL TAG: make TAG from Debian's busybox-static, with no image registry:
# /bin/busybox plus one symlink per applet, packed and `docker import`ed.
import_busybox() {
  local url=$1 tag=$2 rootfs
  rootfs=$(mktemp -d)
  mkdir -p "$rootfs"/{bin,etc,tmp,proc,sys,dev,root,var}
  chmod 1777 "$rootfs/tmp"
  cp /bin/busybox "$rootfs/bin/busybox"
  local applet
  for applet in $("$rootfs/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$rootfs/etc/passwd"
  printf 'root:x:0:\n' > "$rootfs/etc/group"
  tar -C "$rootfs" -c . | docker -H "$url" import --change 'CMD ["sh"]' - "$tag" >/dev/null
  rm -rf "$rootfs"
}

# debian_archive_uri SUITE [APT_DIR]: the Debian archive URI this machine's own apt sources use
# for SUITE (e.g. bookworm), from APT_DIR/sources.list.d/*.sources (deb822) first, then the
# one-line sources.list files (APT_DIR is /etc/apt by default). Installers take their mirror from
# here, never a hard-coded address: the machine may only reach its own mirror. Prints nothing
# and fails when no enabled source names SUITE.
debian_archive_uri() {
  local suite=$1 apt_dir=${2:-/etc/apt} uri=""
  local deb822=() one_line=()
  local file
  for file in "$apt_dir"/sources.list.d/*.sources; do
    [ -f "$file" ] && deb822+=("$file")
  done
  for file in "$apt_dir"/sources.list "$apt_dir"/sources.list.d/*.list; do
    [ -f "$file" ] && one_line+=("$file")
  done
  if [ ${#deb822[@]} -gt 0 ]; then
    # Stanzas are separated by blank lines (and files); a line starting with a blank continues
    # the field above it. The first enabled "deb" stanza whose Suites has SUITE wins.
    uri=$(awk -v want="$suite" '
      function has(list, word,   n, i, parts) {
        n = split(list, parts, /[ \t]+/)
        for (i = 1; i <= n; i++) if (parts[i] == word) return 1
        return 0
      }
      function stanza_end(   n, parts) {
        if (!done && has(f["types"], "deb") && has(f["suites"], want) &&
            tolower(f["enabled"]) !~ /^[ \t]*no/) {
          n = split(f["uris"], parts, /[ \t]+/)
          if (parts[1] == "" && n > 1) parts[1] = parts[2]
          if (parts[1] != "") { print parts[1]; done = 1 }
        }
        split("", f); key = ""
      }
      FNR == 1 { stanza_end() }
      /^#/ { next }
      /^[ \t]*$/ { stanza_end(); next }
      /^[ \t]/ { if (key != "") f[key] = f[key] " " $0; next }
      { key = tolower(substr($0, 1, index($0, ":") - 1)); f[key] = substr($0, index($0, ":") + 1) }
      END { stanza_end() }' "${deb822[@]}")
  fi
  if [ -z "$uri" ] && [ ${#one_line[@]} -gt 0 ]; then
    # deb [option=value ...] URI SUITE COMPONENT...
    uri=$(awk -v want="$suite" '
      /^[ \t]*deb[ \t]/ {
        sub(/\[[^]]*\]/, "")
        if ($3 == want) { print $2; exit }
      }' "${one_line[@]}")
  fi
  [ -n "$uri" ] || return 1
  printf '%s\n' "${uri%/}"
}

# release_service_starts POLICY: undo hold_service_starts; safe to call when nothing is held.
release_service_starts() {
  local policy=$1
  local saved="$policy.powerplane-saved"
  if [ -e "$saved" ] || [ -L "$saved" ]; then
    mv -f "$saved" "$policy"
  elif grep -qs "^$policy_marker" "$policy"; then
    rm -f "$policy"
  fi
  rm -f "$policy.powerplane-new"
}

# hold_service_starts POLICY: keep Debian packages from starting their daemons while they
# install (POLICY is /usr/sbin/policy-rc.d; a policy that answers 101). An administrator's own
# POLICY file is set aside and release_service_starts puts it back unchanged. What an
# interrupted run left is undone first.
hold_service_starts() {
  local policy=$1
  release_service_starts "$policy"
  if [ -e "$policy" ] || [ -L "$policy" ]; then mv "$policy" "$policy.powerplane-saved"; fi
  { printf '#!/bin/sh\n%s while it installs packages.\nexit 101\n' "$policy_marker"; } \
    > "$policy.powerplane-new"
  chmod 0755 "$policy.powerplane-new"
  mv -f "$policy.powerplane-new" "$policy"
}
policy_marker="# Written by Powerplane's deploy/install.sh"

# apt_install_holding_services POLICY PACKAGE...: apt-get install the PACKAGEs with their
# daemons held (hold_service_starts POLICY). The administrator's own POLICY is back afterwards,
# also when apt-get fails or the script is interrupted: an EXIT trap releases it.
apt_install_holding_services() {
  local policy=$1
  shift
  # shellcheck disable=SC2064  # the path is fixed now, quoted by printf %q
  trap "release_service_starts $(printf %q "$policy")" EXIT
  trap 'exit 130' INT TERM HUP
  hold_service_starts "$policy"
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  release_service_starts "$policy"
  trap - EXIT INT TERM HUP
}
