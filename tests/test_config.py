"""The agent config schema: decoding what 2.6 writes, encoding it back, errors naming fields."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from tpproxy.config import (
    ConfigError,
    Container,
    Intercept,
    Sidecar,
    decode_sidecar,
    encode_sidecar,
    listeners,
    load_sidecar,
)
from tpproxy.routing import app_routes
from tpproxy.targets import Address

DATA = Path(__file__).parent / "data"


def test_spec_example_decodes_with_genyaml_mounts_and_unknown_keys() -> None:
    sidecar = load_sidecar(DATA / "echo-agent.yaml")
    assert sidecar.agent_name == "echo"
    assert sidecar.workload_kind == "Deployment"
    assert sidecar.manager_port == 8081
    (container,) = sidecar.containers
    assert container.mounts == ("/config",)  # written as `Mounts` by genyaml
    assert container.env_prefix == "A_"
    first, grpc, alt = container.intercepts
    assert first.service_uid == "aaa-111"
    assert first.container_port_name == "http"
    assert not first.target_port_numeric
    assert grpc.target_port_numeric
    assert grpc.agent_port == 9901
    assert alt.agent_port == 9900
    assert alt.service_port == 8080


def test_port_unique_listeners_share_an_agent_port() -> None:
    sidecar = load_sidecar(DATA / "echo-agent.yaml")
    found = listeners(sidecar)
    assert [(x.agent_port, x.container_port, len(x.intercepts)) for x in found] == [
        (9900, 8080, 2),
        (9901, 8081, 1),
    ]
    assert app_routes(sidecar)[9900].app == Address("127.0.0.1", 8080)
    assert app_routes(sidecar, "10.0.0.7")[9901].app == Address("10.0.0.7", 8081)


def test_encode_uses_camel_case_lower_mounts_and_omits_zero_values() -> None:
    sidecar = load_sidecar(DATA / "echo-agent.yaml")
    text = encode_sidecar(sidecar).decode()
    assert "serviceUID: aaa-111" in text
    assert "mounts:" in text
    assert "Mounts" not in text
    assert "apiPort" not in text
    assert "manual" not in text
    assert "headless" not in text
    assert "somethingNewer" not in text
    assert decode_sidecar(text) == sidecar  # round trip


def test_lower_case_mounts_wins_when_both_spellings_are_present() -> None:
    sidecar = decode_sidecar(
        "containers:\n- name: a\n  mounts: [/a]\n  Mounts: [/b]\n  intercepts:\n"
        "  - {agentPort: 9900, containerPort: 80}\n"
    )
    assert sidecar.containers[0].mounts == ("/a",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("containers: [ {name: a\n", "cfg.yaml: not valid YAML"),
        ("", "cfg.yaml: empty document"),
        ("- a\n- b\n", "expected a mapping at the top level, got list"),
        ("managerPort: eighty\n", "Expected `int`, got `str` - at `$.managerPort`"),
        ("managerPort: 70000\n", "Expected `int` <= 65535 - at `$.managerPort`"),
        (
            "containers:\n- name: a\n  intercepts:\n  - {agentPort: 9900, containerPort: 80, protocol: SCTP}\n",
            "at `$.containers[0].intercepts[0].protocol`",
        ),
        (
            "containers:\n- intercepts: []\n",
            "Object missing required field `name` - at `$.containers[0]`",
        ),
        (
            "containers:\n- name: a\n  intercepts:\n  - {containerPort: 80}\n",
            "$.containers[0].intercepts[0].agentPort: must be set",
        ),
        (
            "containers:\n- name: a\n  intercepts:\n  - {agentPort: 9900}\n",
            "$.containers[0].intercepts[0].containerPort: must be set",
        ),
        (
            "containers:\n- name: a\n  intercepts:\n  - {agentPort: 9900, containerPort: 80}\n"
            "- name: b\n  intercepts:\n  - {agentPort: 9900, containerPort: 81}\n",
            "$.containers[1].intercepts[0].agentPort: 9900/TCP already forwards to container 'a' "
            "port 80, cannot also forward to container 'b' port 81",
        ),
    ],
)
def test_bad_config_names_the_source_and_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        decode_sidecar(text, "cfg.yaml")
    assert str(info.value).startswith("cfg.yaml: ")
    assert expected in str(info.value)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read: No such file"):
        load_sidecar(tmp_path / "missing.yaml")


def test_tcp_and_udp_on_one_agent_port_are_two_listeners() -> None:
    sidecar = Sidecar(
        containers=(
            Container(
                name="dns",
                intercepts=(
                    Intercept(agent_port=9900, container_port=53, protocol="TCP"),
                    Intercept(agent_port=9900, container_port=53, protocol="UDP"),
                ),
            ),
        )
    )
    assert [(x.agent_port, x.protocol) for x in listeners(sidecar)] == [
        (9900, "TCP"),
        (9900, "UDP"),
    ]
    assert list(app_routes(sidecar)) == [9900]  # only TCP is forwarded by the engine


@pytest.mark.parametrize(
    ("identifier", "matches"),
    [
        ("http", True),
        ("80", True),
        ("http/TCP", True),
        ("80/tcp", True),
        ("http/UDP", False),
        ("grpc", False),
        ("81", False),
    ],
)
def test_port_identifier_matching(identifier: str, matches: bool) -> None:
    icept = Intercept(service_port_name="http", service_port=80, protocol="TCP")
    assert icept.matches_port_identifier(identifier) is matches


def test_json_wire_form_is_camel_case() -> None:
    icept = Intercept(service_uid="u", agent_port=9900, container_port=80, target_port_numeric=True)
    assert msgspec.json.decode(msgspec.json.encode(icept)) == {
        "serviceUID": "u",
        "targetPortNumeric": True,
        "containerPort": 80,
        "agentPort": 9900,
    }
