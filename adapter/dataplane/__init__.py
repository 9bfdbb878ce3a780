"""The data plane of one host: the OVS bridge, container ports, tunnels, links and the underlay.

Owns the switch and the kernel objects it is made of: OVSDB (``ovs``, the only ovsdbapp user),
netlink (``links``, the only pyroute2 user), the underlay bridge (``underlay``) and the domain
verbs over them (``switch``: plug, unplug, set_tunnels).

May import: ``adapter.errors``, ``adapter.settings``, ``adapter.model`` and itself. It takes
typed values (networks, hosts, addresses) and never reads Consul or Docker.
"""
