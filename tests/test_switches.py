"""qcompile/switches.py: on/off switches from the environment."""

import pytest

from qcompile.switches import env_switch


def test_a_switch_reads_1_0_or_its_default(monkeypatch):
    monkeypatch.delenv("QDIFF_TEST_SWITCH", raising=False)
    assert env_switch("QDIFF_TEST_SWITCH", True) and not env_switch("QDIFF_TEST_SWITCH", False)
    monkeypatch.setenv("QDIFF_TEST_SWITCH", "1")
    assert env_switch("QDIFF_TEST_SWITCH", False)
    monkeypatch.setenv("QDIFF_TEST_SWITCH", "0")
    assert not env_switch("QDIFF_TEST_SWITCH", True)


@pytest.mark.parametrize("value", ["", "yes", "true", " 1"])
def test_any_other_value_is_an_error_naming_the_switch(monkeypatch, value):
    monkeypatch.setenv("QDIFF_TEST_SWITCH", value)
    with pytest.raises(ValueError, match="QDIFF_TEST_SWITCH must be 0 or 1"):
        env_switch("QDIFF_TEST_SWITCH", True)
