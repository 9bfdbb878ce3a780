"""The ``powerplane`` commands, one module each (``adapter.cli`` parses and dispatches).

May import anything: commands wire the proxy, the hooks and the network control plane together.
"""
