"""Importing the package changes nothing of the process; a training run undoes what it changes."""

import json
import os
import subprocess
import sys
import warnings

from conftest_train import FAST, TINY_TOKEN_ADAPTER, make_store, train_config
from specalign.train.train import main as train_main

# Every module the package imports from elsewhere is imported first (libraries set warnings filters of
# their own on import); then every module of the package, and nothing may have changed since.
PROBE = """
import ast, importlib, json, os, pkgutil, warnings
from pathlib import Path
import matplotlib, specalign, torch

packages = ("specalign", "specalign.data", "specalign.train", "specalign.adapters", "specalign.vlms",
            "specalign.specdec")
modules = [f"{p}.{i.name}" for p in packages for i in pkgutil.iter_modules(importlib.import_module(p).__path__)]
for path in {Path(importlib.util.find_spec(m).origin) for m in modules}:
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for name in names:
            if not name.startswith("specalign"):
                try:
                    importlib.import_module(name)
                except ImportError:
                    pass

def state():
    return {"filters": repr(warnings.filters), "env": dict(os.environ), "threads": torch.get_num_threads(),
            "backend": matplotlib.rcParams._get_backend_or_none()}

before = state()
for m in modules:
    importlib.import_module(m)
after = state()
print(json.dumps({k: [before[k], after[k]] for k in before if before[k] != after[k]}))
"""


def test_importing_every_module_changes_no_global_state():
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == {}


def test_a_training_run_leaves_warnings_and_environment_as_they_were(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    store = make_store(tmp_path / "s", kind="tokens")
    filters = list(warnings.filters)
    train_main.run(train_config(store, tmp_path / "run", *TINY_TOKEN_ADAPTER, *FAST, "trainer.max_steps=2"))
    assert "WANDB_MODE" not in os.environ
    assert warnings.filters == filters
