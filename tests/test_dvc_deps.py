"""dvc.yaml's code dependencies equal each stage script's vitad import closure.

A module missing from a stage's deps means results DVC calls current although the code that made
them changed; a module listed but never imported re-runs work for unrelated edits. A subpackage
whose every module a stage imports is listed as its directory: one dvc.lock entry instead of one
per module (DVC rewrites the whole lock after every stage, so its size costs every stage).
"""

import re
from pathlib import Path

import yaml

from import_closure import import_closure

REPO = Path(__file__).resolve().parents[1]


def _listed_modules(dep: str) -> set[str]:
    """The module files a vitad code dep stands for: itself, or a directory's .py files."""
    path = REPO / dep
    if path.is_dir():
        return {module.relative_to(REPO).as_posix() for module in path.rglob("*.py")}
    return {dep}


def _subpackages() -> list[str]:
    return sorted(init.parent.relative_to(REPO).as_posix() for init in (REPO / "vitad").glob("*/__init__.py"))


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
        listed = set().union(*(_listed_modules(dep) for dep in deps if dep.startswith("vitad/")))
        imported = import_closure(REPO / script, REPO)
        if listed != imported:
            problems.append(f"{name}: missing {sorted(imported - listed)}, not imported {sorted(listed - imported)}")
        for package in _subpackages():
            if _listed_modules(package) <= imported and package not in deps:
                problems.append(f"{name}: imports every module of {package}, so it lists the directory, not its files")
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


def test_directory_code_deps_hash_sources_only():
    """Python writes __pycache__/ into a package's directory on first import (unless told not to):
    without this .dvcignore line every directory code dep changes hash after the first run, and
    `dvc status` reports every stage changed."""
    directory_deps = {dep for _, stage in _stages() for dep in stage["deps"] if dep.startswith("vitad/") and (REPO / dep).is_dir()}
    assert directory_deps, "no directory code deps: this check is moot"
    ignored = [line.strip() for line in (REPO / ".dvcignore").read_text().splitlines()]
    assert "__pycache__" in ignored
