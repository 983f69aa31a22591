"""Every mistake a user can make, through the installed `cxr-search` script as a subprocess (as a user runs it).

A usage error prints the usage line, the help hint and one `error:` line; a bad input prints one `error:` line
naming the option or file and the fix; both exit 2, write nothing and start nothing. An internal error prints
one line naming the log file with the traceback and exits 1. Each command also has a subprocess test here (or
in test_phantoms / test_search_tune / test_crash_consistency for `data synth`, `run` and `resume`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

SCRIPT = Path(sys.executable).parent / "cxr-search"  # the console script `pip install` made
BOGUS = "sometext-not-weights\n"


def cli(*args: object, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "cxr_search.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess, *parts: str, exact: bool = True) -> str:
    """The one `error:` line of a refused command (exit 2, no traceback); `exact`: stderr holds nothing else."""
    everything = proc.stdout + proc.stderr
    assert proc.returncode == 2, everything[-3000:]
    assert "Traceback" not in everything, everything[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    if exact:
        assert len(lines) == 1, proc.stderr
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------- usage errors (typer's own)


@pytest.mark.parametrize("args, usage, message", [
    (["predcit"], "Usage: cxr-search [OPTIONS] COMMAND", "No such command 'predcit'"),
    (["run", "--bogus"], "Usage: cxr-search run [OPTIONS]", "No such option: --bogus"),
    (["train"], "Usage: cxr-search train [OPTIONS]", "'--backbone'"),
    (["data", "synth", "--out", "x", "--n-images", "abc"], "Usage: cxr-search data synth", "'--n-images'"),
    (["status"], "Usage: cxr-search status", "Missing argument 'exp'"),
])
def test_usage_errors_print_usage_hint_and_one_line(args, usage, message):
    proc = cli(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, proc.stderr
    assert lines[0].startswith(usage) and "--help' for help" in lines[1]
    assert lines[2].startswith("error: ") and message in lines[2]


def test_no_command_prints_the_help():
    proc = cli()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Usage: cxr-search" in proc.stdout and "train" in proc.stdout


# ---------------------------------------------------------------- bad input: one line, nothing written


@pytest.fixture
def space_file(tmp_path):
    def write(text: str, name: str = "space.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


TINY = "searcher: random\nscheduler: fifo\nnum_samples: 1\ntrial: {backbone: cnn3, max_epochs: 1}\n"


def test_a_binary_space_file_is_one_line(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_bytes(bytes(range(256)) * 2)
    one_line_error(cli("run", space, "--storage", tmp_path / "exps"), str(space), "not a text file")
    assert not (tmp_path / "exps").exists()


def test_optuna_without_params_is_refused_before_ray(space_file, tmp_path):
    space = space_file("searcher: optuna\nscheduler: fifo\nnum_samples: 1\ntrial: {backbone: cnn3}\nparams: {}\n")
    proc = cli("run", space, "--storage", tmp_path / "exps", "--num-samples", "1")
    one_line_error(proc, str(space), "params", "searcher: random")
    assert not (tmp_path / "exps").exists()


def test_an_unreachable_object_store_is_one_line_before_ray(tmp_path):
    with socket.socket() as probe:  # an S3 endpoint nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}
    proc = cli("run", "--smoke", "--storage", "s3://mybucket/exps", env=env)
    one_line_error(proc, "--storage s3://mybucket/exps")
    assert "Ray" not in proc.stdout  # refused while planning, before a Ray starts


def test_an_unwritable_storage_is_refused_before_ray(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_line_error(cli("run", "--smoke", "--storage", blocker / "exps"), "--storage", "is a file")


def test_a_cluster_address_nothing_answers_is_one_line_at_once(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on (Ray itself would retry it for minutes)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = cli("run", "--smoke", "--address", f"127.0.0.1:{port}", "--storage", tmp_path / "exps")
    one_line_error(proc, f"--address 127.0.0.1:{port}: nothing answers there", "leave --address out")
    assert not (tmp_path / "exps").exists()


def test_data_check_refuses_an_unwritable_json_before_decoding(tiny_phantoms):
    proc = cli("data", "check", tiny_phantoms, "--json", "/proc/x.json", "--workers", "1")
    one_line_error(proc, "--json /proc/x.json", "cannot write in /proc")
    assert proc.stdout == ""  # refused before the check ran


def test_data_check_writes_its_json_report(tiny_phantoms, tmp_path):
    proc = cli("data", "check", tiny_phantoms, "--json", tmp_path / "report.json", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "report.json").read_text())["n_usable"] == 120


@pytest.mark.parametrize("args, parts", [
    (["--epochs", "0"], ["--epochs must be >= 1, got 0"]),
    (["--size", "0"], ["--size must be >= 1, got 0"]),
    (["--device", "cuda"], ["no CUDA GPU"]),
])
def test_train_refuses_values_it_cannot_honour(tmp_path, args, parts):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    base = ["train", "--backbone", "cnn3", "--smoke", "--out", tmp_path / "m"]
    one_line_error(cli(*base, *args), *parts)
    assert not (tmp_path / "m").exists()


def test_train_refuses_unreadable_pretrained_weights_before_any_data_work(tmp_path):
    text = tmp_path / "weights.pth"
    text.write_text(BOGUS)
    proc = cli("train", "--backbone", "cnn3", "--smoke", "--pretrained", text, "--out", tmp_path / "m")
    one_line_error(proc, f"cannot read pretrained weights {text}", "pretrained 'none'")
    assert not (tmp_path / "m").exists()


def test_train_notes_upsampling_and_frozen_random_layers_before_data_work(tmp_path):
    proc = cli("train", "--backbone", "inception_v3", "--size", "32", "--freeze-fraction", "1",
               "--data", tmp_path / "missing", "--out", tmp_path / "m")
    one_line_error(proc, "missing")  # the data folder does not exist: refused after the notes
    out = " ".join(proc.stdout.split())
    assert "note: --size 32: inception_v3 needs at least 75 px, so images are upsampled to 75 px" in out
    assert "note: --freeze-fraction 1 without pretrained weights freezes random layers" in out


# ---------------------------------------------------------------- plans Ray could never run


@pytest.mark.slow
def test_trials_larger_than_this_machine_are_refused_before_any_file(space_file, tmp_path):
    cpus = os.cpu_count() or 1
    space = space_file(TINY + f"resources: {{cpu: {cpus + 2}}}\ndata: {{size: 32}}\n"
                       "params: {freeze_fraction: {choice: [0.0, 1.0]}}\n"
                       "variants: [{variant: a, backbone: inception_v3}]\n")
    proc = cli("run", space, "--storage", tmp_path / "exps", "--name", "big")
    one_line_error(proc, f"asks for {cpus + 2} CPUs (resources.cpu in {space})", f"has {cpus}",
                   f"ask for {cpus} or less", exact=False)
    assert not (tmp_path / "exps" / "big").exists()
    out = " ".join(proc.stdout.split())  # the plan's notes come first, before Ray starts
    assert "note: data.size 32: inception_v3 needs at least 75 px" in out
    assert "note: freeze_fraction up to 1 without pretrained weights freezes random layers" in out


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_gpu_trials_without_a_gpu_are_refused_before_any_file(space_file, tmp_path):
    space = space_file(TINY + "resources: {cpu: 1}\nparams: {lr: {loguniform: [1.0e-4, 1.0e-2]}}\n")
    proc = cli("run", space, "--storage", tmp_path / "exps", "--name", "gpu", "--gpus-per-trial", "0.5")
    one_line_error(proc, "asks for 0.5 GPU", "has no GPU", "--gpus-per-trial 0", exact=False)
    assert not (tmp_path / "exps" / "gpu").exists()


def test_trial_resources_must_fit_one_live_node_unless_the_cluster_may_grow(monkeypatch):
    from cxr_search.errors import CxrError
    from cxr_search.space import parse_space
    from cxr_search.tuning import resources
    from cxr_search.tuning.resources import check_trial_resources, ray

    monkeypatch.setattr(ray, "nodes", lambda: [  # a GPU node, a CPU node and a dead big one
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 32.0}},
        {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}])

    def spec(cpu: float, gpu: float):
        return parse_space({"searcher": "random", "scheduler": "fifo", "resources": {"cpu": cpu, "gpu": gpu},
                            "trial": {"backbone": "cnn3"}}, "s.yaml")

    assert check_trial_resources(spec(16, 0), address=None) == []  # the CPU node fits it
    assert check_trial_resources(spec(8, 0.5), address=None) == []  # the GPU node fits it
    with pytest.raises(CxrError, match=r"asks for 2 GPUs \(--gpus-per-trial or resources.gpu in s.yaml\) but "
                                       r"the largest node of this machine's Ray has 1"):
        check_trial_resources(spec(1, 2), address=None)
    with pytest.raises(CxrError, match="16 CPUs and 1 GPU on one node .* with that GPU share have at most 8 CPUs"):
        check_trial_resources(spec(16, 1), address=None)
    monkeypatch.setattr(resources, "may_autoscale", lambda: False)
    with pytest.raises(CxrError, match="of the cluster at auto has 32"):
        check_trial_resources(spec(48, 0), address="auto")
    monkeypatch.setattr(resources, "may_autoscale", lambda: True)
    notes = check_trial_resources(spec(48, 0), address="auto")
    assert len(notes) == 1 and "wait for the autoscaler" in notes[0]


def test_a_trial_pending_too_long_is_explained_once_per_period(monkeypatch):
    from cxr_search.tuning.callbacks import PendingWatch
    from cxr_search.tuning.resources import ray
    from cxr_search.tuning.trainable import KEY

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0})
    now, said = [0.0], []
    watch = PendingWatch(after_s=60, clock=lambda: now[0], say=said.append)
    pgf = SimpleNamespace(required_resources={"CPU": 4.0, "GPU": 0})
    waiting = SimpleNamespace(trial_id="t1", status="PENDING", config={KEY: "0003"}, placement_group_factory=pgf)
    for t in (0, 30, 59):
        now[0] = t
        watch.on_step_begin(0, [waiting])
    assert said == []
    now[0] = 61
    watch.on_step_begin(0, [waiting])
    assert len(said) == 1 and "trial 0003 has waited 1 min for 4 CPU" in said[0] and "autoscaler" in said[0]
    now[0] = 100
    watch.on_step_begin(0, [waiting])
    assert len(said) == 1  # not again within the period
    # a trial that fits a node while others run is an ordinary queue: nothing to explain
    queued = SimpleNamespace(trial_id="t2", status="PENDING", config={KEY: "0004"},
                             placement_group_factory=SimpleNamespace(required_resources={"CPU": 1.0}))
    running = SimpleNamespace(trial_id="t3", status="RUNNING")
    quiet = PendingWatch(after_s=60, clock=lambda: now[0], say=said.append)
    for t in (0, 500):
        now[0] = t
        quiet.on_step_begin(0, [queued, running])
    assert len(said) == 1


# ---------------------------------------------------------------- folders that are not experiments


@pytest.mark.parametrize("args", [
    ["status"], ["resume"], ["retrain"], ["ensemble"], ["explain", "--evaluate"],
])
def test_commands_that_take_an_experiment_refuse_a_data_folder(tiny_phantoms, args):
    proc = cli(args[0], tiny_phantoms, *args[1:])
    one_line_error(proc, str(tiny_phantoms), "not an experiment folder", "cxr-search run")


def test_predict_refuses_a_folder_without_a_model(tiny_phantoms, tmp_path):
    one_line_error(cli("predict", tiny_phantoms, tiny_phantoms), "no trained model here")


# ---------------------------------------------------------------- an internal error: one line and a log


def test_an_internal_error_is_one_line_naming_the_log_with_the_traceback(tmp_path):
    code = ("import sys\n"
            "from cxr_search import cli\n"
            "@cli.app.command('boom')\n"
            "def boom() -> None:\n"
            "    {}['missing']\n"
            "sys.argv = ['cxr-search', 'boom']\n"
            "cli.main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CXR_SEARCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: internal error (KeyError: 'missing')")
    log = Path(lines[0].split("the traceback is in ")[1].split(". Please")[0])
    assert log.parent == tmp_path / "cache" / "logs"
    text = log.read_text()
    assert "command: cxr-search boom" in text and "Traceback" in text and "KeyError" in text


# ---------------------------------------------------------------- each command once, for real, as a subprocess


@pytest.fixture(scope="module")
def tiny_exp(tmp_path_factory, tiny_phantoms) -> Path:
    """A finished tiny experiment (two cnn3 trials, predictions, ensemble), shared by the commands below."""
    from test_predict import SIZE, finished_experiment

    from cxr_search.data.prepare import prepare
    from cxr_search.experiment.folder import Experiment
    from cxr_search.experiment.plan import DataConfig

    torch.set_num_threads(2)
    data = prepare(tiny_phantoms, size=SIZE, progress=False)
    path = finished_experiment(tmp_path_factory.mktemp("cli"), data, epochs=1)
    Experiment.open(path).update(data=DataConfig(data_dir=str(tiny_phantoms), size=SIZE))  # what it trained on
    return path


def test_status_prints_the_trials(tiny_exp):
    proc = cli("status", tiny_exp)
    assert proc.returncode == 0, proc.stderr
    assert f"{tiny_exp}: 2 of" in " ".join(proc.stdout.split())


def test_ensemble_rebuilds_from_the_search(tiny_exp, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(tiny_exp, exp)
    proc = cli("ensemble", exp, "--top", "2", "--no-calibrate")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((exp / "ensemble" / "ensemble.json").read_text())["members"]) == 2


def test_retrain_validates_seeds_before_ray(tiny_exp):
    one_line_error(cli("retrain", tiny_exp, "--seeds", "0"), "--seeds must be >= 1, got 0")


@pytest.mark.slow
def test_retrain_trains_the_best_configuration_on_ray_and_reports_it(tiny_exp, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(tiny_exp, exp)
    proc = cli("retrain", exp, "--seeds", "1", "--max-epochs", "1", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (exp / "retrain" / "results.parquet").is_file() and "saved:" in proc.stdout


def test_predict_and_explain_new_images(tiny_exp, tiny_phantoms, tmp_path):
    image = next((tiny_phantoms / "test").rglob("*.png"))
    Image.open(image).save(tmp_path / "x.png")
    proc = cli("predict", tiny_exp, tmp_path / "x.png", "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 1 and rows[0]["error"] == "" and abs(sum(rows[0][k] for k in rows[0]
                                                                  if k.startswith("p_")) - 1) < 1e-6
    proc = cli("explain", tiny_exp, tmp_path / "x.png", "--out", tmp_path / "maps", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "maps" / "explanations.gradcam.csv").is_file()
    one_line_error(cli("predict", tiny_exp, tmp_path / "x.png", "--out", "/proc/p.csv"), "--out /proc/p.csv")


def test_report_writes_one_page_and_refuses_a_data_folder(tiny_exp, tiny_phantoms, tmp_path):
    from cxr_search.cli import app

    if "report" not in {c.name for c in app.registered_commands}:
        pytest.skip("no `report` command in this build")
    exp = tmp_path / "exp"
    shutil.copytree(tiny_exp, exp)
    proc = cli("report", exp, "--out", tmp_path / "report.html")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "report.html").stat().st_size > 0
    one_line_error(cli("report", tiny_phantoms), "not an experiment folder")


def test_weights_list_and_fetch_errors(tmp_path):
    proc = cli("weights", "list", "--dir", tmp_path)
    assert proc.returncode == 0 and "resnet34" in proc.stdout and "missing" in proc.stdout, proc.stderr
    one_line_error(cli("weights", "list", "--dir", tmp_path / "nope"), "--dir", "no such folder")
    one_line_error(cli("weights", "fetch", "--backbones", "resnet", "--to", tmp_path), "'resnet' is unknown")
    one_line_error(cli("weights", "fetch", "--backbones", "resnet34", "--to", "/proc/w"), "--to /proc/w")


@pytest.mark.slow
def test_train_prints_and_saves_the_data_warnings(phantoms_with_injections, tmp_path):
    out = tmp_path / "model"
    proc = cli("train", "--backbone", "cnn3", "--data", phantoms_with_injections, "--size", "32", "--epochs", "1",
               "--batch-size", "16", "--device", "cpu", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "data_report.json").read_text())
    assert saved["warnings"], saved
    printed = " ".join(proc.stdout.split())
    for warning in saved["warnings"]:
        assert f"data warning: {' '.join(warning.split())}" in printed
    assert (out / "result.json").is_file()
