"""Save Quantized's naming and atomic, never-overwriting save, without ComfyUI."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from comfyui_quantizer.nodes import saving
from comfyui_quantizer.quant_core import OutputError


@pytest.fixture
def result_file(tmp_path: Path) -> Path:
    path = tmp_path / "tmp" / "quantized_abc.safetensors"
    path.parent.mkdir()
    path.write_bytes(os.urandom(4096))
    return path


@pytest.mark.parametrize(
    "prefix",
    [
        "../evil",
        "a/../../evil",
        "a/..",
        "..\\evil",
        "sub\\..\\..\\evil",
        "/tmp/evil",
        "\\\\server\\share\\evil",
        "C:\\evil",
        "c:evil",
        "",
        "   ",
        "folder/",
        "nul\x00byte",
    ],
)
def test_escaping_or_empty_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(OutputError, match="filename_prefix"):
        saving.check_prefix(prefix)


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("flux_fp8", "flux_fp8"),
        ("quantized/flux_fp8", "quantized/flux_fp8"),
        ("./a//b/./c", "a/b/c"),
        ("win\\sub\\name", "win/sub/name"),
        ("dots..in..name", "dots..in..name"),
    ],
)
def test_prefixes_inside_the_folder_are_kept(prefix: str, expected: str) -> None:
    assert saving.check_prefix(prefix).as_posix() == expected


def test_save_never_overwrites_and_counts_up(result_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    first = saving.save_unique(result_file, folder, "quantized/flux")
    second = saving.save_unique(result_file, folder, "quantized/flux")
    assert first == folder / "quantized" / "flux_00001_.safetensors"
    assert second == folder / "quantized" / "flux_00002_.safetensors"
    assert first.read_bytes() == second.read_bytes() == result_file.read_bytes()
    # Other names with the same start do not disturb the counter.
    (folder / "quantized" / "flux_extra_00007_.safetensors").write_bytes(b"x")
    (folder / "quantized" / "flux_00009_.safetensors").write_bytes(b"y")
    third = saving.save_unique(result_file, folder, "quantized/flux")
    assert third.name == "flux_00010_.safetensors"
    assert (folder / "quantized" / "flux_00009_.safetensors").read_bytes() == b"y"
    assert not [p for p in folder.rglob("*") if p.name.endswith(".partial")]


def test_a_name_taken_meanwhile_is_skipped_not_replaced(
    result_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    # Another writer creates the name after the counter was computed.
    real_next = saving.next_counter

    def racing_next(target: Path, base: str) -> int:
        n = real_next(target, base)
        (target / f"{base}_{n:05d}_.safetensors").write_bytes(b"theirs")
        return n

    monkeypatch.setattr(saving, "next_counter", racing_next)
    path = saving.save_unique(result_file, folder, "m")
    assert path.name == "m_00002_.safetensors"
    assert (folder / "m_00001_.safetensors").read_bytes() == b"theirs"


def test_across_file_systems_a_staged_copy_is_linked_into_place(
    result_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    real_link = os.link
    calls: list[tuple[str, str]] = []

    def link(src: str | Path, dst: str | Path) -> None:
        calls.append((str(src), str(dst)))
        if Path(src) == result_file:  # the temp file sits on another file system
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(src, dst)

    monkeypatch.setattr(saving.os, "link", link)
    path = saving.save_unique(result_file, folder, "m")
    assert path.read_bytes() == result_file.read_bytes()
    assert len(calls) == 2 and Path(calls[1][0]).name.endswith(".partial")
    assert sorted(p.name for p in folder.iterdir()) == ["m_00001_.safetensors"]


def test_without_hard_links_the_name_is_reserved_then_replaced(
    result_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "m_00001_.safetensors").write_bytes(b"old")

    def no_links(src: str | Path, dst: str | Path) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(saving.os, "link", no_links)
    path = saving.save_unique(result_file, folder, "m")
    assert path.name == "m_00002_.safetensors"
    assert path.read_bytes() == result_file.read_bytes()
    assert (folder / "m_00001_.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in folder.iterdir()) == [
        "m_00001_.safetensors",
        "m_00002_.safetensors",
    ]


def test_an_unwritable_folder_is_an_output_error(result_file: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OutputError, match="cannot create folder"):
        saving.save_unique(result_file, blocker, "sub/m")
