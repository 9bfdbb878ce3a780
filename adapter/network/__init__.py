"""The network control plane: state in Consul, IPAM, endpoints, the host agent and reconciler.

Owns what a network *is* across hosts and what this host should have: networks, addresses,
endpoints and hosts in Consul (``state``), the life of one container's endpoint (``endpoints``),
the create request's rewrite (``create_rewrite``), Docker as this host's container runtime
(``docker_api``), the tunnel follower (``tunnels``), reconciliation (``agent``), readiness and
the one start sequence (``runtime``).

May import: ``adapter.errors``, ``adapter.settings``, ``adapter.model``, ``adapter.dataplane``
and itself. Never the proxy, the hooks or the commands.
"""
