"""A test callback for tests/test_resume.py: where training is (a file), optionally slowed down per batch."""

import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class Progress(Callback):
    """Writes ``"epoch batch"`` to ``path`` after every training batch; sleeps ``$BRAINIT_TEST_BATCH_DELAY`` s."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.path.write_text(f"{trainer.current_epoch} {batch_idx}")
        time.sleep(float(os.environ.get("BRAINIT_TEST_BATCH_DELAY", "0")))
