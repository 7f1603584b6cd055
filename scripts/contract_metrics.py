"""How the HTTP edge and the model side meet, measured on a checkout (this one, or `--tree` another,
to compare before and after a change):

- the project files a classify request's adapter name passes through (traced: every function call
  whose arguments or locals hold the name, as text or parsed), and how often the name is parsed;
- the project files a streamed completion's `max_tokens` passes through (traced likewise);
- what `serving/api/` imports from the project;
- whether the Ingress process imports torch, its module count and peak RSS;
- the classes with the most methods.

The request paths run in process (the app over `LocalBackend`, tiny random models), so the Ray hops
(`serving/ingress.py`, `routing.py`, `deployment.py`) are not in the traced lists; both sides of a
comparison are measured alike.

    python scripts/contract_metrics.py                      # this checkout
    python scripts/contract_metrics.py --tree ../old-clone  # another one, for a before/after
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

PACKAGES = ("adapters", "backbones", "benchmarks", "cli", "serving", "training")
NAME, MAX_TOKENS = "acme/sentiment", 37  # a max_tokens no default uses, so a 37 is this request's


def static_metrics(tree: Path) -> dict:
    imports = set()
    for path in sorted((tree / "serving" / "api").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                imports.add(node.module)
            elif isinstance(node, ast.Import):
                imports |= {alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES}
    methods = {}
    for package in PACKAGES:
        for path in (tree / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    count = sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in node.body)
                    methods[f"{path.relative_to(tree)}:{node.name}"] = count
    longest = sorted(methods.items(), key=lambda kv: -kv[1])[:6]
    return {"api_imports_from_project": sorted(imports),
            "api_imports_model_side": sorted(m for m in imports if m.startswith("serving.") and not m.startswith(
                ("serving.api", "serving.calls", "serving.config", "serving.errors", "serving.metrics", "serving.rows",
                 "serving.fleet"))),
            "longest_classes": longest}


def ingress_process(tree: Path) -> dict:
    module = "serving.ingress" if (tree / "serving" / "ingress.py").exists() else "serving.deployment"
    probe = (f"import resource, sys; import {module}; "
             "print(sys.modules.get('torch') is not None, len(sys.modules), "
             "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tree, env=os.environ | {"PYTHONPATH": str(tree)},
                         capture_output=True, text=True, check=True).stdout.split()
    return {"ingress_module": module, "imports_torch": out[0] == "True", "modules": int(out[1]),
            "peak_rss_mib": int(out[2])}


# --- traced request paths (run in the measured tree's own interpreter) --------------------------


class Tracer:
    """Files whose functions see a value `holds` recognises, and how often `parse` functions ran."""

    def __init__(self, tree: Path):
        self.tree, self.holds = str(tree), None  # holds: what to look for; None: nothing yet
        self.files: Counter[str] = Counter()
        self.parses = Counter()

    def __call__(self, frame, event, arg):
        path = frame.f_code.co_filename
        if self.holds is None or event != "call" or not path.startswith(self.tree) or "/.venv/" in path:
            return None
        rel = os.path.relpath(path, self.tree)
        if rel.endswith("store/names.py") and frame.f_code.co_name in ("parse", "parse_name"):
            self.parses[f"{rel}:{frame.f_code.co_name}"] += 1
        if any(self.holds(value) for value in list(frame.f_locals.values())):
            self.files[rel] += 1
        return None

    def install(self) -> None:
        """Before the app's and the engine's threads start: a thread takes the trace function set
        when it starts, and the test client's and the decoder's live for the whole run."""
        sys.settrace(self)
        threading.settrace(self)

    def watch(self, holds) -> tuple[Counter, Counter]:
        self.holds, self.files, self.parses = holds, Counter(), Counter()
        return self.files, self.parses


def holds_name(value, nested: bool = False) -> bool:
    """The name as text, parsed, or as a call's, result's or request body's `adapter`."""
    if isinstance(value, str):
        return value == NAME or value.startswith(NAME + "@")
    if type(value).__name__ == "AdapterRef":
        return str(value).startswith(NAME)
    try:
        adapter = None if nested else getattr(value, "adapter", None)
    except Exception:  # noqa: BLE001 - some objects compute attributes; those hold no name
        return False
    return adapter is not None and holds_name(adapter, nested=True)


def holds_max_tokens(value) -> bool:
    """The request's max_tokens as its body's, its Sampling's, or a call's, row's or request's sampling."""
    if type(value).__name__ in ("Sampling", "CompletionRequest", "ChatCompletionRequest"):
        return getattr(value, "max_tokens", None) == MAX_TOKENS
    try:
        sampling = getattr(value, "sampling", None)
    except Exception:  # noqa: BLE001 - as above
        return False
    return type(sampling).__name__ == "Sampling" and sampling.max_tokens == MAX_TOKENS


def traced_paths(tree: Path) -> dict:
    from fastapi.testclient import TestClient

    from adapters.store.hub import AdapterHub
    from benchmarks.fixtures import random_adapter, tiny_bert_dir, tiny_llama_dir
    from serving.api.app import create_app
    from serving.api.auth import KeyRing
    from serving.backend import LocalBackend
    from serving.config import EngineConfig, LimitsConfig
    from serving.service import ModelService

    key = "acme-key-0123456789abcdef"
    headers = {"Authorization": f"Bearer {key}"}
    tracer = Tracer(tree)
    tracer.install()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bert, llama = tiny_bert_dir(root / "bert"), tiny_llama_dir(root / "llama")
        hub, lm_hub = AdapterHub(str(root / "hub")), AdapterHub(str(root / "lm-hub"))
        hub.publish(random_adapter(bert, root / "a", "seq_cls", seed=1, kernel=4), NAME)
        lm_hub.publish(random_adapter(llama, root / "b", "causal_lm", seed=2, kernel=4), "acme/writer")
        for model, which_hub, backbone, route, body, holds, label in [
            (bert, hub, "minilm", "/v1/classify", {"adapter": NAME, "inputs": ["a fine film"]}, holds_name,
             "classify_name"),
            (llama, lm_hub, "llama", "/v1/completions", {"model": "acme/writer", "prompt": "once upon",
                                                         "max_tokens": MAX_TOKENS, "stream": True},
             holds_max_tokens, "stream_max_tokens"),
        ]:
            service = ModelService(EngineConfig(model=str(model), hub=which_hub.url, kernel_size=4))
            app = create_app(LocalBackend(service), KeyRing({key: "acme"}), LimitsConfig(), which_hub, backbone)
            with TestClient(app) as client:
                client.post(route, json=body, headers=headers)  # warm: imports and first-call caches
                files, parses = tracer.watch(holds)
                answer = client.post(route, json=body, headers=headers)
                tracer.holds = None
                assert answer.status_code == 200, answer.text
            service.close()
            out[label] = {"files": sorted(files), "parses": dict(parses)}
    sys.settrace(None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--traced-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    tree = args.tree.resolve()
    if args.traced_only:
        print(json.dumps(traced_paths(tree)))
        return
    child = subprocess.run([sys.executable, __file__, "--tree", str(tree), "--traced-only"], cwd=tree,
                           env=os.environ | {"PYTHONPATH": str(tree)}, capture_output=True, text=True, check=True)
    report = {"tree": tree.name, **json.loads(child.stdout.strip().splitlines()[-1]), **static_metrics(tree),
              "ingress": ingress_process(tree)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
