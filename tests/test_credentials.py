"""The CLI's credential from a kubeconfig: what is presented, what is refused and why."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tpcontrol.client.credentials import CredentialError, KubeUser, load_user, plain_http_refusal


def kubeconfig(tmp_path: Path, user: str, current: str = "local") -> Path:
    path = tmp_path / "config"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"current-context: {current}\n"
        "contexts: [{name: local, context: {cluster: c, user: dev}}]\n"
        f"users: [{{name: dev, user: {user}}}]\n"
    )
    return path


def test_a_token_and_a_token_file_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    assert load_user(str(kubeconfig(tmp_path, "{token: abc}"))) == KubeUser("dev", token="abc")
    (tmp_path / "tok").write_text("from-file\n")
    user = load_user(str(kubeconfig(tmp_path, "{tokenFile: tok}")))
    assert user == KubeUser("dev", token="from-file")


def test_a_client_certificate_inline_or_from_files(tmp_path: Path) -> None:
    cert, key = b"-----CERT-----", b"-----KEY-----"
    inline = (
        f"{{client-certificate-data: {base64.b64encode(cert).decode()}, "
        f"client-key-data: {base64.b64encode(key).decode()}}}"
    )
    assert load_user(str(kubeconfig(tmp_path, inline))) == KubeUser("dev", cert=cert, key=key)
    (tmp_path / "c.crt").write_bytes(cert)
    (tmp_path / "c.key").write_bytes(key)
    files = "{client-certificate: c.crt, client-key: c.key}"
    assert load_user(str(kubeconfig(tmp_path, files))) == KubeUser("dev", cert=cert, key=key)


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("{exec: {command: aws}}", "its exec credentials are not supported"),
        ("{auth-provider: {name: gcp}}", "its auth-provider credentials are not supported"),
        ("{}", "it has no token or client certificate"),
        (
            "{client-certificate-data: '%%%', client-key-data: eA==}",
            "client-certificate-data: not base64",
        ),
        ("{tokenFile: /nonexistent/tok}", "tokenFile: cannot read /nonexistent/tok"),
    ],
)
def test_unusable_users_are_refused_naming_the_field(
    tmp_path: Path, user: str, message: str
) -> None:
    with pytest.raises(CredentialError, match=message):
        load_user(str(kubeconfig(tmp_path, user)))


def test_a_missing_context_is_named(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="current-context 'elsewhere' is not defined"):
        load_user(str(kubeconfig(tmp_path, "{token: x}", current="elsewhere")))


def test_no_kubeconfig_at_all_is_no_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_user(None) is None


def test_credentials_never_go_over_plain_http_beyond_loopback() -> None:
    user = KubeUser("dev", token="t")
    for url in ("http://127.0.0.1:8081", "http://localhost:1", "http://[::1]:2", "https://m:1"):
        assert plain_http_refusal(url, user) is None, url
    refusal = plain_http_refusal("http://traffic-manager.ambassador:8081", user)
    assert refusal is not None
    assert "refusing to send the credentials of kubeconfig user 'dev'" in refusal
    assert plain_http_refusal("http://10.0.0.5:8081", None) is None  # nothing to leak
