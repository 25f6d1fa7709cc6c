"""The edge: cove's L4 proxy (TCP and UDP, PROXY protocol v2) on endpoint addresses.

``Edge`` and its data types are the public surface; ``python -m cove.net`` runs one from the
command line (the benchmark uses it). This package knows nothing of the API or the store.
"""

from cove.net.edge import Backend, BindError, Counters, Edge, Listener

__all__ = ["Backend", "BindError", "Counters", "Edge", "Listener"]
