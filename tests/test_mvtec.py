"""MVTec AD download, verification, safe extraction and local folders, without internet.

A tiny MVTec-layout tree is packed into a .tar.xz and served from a local HTTP server on
127.0.0.1 whose handler implements Range requests and can drop the connection mid-body.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitad.core.data import DatasetError, index_category
from vitad.mvtec import MVTEC_SHA256, DownloadError, link_folder, prepare_mvtec

CATEGORIES = ("bottle", "grid")


def write_mvtec_tree(root: Path, categories=CATEGORIES) -> None:
    """Two train images, a good and a defective test image with its mask, per category."""
    rng = np.random.default_rng(0)
    for category in categories:
        images = {
            f"{category}/train/good/000.png": (8, 8),
            f"{category}/train/good/001.png": (8, 8),
            f"{category}/test/good/000.png": (8, 8),
            f"{category}/test/broken/000.png": (8, 8),
        }
        for relative, (height, width) in images.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        mask = np.zeros((8, 8), dtype=np.uint8)
        mask[2:5, 3:6] = 255
        mask_path = root / category / "ground_truth" / "broken" / "000_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(mask_path)
    (root / "license.txt").write_text("CC BY-NC-SA 4.0\n")


def pack(tree: Path, archive: Path, extra_members=()) -> bytes:
    """tar.xz of ``tree`` (members named like the official archive), then ``extra_members``:
    (TarInfo, bytes | None) pairs appended last so that unsafe ones come after good files."""
    with tarfile.open(archive, "w:xz") as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=path.relative_to(tree).as_posix(), recursive=False)
        for info, data in extra_members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return archive.read_bytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(directory: Path) -> list[str]:
    """Names under ``directory`` that a failed run must not leave (temp or partial dirs)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.name == "dataset")


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> bytes:
    base = tmp_path_factory.mktemp("mvtec_src")
    write_mvtec_tree(base / "tree")
    return pack(base / "tree", base / "mvtec_anomaly_detection.tar.xz")


@pytest.fixture
def serve():
    """start(payload, ...) -> (url, list of the Range header of every GET, None when absent)."""
    servers = []

    def start(body: bytes, *, cut_first_after=None, fail_after_first=False, honour_range=True, status=200):
        requests: list[str | None] = []

        class Handler(BaseHTTPRequestHandler):
            timeout = 5

            def do_GET(self):
                range_header = self.headers.get("Range")
                requests.append(range_header)
                if status != 200 or (fail_after_first and len(requests) > 1):
                    self.send_error(status if status != 200 else 503)
                    return
                start = 0
                if range_header and honour_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", range_header)[1])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                sent = body[start:]
                if cut_first_after is not None and len(requests) == 1:
                    sent = sent[:cut_first_after]  # then the handler returns: connection closed
                self.wfile.write(sent)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/mvtec_anomaly_detection.tar.xz", requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_verify_extract_only_requested_categories(tmp_path, payload, serve):
    url, requests = serve(payload)
    dest, archive = tmp_path / "dataset", tmp_path / "archives" / "mvtec_anomaly_detection.tar.xz"

    prepare_mvtec(dest, ["bottle"], url, sha256(payload), archive)

    assert sorted(p.name for p in dest.iterdir()) == ["bottle"]
    samples = index_category(dest, "bottle")
    assert [s.image_path for s in samples if s.is_anomalous] == ["bottle/test/broken/000.png"]
    assert archive.read_bytes() == payload
    assert not archive.with_name(archive.name + ".part").exists()
    assert requests == [None]
    assert leftovers(tmp_path) == ["dataset"]

    prepare_mvtec(dest, ["bottle", "grid"], url, sha256(payload), archive)
    assert sorted(p.name for p in dest.iterdir()) == ["bottle", "grid"]
    assert requests == [None], "a verified archive on disk must not be downloaded again"


def test_wrong_hash_deletes_download_and_leaves_nothing(tmp_path, payload, serve):
    url, _ = serve(payload)
    dest, archive = tmp_path / "dataset", tmp_path / "mvtec_anomaly_detection.tar.xz"

    with pytest.raises(DownloadError, match=f"{sha256(payload)}.*data.mvtec.sha256.*deleted"):
        prepare_mvtec(dest, ["bottle"], url, "0" * 64, archive)

    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupted_transfer_resumes_with_range(tmp_path, payload, serve):
    cut = len(payload) // 3
    url, requests = serve(payload, cut_first_after=cut)
    dest, archive = tmp_path / "dataset", tmp_path / "mvtec_anomaly_detection.tar.xz"

    prepare_mvtec(dest, ["grid"], url, sha256(payload), archive)

    assert requests == [None, f"bytes={cut}-"]
    assert archive.read_bytes() == payload
    assert index_category(dest, "grid")


