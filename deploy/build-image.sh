#!/usr/bin/env bash
# Build the Powerplane image with no network during the build itself.
#
#   deploy/build-image.sh [--tag TAG] [--base IMAGE] [--wheels DIR] [--context DIR]
#
#   --tag TAG      image name (default powerplane:latest)
#   --base IMAGE   base image with Python 3.11 (default: the Dockerfile's pinned python slim)
#   --wheels DIR   use this prepared wheelhouse instead of running `pip wheel` (needs PyPI)
#   --context DIR  build context to assemble (default: the repository; wheels go to build/wheels)
#
# The Docker daemon is the one DOCKER_HOST names (the default socket otherwise). The project and
# its dependencies are turned into wheels on this host first; `docker build --network none` then
# installs them with --no-index.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
tag=powerplane:latest
base=""
wheels=""
context=$here
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --context) context=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '==> %s\n' "$*"; }
# libnftables1 and what it needs beyond a slim Debian base (libc6 and libtinfo6 are there).
nftables_debs=(python3-nftables libnftables1 libnftnl11 libjansson4 libmnl0 libxtables12
               libedit2 libbsd0 libmd0 libgmp10)
# ovs-ofctl, the one program serve runs (the flow tables): only that binary is unpacked from
# openvswitch-common in the image, with the libraries it links (libc6 and zlib1g are there).
openflow_debs=(openvswitch-common libcap-ng0 libnuma1 libxdp1 libbpf1 libelf1 libunbound8
               libevent-2.1-7 libhogweed6 libnettle8 libssl3)
python=${POWERPLANE_VENV:-/opt/powerplane}/bin/python
[ -x "$python" ] || python=python3

mkdir -p "$context/build/wheels"
if [ -n "$wheels" ]; then
  say "wheelhouse: copying $wheels"
  cp "$wheels"/*.whl "$context/build/wheels/"
else
  say "wheelhouse: pip wheel of $here and its dependencies"
  rm -f "$context"/build/wheels/powerplane-*.whl
  "$python" -m pip wheel --quiet --disable-pip-version-check \
    --wheel-dir "$context/build/wheels" "$here"
fi
if [ "$context" != "$here" ]; then
  mkdir -p "$context/deploy"
  cp "$here/deploy/adapters.yml" "$context/deploy/adapters.yml"
  cp "$here/.dockerignore" "$context/.dockerignore"
fi

# The host firewall's binding (python3-nftables) and the C library under it come from Debian,
# not PyPI: fetched here through this host's apt sources, installed in the image from files.
# The base is Debian bookworm like this host, so the same versions fit.
say "Debian packages for the host firewall and the flow tables (apt-get download)"
rm -rf "$context/build/debs"
mkdir -p "$context/build/debs"
(cd "$context/build/debs" && apt-get download -q "${nftables_debs[@]}" "${openflow_debs[@]}" \
   >/dev/null 2>&1) || {
  echo "build-image.sh: could not download ${nftables_debs[*]} ${openflow_debs[*]} with" \
       "apt-get" >&2; exit 1; }

build_args=()
if [ -n "$base" ]; then build_args+=(--build-arg "BASE=$base"); fi
say "docker build $tag${base:+ from $base} (no network)"
# The classic builder: it needs no buildx plugin and honours --network none.
DOCKER_BUILDKIT=0 docker build --quiet --network none "${build_args[@]}" \
  -f "$here/Dockerfile" -t "$tag" "$context" >/dev/null
say "built $tag"
