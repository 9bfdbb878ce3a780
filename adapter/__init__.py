"""Powerplane: multi-host overlay networking for Docker.

    adapter/                   foundation: errors, settings, model, groups, logs (shared by all)
    adapter/metrics.py         the Prometheus registry; told by network and commands, never
                               imported by proxy (it has an observer interface) or dataplane
    adapter/proxy/             the Docker API proxy            (knows no network code)
    adapter/dataplane/         OVS, links, tunnels, underlay   (knows no Consul, Docker, proxy)
    adapter/network/           Consul state, IPAM, endpoints, agent; uses dataplane
    adapter/hooks/             hook entry points; use network and proxy.powerstrip
    adapter/commands/, cli     the command line; wires everything

Dependencies point one way; ``tests/test_layers.py`` fails on an import against it.
"""

__version__ = "0.1.0"
