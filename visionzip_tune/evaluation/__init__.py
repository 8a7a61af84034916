"""Scores: held-out choice accuracy inside the training loop (:mod:`.heldout`), the lmms-eval model ``visionzip``
(:mod:`.lmms`) and local tasks (:mod:`.lmms_tasks`), and the benchmarks the ``eval`` command runs with the paper's
percentage-of-stock table (:mod:`.benchmarks`)."""
