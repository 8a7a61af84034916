"""The entry point lmms-eval finds the ``visionzip`` model by (``setup.cfg``: group ``lmms_eval.models``).

A module of its own, apart from the model code: lmms-eval builds its registry, entry points included, when its
``lmms_eval.models`` package is first imported -- which the model module itself does while it is being imported --
and a manifest read from a half-imported module would be missing. lmms-eval imports the class path lazily.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "visionzip"

manifest = ModelManifest(model_id=MODEL_ID, simple_class_path="visionzip_tune.evaluation.lmms.VisionZipModel")
