"""Training of the pair-set transformer (PyTorch, optional): ``nbdask train`` or ``python -m nbdask.train``.

``prior`` (NumPy only) draws synthetic NB2 comparisons and encodes them exactly as inference does;
``model`` is the PyTorch twin of ``nbdask.kernels.transformer``; ``loop`` fits it and writes the
``.npz`` weights. Inference never imports this package.
"""