def test_server_ignoring_range_restarts_the_file(tmp_path, payload, serve):
    url, requests = serve(payload, cut_first_after=len(payload) // 2, honour_range=False)
    archive = tmp_path / "mvtec_anomaly_detection.tar.xz"

    prepare_mvtec(tmp_path / "dataset", ["grid"], url, sha256(payload), archive)

    assert requests == [None, f"bytes={len(payload) // 2}-"]
    assert archive.read_bytes() == payload


def test_failed_run_keeps_partial_download_and_next_run_resumes(tmp_path, payload, serve):
    cut = len(payload) // 2
    broken_url, _ = serve(payload, cut_first_after=cut, fail_after_first=True)
    dest, archive = tmp_path / "dataset", tmp_path / "mvtec_anomaly_detection.tar.xz"
    part = archive.with_name(archive.name + ".part")

    with pytest.raises(DownloadError, match=f"HTTP 503.*{re.escape(str(archive))}.*data.mvtec.archive"):
        prepare_mvtec(dest, ["bottle"], broken_url, sha256(payload), archive)
    assert part.stat().st_size == cut
    assert not dest.exists() and not archive.exists()

    url, requests = serve(payload)
    prepare_mvtec(dest, ["bottle"], url, sha256(payload), archive)
    assert requests == [f"bytes={cut}-"]
    assert archive.read_bytes() == payload and not part.exists()


def test_offline_error_says_where_to_put_the_archive(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    archive = tmp_path / "archives" / "mvtec_anomaly_detection.tar.xz"

    with pytest.raises(DownloadError) as error:
        prepare_mvtec(tmp_path / "dataset", ["bottle"], f"http://127.0.0.1:{closed_port}/a.tar.xz", "a" * 64, archive)

    message = str(error.value)
    assert str(archive) in message and "data.mvtec.archive" in message and "data.mvtec.url" in message
    assert not (tmp_path / "dataset").exists()
    assert list((tmp_path / "archives").iterdir()) == []


def test_http_error_names_the_url_parameter(tmp_path, serve):
    url, _ = serve(b"", status=404)
    with pytest.raises(DownloadError, match="HTTP 404.*data.mvtec.url"):
        prepare_mvtec(tmp_path / "dataset", ["bottle"], url, "a" * 64, tmp_path / "m.tar.xz")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_local_archive_with_wrong_hash_is_an_error_and_kept(tmp_path, payload):
    archive = tmp_path / "mvtec_anomaly_detection.tar.xz"
    archive.write_bytes(payload[:-10])
    with pytest.raises(DownloadError, match="does not match data.mvtec.sha256"):
        prepare_mvtec(tmp_path / "dataset", ["bottle"], "http://127.0.0.1:9/unused", sha256(payload), archive)
    assert archive.read_bytes() == payload[:-10]
    assert not (tmp_path / "dataset").exists()


def test_unknown_category_of_the_official_archive_fails_before_downloading(tmp_path):
    with pytest.raises(DatasetError, match="data.categories: botle not in MVTec AD"):
        prepare_mvtec(tmp_path / "dataset", ["botle"], "http://127.0.0.1:9/unused", MVTEC_SHA256,
                      tmp_path / "m.tar.xz")


def test_category_missing_from_archive_is_named_with_what_is_there(tmp_path, payload):
    archive = tmp_path / "mvtec_anomaly_detection.tar.xz"
    archive.write_bytes(payload)
    with pytest.raises(DatasetError, match=r"no cable in the archive \(it holds: bottle, grid\)"):
        prepare_mvtec(tmp_path / "dataset", ["bottle", "cable"], "http://127.0.0.1:9/unused", sha256(payload), archive)
    assert leftovers(tmp_path) == []


def test_existing_dataset_is_replaced_as_a_whole(tmp_path, payload):
    archive = tmp_path / "mvtec_anomaly_detection.tar.xz"
    archive.write_bytes(payload)
    dest = tmp_path / "dataset"
    (dest / "stale_category").mkdir(parents=True)
    prepare_mvtec(dest, ["grid"], "http://127.0.0.1:9/unused", sha256(payload), archive)
    assert sorted(p.name for p in dest.iterdir()) == ["grid"]
    assert leftovers(tmp_path) == ["dataset"]


def _member(name: str, kind=tarfile.REGTYPE, linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    data = b"pwned\n" if kind == tarfile.REGTYPE else None
    info.size = len(data) if data else 0
    return info, data


@pytest.mark.parametrize(
    "member, message",
    [
        (_member("bottle/../../evil.txt"), "contains '..'"),
        (_member("/tmp/evil.txt"), "absolute path"),
        (_member("bottle/escape", tarfile.SYMTYPE, "../../evil.txt"), "points outside its category"),
        (_member("bottle/abs_link", tarfile.SYMTYPE, "/etc/passwd"), "is absolute"),
        (_member("bottle/hard", tarfile.LNKTYPE, "grid/train/good/000.png"), "points outside its category"),
        (_member("bottle/tty", tarfile.CHRTYPE), "device file"),
    ],
    ids=["dotdot", "absolute", "symlink-escape", "symlink-absolute", "hardlink-other-category", "device"],
)
def test_unsafe_members_are_refused_and_nothing_is_left(tmp_path, member, message):
    write_mvtec_tree(tmp_path / "tree")
    archive = tmp_path / "archives" / "evil.tar.xz"
    archive.parent.mkdir()
    data = pack(tmp_path / "tree", archive, [member])
    dest = tmp_path / "out" / "dataset"

    with pytest.raises(DatasetError, match=f"{re.escape(member[0].name)}.*{message}"):
        prepare_mvtec(dest, ["bottle"], "http://127.0.0.1:9/unused", sha256(data), archive)

    assert list((tmp_path / "out").iterdir()) == []
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))


def test_symlink_inside_its_category_is_extracted(tmp_path):
    write_mvtec_tree(tmp_path / "tree")
    archive = tmp_path / "links.tar.xz"
    data = pack(tmp_path / "tree", archive, [_member("bottle/readme_link", tarfile.SYMTYPE, "train/good/000.png")])
    prepare_mvtec(tmp_path / "dataset", ["bottle"], "http://127.0.0.1:9/unused", sha256(data), archive)
    link = tmp_path / "dataset" / "bottle" / "readme_link"
    assert link.is_symlink() and link.read_bytes() == (tmp_path / "tree/bottle/train/good/000.png").read_bytes()


@pytest.mark.parametrize("bad", [["a/b"], [".."], "bottle", []])
def test_bad_category_names_are_refused(tmp_path, bad):
    with pytest.raises(DatasetError, match="data.categories"):
        prepare_mvtec(tmp_path / "d", bad, "http://127.0.0.1:9/unused", "a" * 64, tmp_path / "m.tar.xz")


def test_bad_sha256_parameter_is_named(tmp_path):
    with pytest.raises(DatasetError, match="data.mvtec.sha256"):
        prepare_mvtec(tmp_path / "d", ["bottle"], "http://127.0.0.1:9/unused", "abc", tmp_path / "m.tar.xz")


def test_folder_is_hard_linked_not_copied(tmp_path):
    source, dest = tmp_path / "mvtec", tmp_path / "data" / "dataset"
    write_mvtec_tree(source)

    link_folder(source, dest, ["bottle"])

    assert sorted(p.name for p in dest.iterdir()) == ["bottle"]
    assert index_category(dest, "bottle") == index_category(source, "bottle")
    mask = "bottle/ground_truth/broken/000_mask.png"
    assert os.stat(dest / mask).st_ino == os.stat(source / mask).st_ino
    assert leftovers(dest.parent) == ["dataset"]


def test_folder_across_filesystems_is_copied_with_a_warning(tmp_path, monkeypatch, capsys):
    source, dest = tmp_path / "mvtec", tmp_path / "dataset"
    write_mvtec_tree(source)

    def cross_device_link(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))

    monkeypatch.setattr(os, "link", cross_device_link)
    link_folder(source, dest, ["grid"])

    image = "grid/test/broken/000.png"
    assert (dest / image).read_bytes() == (source / image).read_bytes()
    assert os.stat(dest / image).st_ino != os.stat(source / image).st_ino
    assert capsys.readouterr().err.count("warning: cannot hard-link") == 1


