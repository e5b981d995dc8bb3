"""Doors for real data: Perturb-seq AnnData, bulk count tables and per-sample count files into
count cubes.

``nbdask.from_anndata``, ``nbdask.from_table`` and ``nbdask.from_files`` (``nbdask import
anndata|table|files``). Modules:
``groups`` (which cells or samples become which replicate), ``pseudobulk`` (streamed sums),
``size_factors``, ``cube`` (assembly and a write that is marked complete last), ``anndata``
and ``table`` (reading the sources).
"""
