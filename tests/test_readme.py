"""Every `specalign <stage> ...` command line of README.md composes against conf/ (no model is loaded)."""

from __future__ import annotations

import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from specalign.cli import STAGES
from specalign.paths import CONF_DIR, REPO_ROOT


def readme_commands() -> list[list[str]]:
    """The `specalign` lines of README.md's ```bash blocks, continuation lines joined, shell variables and
    comments dropped, as argument lists."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(re.sub(r"\$\(.*?\)|\$\w+", "X", line), comments=True)
            if "specalign" in words:       # also after `pip install ... &&`
                commands.append(words[words.index("specalign") + 1:])
    return commands


def first_of_sweeps(overrides: list[str]) -> list[str]:
    """A multirun's sweep `key=a,b,c` composes as its first value."""
    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        value = next(o.sweep_string_iterator()) if o.is_sweep_override() else o.value()
        out.append(f"{o.get_key_element()}={value if isinstance(value, str) else o.get_value_element_as_str()}")
    return out


COMMANDS = readme_commands()


def test_the_readme_has_commands_of_every_documented_stage():
    stages = {c[0] for c in COMMANDS if c}
    assert {"extract", "train", "export", "evaluate", "plot", "import-pairs", "pipeline"} <= stages
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_composes(command):
    stage, *args = command
    assert stage in STAGES
    overrides = first_of_sweeps([a for a in args if a != "-m"])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(stage, overrides=overrides, return_hydra_config=True)
    for override in overrides:       # every key the line sets is one the stage reads (groups pick files)
        key = override.partition("=")[0]
        assert (CONF_DIR / key).is_dir() or OmegaConf.select(cfg, key) is not None, key
