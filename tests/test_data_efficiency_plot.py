"""benchmarks/data_efficiency.py's curves: a PNG and the same figure in TensorBoard (fake scores, no runs)."""

import importlib.util
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "data_efficiency.py"


def test_curves_go_to_a_png_and_tensorboard(tmp_path):
    spec = importlib.util.spec_from_file_location("data_efficiency", SCRIPT)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    row = {"semantic_val_cos": 0.5, "lowlevel_val_2way": 0.7}
    results = {
        h: {"hours": float(h), **{m: dict(row) for m in study.METHODS}, "transfer": {**row, "encoder": {}}}
        for h in ("0.25", "1")
    }
    study.plot({"results": results, "all_data": None}, tmp_path / "data_efficiency.png")
    assert (tmp_path / "data_efficiency.png").is_file()
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    assert "data_efficiency/curves" in EventAccumulator(str(events)).Reload().Tags()["images"]
