# Powerplane image: runs `powerplane serve` (the Docker API proxy and this host's overlay agent).
#
# Build (deploy/build-image.sh does both steps):
#   pip wheel --wheel-dir build/wheels .          # the project and every dependency, on the host
#   docker build --network none -t powerplane .    # installs from build/wheels with --no-index
# The build itself needs no network and no registry other than one holding BASE. BASE is any
# Debian-like image with Python 3.11 and venv support: the official slim image by default, pinned;
# where no registry is reachable, a local one (debootstrap + `docker import`, as the tests do):
#   docker build --build-arg BASE=local/debian-python:bookworm ...
#
# Run (one per host):
#   docker run -d --name powerplane --restart unless-stopped \
#     --network host --privileged \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     -v /var/run/openvswitch:/var/run/openvswitch \
#     -v /run/powerplane:/run/powerplane \
#     --pid host \
#     -e POWERPLANE_GROUP="$(getent group docker | cut -d: -f3)" \
#     -e POWERPLANE_UNDERLAY_IP=192.168.50.11 powerplane
# Why each of those:
#   --network host       the proxy listens on the host's loopback and the agent creates veths,
#                        VXLAN ports and addresses in the host's network namespace, not its own.
#   --privileged         moving a veth into a container's namespace and configuring it needs
#                        CAP_NET_ADMIN and CAP_SYS_ADMIN (setns) on the host.
#   --pid host           the agent enters containers' network namespaces through /proc/PID/ns/net
#                        of the PIDs that dockerd reports; those PIDs must be visible.
#   docker.sock          the upstream daemon every request is forwarded to, and sandbox containers.
#   /var/run/openvswitch the OVSDB socket of the host's Open vSwitch (ovsdb-server); OVS itself
#                        stays on the host (openvswitch-switch), the image only talks to it.
#   /run/powerplane      the proxy's unix socket, so host clients can use
#                        DOCKER_HOST=unix:///run/powerplane/docker.sock.
#   POWERPLANE_GROUP     the host's docker group by number: names are looked up in the image,
#                        which has no docker group (then only root can use the socket).
# Where --privileged is refused (a VM whose capability bounding set lacks CAP_SYS_RESOURCE, as on
# our test machines), the same capabilities without that one:
#   --cap-add ALL --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined
ARG BASE=python:3.11.11-slim-bookworm
FROM ${BASE}

LABEL org.opencontainers.image.title="powerplane" \
      org.opencontainers.image.description="Multi-host overlay networking for Docker" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY build/wheels/ /tmp/wheels/
COPY build/debs/ /tmp/debs/
# libnftables and its libraries as packages; the Python binding only unpacked, since it names
# Debian's python3 as a dependency and this venv's Python is the base image's. It is pure
# Python over ctypes, linked into the venv alone, exactly as deploy/install.sh does on a host.
# ovs-ofctl alone from openvswitch-common (whose other programs need Debian's python3 and
# more): serve installs the bridge's flow tables with it, through the mounted run directory.
RUN dpkg -i $(ls /tmp/debs/*.deb | grep -v -e python3-nftables -e openvswitch-common) \
 && dpkg-deb -x /tmp/debs/python3-nftables_*.deb / \
 && dpkg-deb --fsys-tarfile /tmp/debs/openvswitch-common_*.deb | tar -x -C / ./usr/bin/ovs-ofctl \
 && ovs-ofctl --version \
 && python3 -m venv /opt/powerplane \
 && /opt/powerplane/bin/pip install --no-index --no-cache-dir --disable-pip-version-check \
        --find-links /tmp/wheels powerplane \
 && ln -s /usr/lib/python3/dist-packages/nftables \
        "$(/opt/powerplane/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nftables" \
 && rm -rf /tmp/wheels /tmp/debs \
 && /opt/powerplane/bin/python -c 'import nftables; nftables.Nftables()' \
 && /opt/powerplane/bin/powerplane --version

COPY deploy/adapters.yml /etc/powerplane/adapters.yml

ENV PATH=/opt/powerplane/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    POWERPLANE_ADAPTERS=/etc/powerplane/adapters.yml

ENTRYPOINT ["powerplane"]
CMD ["serve"]
