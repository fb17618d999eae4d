"""The `specalign` dispatcher, and what it says about a bad command line."""

import subprocess

import pytest
from conftest_train import make_store


def run(*args):
    return subprocess.run(["specalign", *args], capture_output=True, text=True, check=False)


def test_usage_lists_stages():
    out = run("--help")
    assert out.returncode == 0
    for stage in ("synth", "import-pairs", "extract", "train", "evaluate", "pipeline"):
        assert stage in out.stdout


def test_unknown_stage_is_a_clear_error():
    out = run("trian")
    assert out.returncode == 2
    assert "unknown stage 'trian'" in out.stderr


def test_stage_help_shows_its_config():
    out = run("import-pairs", "--help")
    assert out.returncode == 0
    assert "specalign import-pairs" in out.stdout and "split_fractions" in out.stdout


# ----------------------------------------------------------------------------- command-line values

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "s", n_train=4, kind="tokens")


@pytest.mark.parametrize("args,expected", [
    (["train", "adapter.lr=abc", "store={store}", "out=run"], "adapter.lr=abc: it expects a number"),
    (["train", "out=run"], "store= is required (a path)"),                    # no store=: nothing made
    (["train", "store={store}", "out="], "out= is empty: it expects a path"),
    (["train", "store={store}", "out=run", "gamma=abc"], "Key 'gamma' is not in struct"),   # Hydra's own error
    (["extract", "out=new_store", "batch_size=abc"], "batch_size=abc: it expects an integer"),  # no partial store
    (["evaluate", "store={store}", "drafter={store}", "out=rep", "gamma=[3,x]"], "gamma=x: it expects an integer"),
])
def test_bad_command_line_values_are_one_line_and_create_nothing(store, tmp_path, args, expected):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = subprocess.run(["specalign", *(a.format(store=store) for a in args)], capture_output=True, text=True,
                         cwd=cwd, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert expected in out.stderr
    assert list(cwd.iterdir()) == []          # no run directory, no store, no outputs/ of Hydra's
