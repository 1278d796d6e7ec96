import sys
import threading
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


@pytest.fixture
def two_torch_threads():
    """torch on two threads during the test (CPU streams need at least two); yields a function
    that returns (the calling thread's torch threads, those of a thread started now), which a
    stream must leave as they were."""
    import torch

    def thread_counts() -> tuple[int, int]:
        started = []
        thread = threading.Thread(target=lambda: started.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return torch.get_num_threads(), started[0]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield thread_counts
    torch.set_num_threads(threads)


@pytest.fixture
def forward_teams(monkeypatch):
    """A function that makes an extractor record every forward pass's (thread, torch threads)
    in the list it returns (the extractor is restored after the test)."""
    import torch

    def record(extractor) -> list[tuple[int, int]]:
        teams = []
        extract_into = extractor.extract_into

        def recording(images, embeddings, patches):
            teams.append((threading.get_ident(), torch.get_num_threads()))
            extract_into(images, embeddings, patches)

        monkeypatch.setattr(extractor, "extract_into", recording)
        return teams

    return record
