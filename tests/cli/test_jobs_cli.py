"""`dcft jobs` against a running edge over real HTTP on 127.0.0.1 (the app in-process under uvicorn; the
job is validated and run by the scheduler's steps, `validate_job` and `run_job`, called here, since this
test starts no Ray)."""

import json
import threading
import time

import pytest
import uvicorn

from adapters.store.hub import AdapterHub
from adapters.store.job_records import FineTuningConfig
from adapters.store.jobs import JobStore
from benchmarks.fixtures import tiny_llama_dir
from benchmarks.harness import free_port
from cli.main import main
from serving.api.app import create_app
from serving.api.auth import KeyRing
from serving.api.fine_tuning import FineTuning
from serving.backend import LocalBackend
from serving.config import EngineConfig, LimitsConfig
from serving.service import ModelService
from training.job_runner import run_job, validate_job

KEY = "acme-key-0123456789abcdef"
CONFIG = FineTuningConfig(events_every_steps=2)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs-cli")
    llama = tiny_llama_dir(root / "llama")
    store = JobStore(str(root / "hub"))
    service = ModelService(EngineConfig(model=str(llama), hub=store.url, kernel_size=4))
    tuning = FineTuning(store, CONFIG, 4, ("all",))
    app = create_app(LocalBackend(service), KeyRing({KEY: "acme"}), LimitsConfig(), AdapterHub(store.url), "llama",
                     fine_tuning=tuning)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps({"prompt": f"say {w}", "completion": f" {w}"})
                               for w in ["film", "plot", "cast", "great"] * 3))
    yield {"url": f"http://127.0.0.1:{server.config.port}", "store": store, "llama": llama, "train": train,
           "root": root}
    server.should_exit = True
    thread.join(timeout=10)
    service.close()


def dcft(hub, capsys, *args) -> str:
    main(["jobs", "--url", hub["url"], "--api-key", KEY, *args])
    return capsys.readouterr().out


def test_create_ls_events_show_plot_and_cancel(hub, capsys):
    job = json.loads(dcft(hub, capsys, "create", "--model", "llama", "--file", str(hub["train"]), "--suffix", "say",
                          "--epochs", "2", "--batch-size", "4", "--kernel-size", "4"))
    assert job["status"] == "validating_files" and job["hyperparameters"]["n_epochs"] == 2
    assert validate_job(hub["store"], hub["store"].job("acme", job["id"]), CONFIG, "causal_lm").status == "queued"
    assert run_job(hub["store"].url, str(hub["llama"]), "acme", job["id"], 1, CONFIG) == "succeeded"
    listing = dcft(hub, capsys, "ls")
    assert job["id"] in listing and "succeeded" in listing and "acme/say@1" in listing
    events = dcft(hub, capsys, "events", job["id"]).splitlines()
    assert "Files validated" in events[1] and "training loss=" in events[3]
    assert events[-1].endswith("Fine-tuning job succeeded")
    plot = hub["root"] / "loss.png"
    shown = dcft(hub, capsys, "show", job["id"], "--plot", str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and '"fine_tuned_model": "acme/say@1"' in shown
    queued = json.loads(dcft(hub, capsys, "create", "--model", "llama", "--file", str(hub["train"])))
    assert json.loads(dcft(hub, capsys, "cancel", queued["id"]))["status"] == "cancelled"


def test_errors_are_one_line_and_exit_2(hub, capsys):
    with pytest.raises(SystemExit) as exit_:
        dcft(hub, capsys, "show", "ftjob-" + "0" * 24)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "error: 404: no fine-tuning job 'ftjob-000000000000000000000000'"
    bad = hub["root"] / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(SystemExit):
        dcft(hub, capsys, "create", "--model", "llama", "--file", str(bad))
    assert "line 2: invalid JSON" in capsys.readouterr().err
