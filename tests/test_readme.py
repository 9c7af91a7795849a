"""The README's quick start runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    torch = namespace["torch"]
    torch.testing.assert_close(namespace["x_back"], namespace["x"], atol=1e-4, rtol=1e-4)
