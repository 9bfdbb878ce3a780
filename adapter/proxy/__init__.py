"""The Docker API proxy: listeners, TLS, the HTTP/1 relay, hijacked streams and the hook chain.

Owns everything between a Docker client and dockerd: where the proxy listens (``listeners``,
``tls``), how bytes are relayed (``connection``, ``http1``, ``relay``), which requests are hooked
and how hooks are called (``hookchain``, ``adapters_config``, ``powerstrip``), and the shape of
the errors a client gets (``docker_errors``).

May import: ``adapter.errors``, ``adapter.settings`` and itself. It knows nothing of networks,
Consul or Open vSwitch: hooks reach it only as ``powerstrip.BuiltinHook`` values.
"""
