"""Development code of the jaxinterp repository, not installed with the package.

* :mod:`devtools.testing`: random-init Hugging Face checkpoints and IOI data for the tests
  and benchmarks (needs torch, a test extra);
* :mod:`devtools.train_demo`: the trainer and GPT-2 exporter of the shipped demo model
  (``python -m devtools.train_demo``);
* :mod:`devtools.acdc_loop`: ACDC as a plain Python loop, the reference the compiled
  :func:`jaxinterp.acdc.acdc` is tested and timed against.

pytest finds it through ``pythonpath`` in ``pyproject.toml``; the benchmarks put the
repository root on ``sys.path`` (``benchmarks/common.py``).
"""
