"""``likerank export``: a published labels run as a dataset others can load.

One module per step or format: :mod:`~likerank.export.samples` (the rows, tombstones re-checked,
joined with face boxes and orientation), :mod:`~likerank.export.webdataset_writer`,
:mod:`~likerank.export.hf_writer`, :mod:`~likerank.export.parquet_writer`,
:mod:`~likerank.export.facts` (what the run's record and tables say about it),
:mod:`~likerank.export.croissant`, :mod:`~likerank.export.datasheet`, and
:mod:`~likerank.export.export` (the order, the journal that resumes, the manifest). The layout is
:mod:`pipeline.core.export_layout`, which training reads too.
"""
