"""The ONNX side: every graph this package writes, how ONNX Runtime runs it, and the proof that it
matches PyTorch. Modules in the order data flows, each importing only those before it:

- :mod:`.format`: input and output names, the default opset, the shared graph's format version
  and file layout, and the output kinds (``GRAPH``, ``ADAPTER``) the output rule knows them by.
- :mod:`.targets`: the export-target registry (what each target writes, its parity tolerance).
- :mod:`.task_graph`: one task's graph, its weights (norms folded) as initializers.
- :mod:`.shared_graph`: one graph for every task, each task as its inputs.
- :mod:`.adapters`: a task as an ONNX Runtime adapter of the shared graph.
- :mod:`.sessions`: ONNX Runtime sessions, the shared graph's session and its specialisation
  to one task.
- :mod:`.parity`: probe batches and the parity checks against PyTorch.
- :mod:`.export`: the export verbs, which check, prove parity and write atomically.

The package is not called ``onnx`` so that ``import onnx`` always means the ONNX library.
"""
