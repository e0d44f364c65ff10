"""The evaluation wing: quality against teacher cost, for Training Wheels and the baselines (SPEC §7).

Every row of ``report.json`` is one :class:`~tw_rl.evaluation.rows.RowKind` of the registry
(:mod:`tw_rl.evaluation.registry`), and every row has the same metrics (:mod:`tw_rl.evaluation.outputs`,
:mod:`tw_rl.evaluation.quality`, :mod:`tw_rl.evaluation.timing`). ``loop`` on every row names the loop that decoded
and timed it. The modules, from the bottom up:

- ``task``: translation or summarization (torch-free, for the dry run); ``quality``: BLEU, chrF, ROUGE, signatures,
  paired bootstrap, gap closed; ``outputs``: what a row decoded and its usage accounting; ``timing``: latency and
  throughput;
- ``rows``: the row kind and the context it reads; the families: ``alone`` (student alone, teacher alone), ``tw``
  (Training Wheels, + hard cap, offset 0, phase 1 only), ``fallback`` (random calls, confidence fallback on the
  trained and on the phase-0 student, the oracle caller), ``speculative`` (Hugging Face assisted generation,
  draft-and-verify); ``calibration``: every knob found on the validation split (the baselines' and the ``<τ>``
  offsets);
- ``registry``: every kind, in decoding order; ``report``: report.json's schema, report.md, the plot, the files;
  ``driver``: :func:`~tw_rl.evaluation.driver.evaluate`.

Nothing is imported here: ``tw_rl.evaluation.task`` stays importable without torch.
"""
