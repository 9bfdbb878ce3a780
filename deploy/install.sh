#!/usr/bin/env bash
# Install everything Powerplane's demo and tests need on a fresh Debian 12 host, as root.
# Idempotent: re-running it installs nothing twice.
#
#   deploy/install.sh            system packages, Consul and powerplane
#   deploy/install.sh --test     the same, plus the test and lint tools
#
# Environment:
#   POWERPLANE_VENV   where the Python package is installed (default /opt/powerplane)
set -euo pipefail

want_test=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

[ "$(id -u)" = 0 ] || { echo "install.sh: must run as root" >&2; exit 1; }
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/deploy/lib.sh"
venv=${POWERPLANE_VENV:-/opt/powerplane}
export DEBIAN_FRONTEND=noninteractive

# python3-nftables is the libnftables binding the host firewall uses (adapter/dataplane/nft.py);
# it is not on PyPI, so this list, not pyproject.toml, is where that dependency is recorded.
packages=(docker.io openvswitch-switch busybox-static iproute2 nftables python3-nftables ethtool
          iputils-ping iperf3 curl socat python3-venv python3-pip psmisc procps)
# The test extra adds: shellcheck, vagrant and systemd-analyze to check deploy/ and vagrant/; debootstrap builds the
# local base image the container-image test needs (no registry is reachable in CI); dnsmasq-base is
# bench/dns.py's baseline.
if [ "$want_test" = 1 ]; then packages+=(shellcheck debootstrap vagrant systemd tcpdump dnsmasq-base); fi

# Consul is not in bookworm; bullseye's consul is a real server. A low pin keeps every
# other package on bookworm. Bullseye comes from the mirror this machine's apt already uses.
if [ ! -f /etc/apt/sources.list.d/bullseye.sources ]; then
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  if ! archive=$(debian_archive_uri "$codename"); then
    echo "install.sh: no Debian archive for '$codename' in this machine's apt sources" \
      "(/etc/apt/sources.list.d/*.sources, sources.list): cannot add bullseye for consul" >&2
    exit 1
  fi
  say "adding Debian bullseye (low pin) from $archive for consul"
  cat > /etc/apt/sources.list.d/bullseye.sources <<SRC
Types: deb
URIs: $archive
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat > /etc/apt/preferences.d/bullseye-low <<'PIN'
Package: *
Pin: release n=bullseye
Pin-Priority: 100
PIN
  rm -f /var/lib/apt/periodic/powerplane-updated
fi

missing=()
for p in "${packages[@]}" consul; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  # Debian's packages start their daemons on install; with no init system here that can fail
  # harmlessly, so a policy-rc.d keeps postinst from trying. An administrator's own
  # policy-rc.d is set aside meanwhile and put back unchanged, also when this is interrupted.
  apt_install_holding_services /usr/sbin/policy-rc.d "${missing[@]}"
fi

say "python package into $venv"
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/pip" install -q --upgrade pip >/dev/null
if [ "$want_test" = 1 ]; then
  "$venv/bin/pip" install -q -e "${here}[test]"
else
  "$venv/bin/pip" install -q -e "$here"
fi
# The venv may be made by a Python that is not Debian's, so it does not see
# /usr/lib/python3/dist-packages; the binding is pure Python over ctypes, so any Python 3 can
# use it. Only the nftables package is linked in: a .pth file naming
# that directory, or include-system-site-packages, would also put every other Debian Python
# package on the path, shadowing or mixing with the versions pip installed. The link names the
# package's fixed Debian path, so a package upgrade needs nothing from us; it is remade on every
# run because the site-packages path changes with the venv's Python version.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
ln -sfn /usr/lib/python3/dist-packages/nftables "$site/nftables"
"$venv/bin/python" -c 'import nftables' || {
  echo "install.sh: python3-nftables is installed but $venv cannot import it" >&2; exit 1; }
ln -sf "$venv/bin/powerplane" /usr/local/bin/powerplane

say "done"
