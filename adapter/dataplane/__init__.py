"""The data plane of one host: the OVS bridge, container ports, tunnels, links, the underlay and
the host firewall.

Owns the switch and the kernel objects it is made of: OVSDB (``ovs``, the only ovsdbapp user),
netlink (``links``, the only pyroute2 user), the underlay bridge (``underlay``) and the domain
verbs over them (``switch``: plug, unplug, set_tunnels); nftables (``nft``, the only nftables
user) and the one table of the host firewall over it (``firewall``).

May import: ``adapter.errors``, ``adapter.settings``, ``adapter.model`` and itself. It takes
typed values (networks, hosts, addresses) and never reads Consul or Docker.
"""
