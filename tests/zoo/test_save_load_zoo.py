"""shrink.save / shrink.load round trip on the rest of issue 2's model list (slow: the zoo run).

The fast models stay in tests/interop/test_save_load.py, which holds the check itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop.test_save_load import FAST, MODELS, assert_round_trip_is_bit_identical


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", [n for n in MODELS if n not in FAST])
def test_save_load_round_trip_is_bit_identical(name: str, tmp_path: Path) -> None:
    assert_round_trip_is_bit_identical(name, tmp_path)
