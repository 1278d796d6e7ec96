"""dvc.yaml's code dependencies equal each stage script's vitad import closure.

A module missing from a stage's deps means results DVC calls current although the code that made
them changed; a module listed but never imported re-runs work for unrelated edits.
"""

import re
from pathlib import Path

import yaml

from import_closure import import_closure

REPO = Path(__file__).resolve().parents[1]


def _stages():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        yield name, body


def test_every_stage_depends_on_exactly_the_vitad_modules_its_script_imports():
    problems = []
    for name, stage in _stages():
        script = re.search(r"python (stages/\w+\.py)", stage["cmd"]).group(1)
        deps = {dep for dep in stage["deps"] if isinstance(dep, str)}
        assert script in deps, f"{name}: its script {script} is not a dep"
        listed = {dep for dep in deps if dep.startswith("vitad/")}
        imported = import_closure(REPO / script, REPO)
        if listed != imported:
            problems.append(f"{name}: missing {sorted(imported - listed)}, not imported {sorted(listed - imported)}")
    assert not problems, "\n".join(problems)


def test_import_closure_follows_lazy_imports_and_skips_type_checking(tmp_path):
    package = tmp_path / "vitad"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from vitad.sub import leaf\n")
    (package / "sub" / "leaf.py").write_text("def f():\n    import vitad.lazy\n")
    (package / "lazy.py").write_text("")
    (package / "typing_only.py").write_text("")
    script = tmp_path / "stage.py"
    script.write_text(
        "from typing import TYPE_CHECKING\nfrom vitad.sub import leaf\nif TYPE_CHECKING:\n    import vitad.typing_only\n"
    )
    assert import_closure(script, tmp_path) == {
        "vitad/__init__.py", "vitad/sub/__init__.py", "vitad/sub/leaf.py", "vitad/lazy.py",
    }
