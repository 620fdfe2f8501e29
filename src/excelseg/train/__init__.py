"""The ExCEL trainer, an application over the library (DESIGN "Training architecture").

:mod:`.trainer` the loop, checkpoints, resume and logs; :mod:`.step` one training step (:func:`training_losses`);
:mod:`.optim` the optimiser and lr schedule; :mod:`.validate` in-training validation; :mod:`.data` the training
set and sampler; :mod:`.dist` the processes (the one reader of ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``).
"""

from .._deprecated import moved, names_of
from .dist import DistInfo, init_distributed
from .optim import build_optimizer, set_lrs
from .step import StepLosses, training_losses, uses_lvc
from .trainer import Trainer, TrainingError, config_differences, latest_checkpoint
from .validate import validate, validation_tables

__all__ = ["DistInfo", "StepLosses", "Trainer", "TrainingError", "build_optimizer", "config_differences",
           "init_distributed", "latest_checkpoint", "set_lrs", "training_losses", "uses_lvc", "validate",
           "validation_tables"]

# names the one-module trainer (excelseg/train.py) also had, now in the package's parts (kept for one release)
__getattr__ = moved(__name__, {
    **names_of("excelseg.train.data", "ResumableSampler TrainSet labelled_indices normalize_batch"),
    **names_of("excelseg.train.trainer", "CKPT_DIR LATEST"),
})
