"""A datasite over HTTPS: nginx runs the block that `fedmtl datasite proxy-config` writes,
with a server certificate from a throw-away CA; a researcher who pins the CA logs in and
sees the dataset, one who does not is refused by certificate verification.

nginx listens on 127.0.0.1:443: syft 0.9.5's client reaches an ``https://`` datasite on
port 443 only (``ServerURL.from_url`` sets 443 for every https URL, and each request
copies the URL through it), so that is the port a real deployment serves too.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fedmtl.cli import main as cli_main
from fedmtl.datasites.server import admin
from fedmtl.datasites.server.launch import free_port, launch, port_free
from fedmtl.datasites.server.proxy import nginx_server_block
from fedmtl.datasites.site import syftio
from fedmtl.errors import ConfigError, DatasiteError
from fedmtl.schema import Schema

RESEARCHER = "ada@uni.example"
RESEARCHER_PW = "correct-horse-battery"
CA_ENV = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "IGNORE_TLS_ERRORS", "SSL_CERT_FILE")


HTTPS_PORT = 443


def _skip_or_fail(msg: str) -> None:
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"{msg} (CI must run the TLS test: .ci/run installs nginx and runs as root)")
    pytest.skip(msg)


def _nginx() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found is None:
        _skip_or_fail("nginx not found: install it (Debian: `apt-get install nginx`) to run the TLS test")
    if not port_free("127.0.0.1", HTTPS_PORT):
        _skip_or_fail(f"cannot listen on 127.0.0.1:{HTTPS_PORT} (in use, or not root): the TLS test serves "
                      "https there, the only port syft 0.9.5's client reaches https datasites on")
    return found


def _write_ca_and_server_cert(out: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key), PEM: a CA made for this test and
    a certificate for localhost / 127.0.0.1 that it signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmtl test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = out / "ca.pem", out / "server.pem", out / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(paths[2], 0o600)
    return paths


def _nginx_conf(prefix: Path, server_block: Path) -> Path:
    """A whole nginx.conf around the server block, everything under ``prefix``."""
    temp = {"client_body": "body", "proxy": "proxy", "fastcgi": "fastcgi", "uwsgi": "uwsgi", "scgi": "scgi"}
    lines = []
    if os.geteuid() == 0:
        lines.append("user root root;")  # the workers write the temporary files below
    lines += ["daemon off;", "worker_processes 1;", f"pid {prefix}/nginx.pid;", f"error_log {prefix}/error.log warn;",
              "events { worker_connections 64; }", "http {", "    access_log off;"]
    for directive, sub in temp.items():
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        lines.append(f"    {directive}_temp_path {prefix}/tmp/{sub};")
    lines += [f"    include {server_block};", "}"]
    conf = prefix / "nginx.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _wait_listening(port: int, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"nginx exited ({proc.returncode}):\n{log.read_text(errors='replace') if log.exists() else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"nginx did not listen on {port} within {timeout:.0f}s")


@pytest.mark.integration
def test_researcher_logs_in_over_https_with_the_ca_pinned_and_is_refused_without(
    demo_cohort, tmp_path, monkeypatch, capsys
):
    # Prepare: a CA and a certificate for localhost, a datasite on loopback, nginx in front
    nginx = _nginx()
    for var in CA_ENV:
        monkeypatch.delenv(var, raising=False)
    ca, cert, key = _write_ca_and_server_cert(tmp_path)
    f = next(sf for sf in demo_cohort[1] if sf.name == "riverside")
    upstream = free_port()
    site = launch(home=tmp_path / "home", name=f.name, records=f.records, schema=f.schema, port=upstream)
    proc = None
    try:
        admin.add_researcher(home=site.home, email=RESEARCHER, password=RESEARCHER_PW)
        https_port = HTTPS_PORT
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        block = prefix / "fedmtl-datasite.conf"
        rc = cli_main(["datasite", "proxy-config", "--domain", "localhost", "--port", str(https_port),
                       "--cert", str(cert), "--key", str(key), "--upstream-port", str(upstream),
                       "--listen", "127.0.0.1", "--out", str(block)])
        assert rc == 0, capsys.readouterr().err
        text = block.read_text()
        assert f"proxy_pass http://127.0.0.1:{upstream};" in text and "client_max_body_size 64m;" in text
        conf = _nginx_conf(prefix, block)
        check = subprocess.run([nginx, "-t", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        _wait_listening(https_port, proc, prefix / "error.log")
        url = f"https://localhost:{https_port}"

        # Execute / Assert: with the CA pinned, the researcher logs in over HTTPS and reads
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
        client = syftio.login(url, RESEARCHER, RESEARCHER_PW)
        assert client.connection.url.protocol == "https"
        with syftio.quiet():
            datasets = client.datasets.get_all()
            assert [d.name for d in datasets] == ["riverside-records"]
            mock = datasets[0].assets[0].mock  # a body of some size, through the proxy
        assert list(mock.columns) == Schema.load(f.schema).names
        # the round data plane answers through the same proxy and certificate
        from fedmtl.researcher.dataplane_client import offers_dataplane

        assert offers_dataplane(url)

        # without it (the system's CAs only), certificate verification refuses the server
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")
        with pytest.raises(DatasiteError) as err:
            syftio.login(url, RESEARCHER, RESEARCHER_PW)
        assert "SSLError" in str(err.value) and "CERTIFICATE_VERIFY_FAILED" in str(err.value), str(err.value)
        assert not offers_dataplane(url)  # nor is the data plane reached without the CA
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        site.stop()


def test_proxy_config_prints_a_block_and_refuses_what_does_not_belong_in_one(tmp_path, capsys):
    # Execute: defaults (certbot's paths, port 443, upstream 8080), printed
    assert cli_main(["datasite", "proxy-config", "--domain", "datasite.st-mary.example"]) == 0
    out = capsys.readouterr().out
    # Assert
    assert "listen 443 ssl;" in out and "server_name datasite.st-mary.example;" in out
    assert "ssl_certificate     /etc/letsencrypt/live/datasite.st-mary.example/fullchain.pem;" in out
    assert "proxy_pass http://127.0.0.1:8080;" in out and "proxy_read_timeout 3600s;" in out
    assert "proxy_set_header Upgrade $http_upgrade;" in out and "ssl_protocols TLSv1.2 TLSv1.3;" in out
    # values that would break (or inject into) the config are refused with the reason
    bad = {
        "host name": dict(domain="evil.example; include /etc/passwd"),
        "TCP port": dict(domain="a.example", port=70000),
        "both --cert and --key": dict(domain="a.example", cert="/x.pem"),
        "without spaces": dict(domain="a.example", cert="/x y.pem", key="/k.pem"),
        "not an IP address": dict(domain="a.example", listen="0.0.0.0;"),
        "nginx size": dict(domain="a.example", max_body="lots"),
    }
    for reason, kwargs in bad.items():
        with pytest.raises(ConfigError, match=reason):
            nginx_server_block(**kwargs)
    assert cli_main(["datasite", "proxy-config", "--domain", "bad domain"]) == 2
    assert "is not a host name" in capsys.readouterr().err
