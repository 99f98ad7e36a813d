"""Settings precedence (flag > env > default) and errors that name the flag or variable."""

from __future__ import annotations

import pytest

from tpproxy.config import ConfigError
from tpproxy.settings import load_settings
from tpproxy.targets import Address


def test_defaults() -> None:
    s = load_settings({}, {})
    assert s.listen_host == "0.0.0.0"
    assert s.admin_address() == Address("0.0.0.0", 9180)
    assert s.drain_timeout == 20.0


def test_env_overrides_default_and_flag_overrides_env() -> None:
    env = {
        "TPPROXY_DRAIN_TIMEOUT": "3.5",
        "TPPROXY_LOG_FORMAT": "json",
        "TPPROXY_FORWARD": "1=2,3=4",
    }
    s = load_settings({"log_format": None}, env)
    assert s.drain_timeout == 3.5
    assert s.log_format == "json"
    assert s.forward == ("1=2", "3=4")
    s = load_settings({"drain_timeout": 1.0, "log_format": "plain"}, env)
    assert s.drain_timeout == 1.0
    assert s.log_format == "plain"


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="TPPROXY_DRAIN_TIMEOUT: Expected `float`"):
        load_settings({}, {"TPPROXY_DRAIN_TIMEOUT": "soon"})


def test_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--connect-timeout: Expected `float` > 0"):
        load_settings({"connect_timeout": 0.0}, {})


@pytest.mark.parametrize(
    "bad", ["9000", "x=127.0.0.1:80", "9000=127.0.0.1:http", "0=1", "9000=host:0"]
)
def test_bad_forward_names_the_value(bad: str) -> None:
    s = load_settings({"forward": [bad]}, {})
    with pytest.raises(ConfigError, match=f"--forward '{bad}'"):
        s.forwards()


def test_admin_off_and_ipv6() -> None:
    assert load_settings({"admin": "off"}, {}).admin_address() is None
    assert load_settings({"admin": "[::1]:9000"}, {}).admin_address() == Address("::1", 9000)
