import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The generated default dataset, all categories, a few images each."""
    from vitad import synthetic

    root = tmp_path_factory.mktemp("data") / "dataset"
    synthetic.generate(root, list(synthetic.CATEGORIES), seed=0, train_images=3, test_good_images=2, test_images_per_defect=1)
    return root


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory, tiny_dataset) -> Path:
    """A project that has run extract and score on ``tiny_dataset`` (see tests/tiny_project.py)."""
    from tiny_project import build_project

    return build_project(tmp_path_factory.mktemp("tiny") / "project", tiny_dataset)
