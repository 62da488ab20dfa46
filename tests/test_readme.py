"""The README's Python example runs as written."""
import os
import re

from conftest import ROOT


def test_readme_api_example_runs(tmp_path, monkeypatch):
    readme = open(os.path.join(ROOT, "README.md")).read()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it writes out/demo.pt below the folder it runs in
    exec(compile(example, "README.md", "exec"), {"__name__": "__main__"})
    assert (tmp_path / "out" / "demo.pt").exists()
