"""The public names keep working: every name ``lora_export`` lists loads, and the README's Python API block
imports what it shows."""

from __future__ import annotations

import re
from pathlib import Path

import lora_export

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_public_name_loads():
    for name in lora_export.__all__:
        assert getattr(lora_export, name) is not None, name


def test_readme_python_api_imports_run():
    block = README.read_text().split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    imports = [line for line in block.splitlines() if re.match(r"(from \S+ )?import ", line)]
    assert imports, "the Python API block shows no imports"
    namespace: dict = {}
    exec("\n".join(imports), namespace)  # noqa: S102 (our own README)
    shown = {name.strip() for line in imports for name in line.split(" import ", 1)[1].split(",")}
    assert shown <= set(namespace)
