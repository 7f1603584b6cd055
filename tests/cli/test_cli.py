"""The `dcft` command: params, inspect, publish and hub."""

import json

import pytest

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_bert_dir
from cli.main import main


def run(capsys, *argv) -> str:
    main(list(argv))
    return capsys.readouterr().out


@pytest.mark.real
def test_params_for_real_minilm(capsys, minilm_dir):
    rows = json.loads(
        run(capsys, "params", str(minilm_dir / "config.json"), "--kernel-sizes", "8", "--targets", "all", "--json")
    )
    (row,) = rows
    # 6 blocks x (4 x (48+48+64) + 2 x (48+192+64)) and LoRA r1: 6 x (4 x 768 + 2 x 1920)
    assert row["dcft"] == 6 * (4 * 160 + 2 * 304) == 7488
    assert row["lora_rank1"] == 6 * (4 * 768 + 2 * 1920) == 41472
    assert row["head"] == 384 * 2 + 2


def test_params_error_names_the_layer(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["params", str(tiny_bert_dir(tmp_path / "bert")), "--kernel-sizes", "7"])  # 7 divides no width
    assert "kernel 7 does not divide" in capsys.readouterr().err


def test_inspect_publish_and_hub_commands(capsys, tmp_path):
    bert = tiny_bert_dir(tmp_path / "bert")
    adapter = random_adapter(bert, tmp_path / "adapter", "seq_cls", seed=0, kernel=4)
    info = json.loads(run(capsys, "inspect", str(adapter), "--json"))
    assert info["parameters"]["dcft"] > 0 and info["config"]["labels"] == ["neg", "pos"] and len(info["digest"]) == 64
    assert "A(1, 8)" in run(capsys, "inspect", str(adapter))
    hub = str(tmp_path / "hub")
    assert "acme/sentiment@1" in run(capsys, "publish", str(adapter), "--hub", hub, "--name", "acme/sentiment")
    assert "acme/sentiment" in run(capsys, "hub", "ls", "--hub", hub)
    AdapterHub(hub).fleet.set("acme/sentiment", "pinned")
    assert "pinned" in run(capsys, "hub", "placements", "--hub", hub)
    assert json.loads(run(capsys, "hub", "show", "acme/sentiment", "--hub", hub))["versions"] == [1]
    assert "removed acme/sentiment@1" in run(capsys, "hub", "rm", "acme/sentiment@1", "--hub", hub)
    with pytest.raises(SystemExit):
        main(["publish", str(adapter), "--hub", hub, "--name", "../escape"])
    assert "bad adapter name" in capsys.readouterr().err
