"""Redis with TLS (``rediss://``) and an ACL user with a password, as a deployment would run it:
daemon, Redis client and gateway all connect through the same kind of URL."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from helix_daemon.client import HelixClient
from helix_daemon.gateway.config import GatewayConfig
from tests.conftest import free_port
from tests.daemon_harness import start_thread_daemon, wait_until
from tests.gateway_harness import GatewayServer

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None
                                or shutil.which("redis-server") is None,
                                reason="needs openssl and a redis-server built with TLS")


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A private redis-server listening only on TLS, whose default user is off and whose ACL
    user ``helix`` has a password; yields (good URL, URL with a wrong password)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    acl = tmp_path / "users.acl"
    acl.write_text("user default off\nuser helix on >s3cret ~* &* +@all\n")
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
         str(cert), "--tls-auth-clients", "no", "--aclfile", str(acl), "--save", "",
         "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://helix:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    probe = redis.Redis.from_url(url)

    def answers() -> bool:
        try:
            return bool(probe.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers, 10, "the TLS redis-server")
        yield url, url.replace("s3cret", "wrong")
    finally:
        probe.close()
        proc.terminate()
        proc.wait(10)


def test_daemon_client_and_gateway_over_tls_with_an_acl_user(tls_redis: tuple[str, str],
                                                             tiny_model_path: Path) -> None:
    """Over ``rediss://helix:<password>@...`` a daemon serves, the Redis client and the gateway
    get the same greedy text; a gateway given a wrong password answers ``/health`` with 503 and
    chat requests with OpenAI's error body, never a crash."""
    url, wrong_url = tls_redis
    daemon = start_thread_daemon(str(tiny_model_path), url, "helix")
    good = GatewayServer(GatewayConfig(redis_url=url)).start()
    bad = GatewayServer(GatewayConfig(redis_url=wrong_url)).start()
    try:
        with HelixClient.from_url(url) as helix:
            direct = helix.result(helix.submit("Hello", max_tokens=6, temperature=0),
                                  timeout_s=60)
        with openai.OpenAI(base_url=good.base_url, api_key="x", max_retries=0) as client:
            answer = client.completions.create(model="default", prompt="Hello", max_tokens=6,
                                               temperature=0)
        assert direct.ok and answer.choices[0].text == direct.text
        assert httpx.get(f"{good.url}/health").json()["daemons"] == 1
        health = httpx.get(f"{bad.url}/health")
        assert health.status_code == 503
        assert health.json()["error"]["code"] == "redis_unavailable"
        with openai.OpenAI(base_url=bad.base_url, api_key="x", max_retries=0) as client, \
                pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model="default", prompt="Hello", max_tokens=2)
        assert caught.value.status_code == 503
    finally:
        bad.stop()
        good.stop()
        daemon.stop()
