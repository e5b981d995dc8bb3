"""Doors for real data: Perturb-seq AnnData and bulk count tables into count cubes.

``nbdask.from_anndata`` and ``nbdask.from_table`` (``nbdask import anndata|table``). Modules:
``groups`` (which cells or samples become which replicate), ``pseudobulk`` (streamed sums),
``size_factors``, ``cube`` (assembly and a write that is marked complete last), ``anndata``
and ``table`` (reading the sources).
"""
