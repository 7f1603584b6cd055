"""The main job on its embedded defaults: train a small DCFT adapter on the shipped
real data, publish it to a local hub, serve it over HTTP on 127.0.0.1, query it,
print the answers and a few metrics, and shut down cleanly."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from adapters.store.hub import AdapterHub
from serving.config import EngineConfig, ServeConfig
from training.config import OptimConfig, TrainConfig
from training.data import DataConfig
from training.evaluate import versus_baseline
from training.train import train_adapter

REVIEWS = ["A gripping, funny and beautifully acted film.", "Dull, overlong and badly written; I walked out."]


def _train(work: Path, with_lm: bool) -> dict[str, Path]:
    jobs = {"minilm": TrainConfig(data=DataConfig(max_examples=800), output_dir=work / "adapters/sentiment",
                                  optim=OptimConfig(epochs=2, max_length=48, eval_every_epoch=False))}
    if with_lm:
        jobs["smollm2"] = TrainConfig(
            data=DataConfig(source="rotten-tomatoes-text", max_examples=128), output_dir=work / "adapters/reviews-lm",
            optim=OptimConfig(max_steps=24, batch_size=8, learning_rate=5e-3, max_length=48, eval_batch_size=32),
        )
    for backbone, config in jobs.items():
        print(f"== training a DCFT adapter on {config.data.source} with {backbone}")
        adapter, result = train_adapter(config)
        shown = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith("test_") and "runtime" not in k}
        print(
            f"   {adapter.metadata['trainable_parameters']} trainable parameters, {result.train_seconds:.0f} s, {shown}"
        )
        print(f"   {versus_baseline(config, result.metrics)}")
    return {backbone: config.output_dir for backbone, config in jobs.items()}


def run_demo(work: Path, port: int = 8000, with_lm: bool = True) -> None:
    from serving.launch import start, stop

    work.mkdir(parents=True, exist_ok=True)
    adapters = _train(work, with_lm)
    names = {"minilm": "demo/sentiment", "smollm2": "demo/reviews"}
    apps, keys = {}, {secrets.token_urlsafe(24): "demo", secrets.token_urlsafe(24): "admin"}
    keys_file = work / "api_keys.json"
    keys_file.write_text(json.dumps(keys))
    keys_file.chmod(0o600)
    for backbone, adapter_dir in adapters.items():
        hub_url = str(work / f"hub-{backbone}")
        version = AdapterHub(hub_url).publish(adapter_dir, names[backbone])
        print(f"== published {version.ref} ({version.size_bytes:,} bytes) to {hub_url}")
        engine = EngineConfig(model=backbone, hub=hub_url)
        apps[f"/{backbone}"] = ServeConfig(engine=engine, api_keys_file=str(keys_file.resolve()), port=port)
    print("== starting the Serve app on 127.0.0.1")
    base = start(apps, port=port)
    try:
        _query(base, *keys, with_lm=with_lm)
    finally:
        stop()
        print("== shut down")


def _query(base: str, demo_key: str, admin_key: str, with_lm: bool) -> None:
    demo, admin = ({"Authorization": f"Bearer {k}"} for k in (demo_key, admin_key))
    with httpx.Client(timeout=120) as http:
        answer = http.post(f"{base}/minilm/v1/classify", headers=demo,
                           json={"adapter": "demo/sentiment", "inputs": REVIEWS}).raise_for_status().json()
        for review, result in zip(REVIEWS, answer["results"], strict=True):
            print(f"   classify: {review!r} -> {result['label']} {result['scores']}")
        if with_lm:
            body = {"model": "demo/reviews", "prompt": "The film is", "max_tokens": 24, "temperature": 0}
            answer = http.post(f"{base}/smollm2/v1/completions", headers=demo, json=body).raise_for_status().json()
            print(f"   completion (demo/reviews): 'The film is' -> {answer['choices'][0]['text']!r}")
        denied = http.post(f"{base}/minilm/v1/classify", json={"adapter": "demo/sentiment", "inputs": ["x"]})
        print(f"   without a key: HTTP {denied.status_code}")
        metrics = http.get(f"{base}/minilm/metrics", headers=admin).raise_for_status().text
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name in ("dcft_requests_total", "dcft_metrics_scope"):  # the edge's; engine: ray_dcft_*
                print(f"   metric {sample.name}{sample.labels} = {sample.value}")
