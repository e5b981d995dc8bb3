"""Shipped transformer weights (``transformer.npz``: parameters plus a ``__metadata__`` JSON record)."""
