"""Per-block estimators. Each kernel follows the contract of design §5:

``kernel(counts[P_b, G_b, R], size_factor[P_b, R], control_counts[G_b, C],
control_size_factor[C], **options) -> dict[name, array[P_b, G_b]]``

written once over the array namespace (NumPy or CuPy), without Python branching on data values.
"""

from .mom import mom_kernel

KERNELS = {"mom": mom_kernel}

__all__ = ["KERNELS", "mom_kernel"]
