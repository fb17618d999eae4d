"""The `specalign` dispatcher."""

import subprocess


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
