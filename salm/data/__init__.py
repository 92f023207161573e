"""The data pipeline: NeMo/Lhotse manifests -> Lhotse Shar -> Ray Data rows -> bucketed batches.

One module per step, in the order data flows:
``prepare`` (manifests -> Shar shards), ``shar_source`` (Shar shards -> Ray Data read tasks),
``processing`` (decode, resample, filter, tokenize on CPU workers), ``pipeline`` (wires them into
one ``ray.data.Dataset``), ``bucketing`` + ``collate`` (inside each train worker), ``sync`` (ranks
stop together on finite data), ``estimate_bins`` (bucket bins from data). ``config`` holds the
``data:`` schema with NeMo's knob names. Nothing here imports ``salm.model``.
"""
