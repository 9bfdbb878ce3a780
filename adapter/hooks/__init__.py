"""Hook entry points: in-process Powerstrip adapters, named in adapters.yml like external ones.

Each module turns the Powerstrip messages of the Docker calls it hooks into calls on the network
control plane; the work itself lives in ``adapter.network``. A hook gets exactly the JSON an
external adapter would get and answers what one would answer (``adapter.proxy.powerstrip``).

May import: ``adapter.errors``, ``adapter.settings``, ``adapter.model``, ``adapter.network``,
``adapter.proxy.powerstrip`` and itself.
"""
