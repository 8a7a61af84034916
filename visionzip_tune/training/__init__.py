"""A recipe -> a run: the typed config (:mod:`.config`), its checks (:mod:`.preflight`), what it means for a model
(:mod:`.build`), the loop (:mod:`.loop`), its checkpoints, metrics, plots, preemption and lock, the launcher
(:mod:`.launch`) and the export of a run (:mod:`.export_run`)."""
