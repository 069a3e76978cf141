"""Tools for measuring and testing edge-voice, kept off the daemon's import path.

:mod:`~edge.devtools.bench` (``edge-voice bench``) and :mod:`~edge.devtools.gguf_synth`
(random-weight GGUF models of real shapes). Nothing in the pipeline imports these.
"""
