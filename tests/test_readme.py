"""The README's two quickstart commands are the ones CI and users run."""
from __future__ import annotations

import re

from conftest import REPO


def test_quickstart_commands_and_ci():
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", quick, re.S)
    assert commands == ['pip install -e . && python run_pipeline.py', 'pip install -e ".[test]" && python -m pytest -q']
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