def test_folder_missing_mask_is_named_and_nothing_left(tmp_path):
    source, dest = tmp_path / "mvtec", tmp_path / "dataset"
    write_mvtec_tree(source)
    (source / "grid/ground_truth/broken/000_mask.png").unlink()

    with pytest.raises(DatasetError, match=r"grid/ground_truth/broken/000_mask.png: missing ground-truth mask"):
        link_folder(source, dest, ["bottle", "grid"])
    assert leftovers(tmp_path) == []


def test_folder_mask_size_mismatch_is_named(tmp_path):
    source, dest = tmp_path / "mvtec", tmp_path / "dataset"
    write_mvtec_tree(source)
    Image.fromarray(np.zeros((8, 9), dtype=np.uint8)).save(source / "bottle/ground_truth/broken/000_mask.png")

    with pytest.raises(DatasetError, match=r"bottle/ground_truth/broken/000_mask.png: mask size 9x8 differs"):
        link_folder(source, dest, ["bottle"])
    assert leftovers(tmp_path) == []


def test_folder_path_must_exist_and_not_be_the_output(tmp_path):
    with pytest.raises(DatasetError, match="data.folder.path"):
        link_folder(None, tmp_path / "dataset", ["bottle"])
    write_mvtec_tree(tmp_path / "dataset" / "raw")
    with pytest.raises(DatasetError, match="data.folder.path.*replaced on every run"):
        link_folder(tmp_path / "dataset" / "raw", tmp_path / "dataset", ["bottle"])
    assert (tmp_path / "dataset" / "raw" / "bottle").is_dir()
