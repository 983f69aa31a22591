"""results.py reads an experiment folder without Ray: the per-trial history survives Ray's restarts."""

import json

from cxr_search.search import results


def test_history_fills_epochs_that_rays_result_json_lost_on_a_restart(tmp_path):
    trial = tmp_path / "trial_a"
    (trial / "checkpoint_000002").mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps({"backbone": "cnn3"}))
    # Ray restored result.json from a stale sync: epoch 1 is gone, epochs 2-3 were reported after the restart
    reported = [{"epoch": 2, "val_loss": 0.8, "time_total_s": 5.0}, {"epoch": 3, "val_loss": 0.7, "time_total_s": 7.0}]
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in reported))
    engine_history = [{"epoch": e, "val_loss": v, "stop_reason": ""} for e, v in ((1, 0.9), (2, 0.8), (3, 0.7))]
    (trial / "checkpoint_000002" / "history.json").write_text(json.dumps(engine_history))

    hist = results.read_history(trial)

    assert list(hist["epoch"]) == [1, 2, 3]
    assert list(hist["val_loss"]) == [0.9, 0.8, 0.7]
    assert hist.loc[hist["epoch"] == 3, "time_total_s"].item() == 7.0  # Tune's own columns are kept


def test_history_without_checkpoint_is_result_json(tmp_path):
    trial = tmp_path / "trial_b"
    trial.mkdir()
    (trial / "result.json").write_text(json.dumps({"epoch": 1, "val_loss": 1.0}) + "\n{\"epoch\": 2, \"val_lo")
    hist = results.read_history(trial)  # a line cut short by a killed driver is skipped
    assert list(hist["epoch"]) == [1]
