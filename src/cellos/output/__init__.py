"""The workload's output as a live, bounded, verifiable stream (DESIGN.md §5 "Output").

One run's output passes one :class:`~cellos.output.pipeline.OutputPipeline`: redacted per
stream (:mod:`.redacting`), counted and digested, then fanned out to the durable per-cell log
(:mod:`.logfile`), the NATS publisher (:mod:`.nats`, only when configured) and any live
consumer (the terminal relay of :mod:`.relay`, a Python callback).
"""
