"""The tokenizer pins file of `sparkgrid head --tokenizer-pins`: read and checked, errors
naming the option and the entry."""

from __future__ import annotations

import pytest

from scheduler.config import load_tokenizer_pins
from sparkgrid.cli import main

DIGEST = "ab" * 32


def test_a_pins_file_maps_models_to_digests(tmp_path):
    path = tmp_path / "pins.toml"
    path.write_text(f'[tokenizers]\n"org/code" = "{DIGEST}"\n')
    assert load_tokenizer_pins(str(path)) == {"org/code": DIGEST}
    assert load_tokenizer_pins(None) is None


@pytest.mark.parametrize("text, problem", [
    ('[tokenizers]\n"org/code" = "abc"\n', "'org/code': expected a SHA-256"),
    (f'[tokenizer]\n"org/code" = "{DIGEST}"\n', "one table, [tokenizers]"),
    ("not toml at all [", "cannot read"),
])
def test_a_bad_pins_file_is_an_error_naming_the_option(tmp_path, capsys, text, problem):
    path = tmp_path / "pins.toml"
    path.write_text(text)
    code = main(["head", "--tokenizer-pins", str(path), "--redis-url", "redis://127.0.0.1:1/0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --tokenizer-pins:") and problem in err
