"""The test tree mirrors the package (tests/core, tests/model, tests/data, tests/train, tests/eval,
tests/stages, tests/export, tests/serve, tests/bench). Shared helpers live in tests/runs.py; a few test
modules also reuse each other's small builders (a tiny model, a toy run) by module name, so every folder of
the tree is importable from any test, as it was when the tree was flat."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for folder in [HERE, *sorted(p for p in HERE.iterdir() if p.is_dir() and p.name not in ("fixtures", "__pycache__"))]:
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
