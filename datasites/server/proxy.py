"""TLS in front of a datasite: an nginx server block that serves it over HTTPS.

The datasite itself speaks plain HTTP and listens on loopback (``launch --host 127.0.0.1``,
the default); nginx ends TLS on the public port and proxies to it. What syft needs from
the proxy, and the block sets:

- request bodies as large as a job needs, no larger: a round call carries the model's
  weights (over syft or the data plane), so ``client_max_body_size`` follows the policy's
  parameter cap (:func:`max_body_bytes`; the dataset is uploaded on loopback at launch, not
  through the proxy), and bodies stream to the datasite (no buffering to disk);
- strangers cannot hold connections: headers within 10 s, a body that pauses 10 s or a
  client that takes 60 s to read are cut (``client_header_timeout``,
  ``client_body_timeout``, ``send_timeout``), at most 64 connections per client address
  (``limit_conn``); the datasite applies the same deadlines itself (``http_guard``);
- long requests: a training round is one API call that answers when the round is done
  (the proxy waits an hour for the datasite's answer);
- websocket upgrades pass through (syft's streaming routes), other requests close the
  upstream connection as usual;
- modern TLS only (1.2, 1.3), HSTS.

Serve on port 443: syft 0.9.5's client reaches an ``https://`` datasite on 443 only (its
``ServerURL.from_url`` sets port 443 for every https URL, and every request goes through
it), so researchers connect to ``https://DOMAIN:443``.

>>> print(nginx_server_block(domain="datasite.st-mary.example", port=443))  # doctest: +SKIP

``fedmtl datasite proxy-config`` prints it (or writes it with ``--out``).
"""

from __future__ import annotations

import re
from pathlib import Path

from fedmtl.datasites.rules.policy import Policy
from fedmtl.datasites.server import http_guard
from fedmtl.errors import ConfigError

#: a training round is one API call; it may take long
DEFAULT_TIMEOUT_S = 3600
#: a client that does not read the response for this long is cut off
SEND_TIMEOUT_S = 60
#: connections one client address may hold at once
MAX_CONN_PER_ADDRESS = 64


def max_body_bytes(max_model_params: int | None = None) -> int:
    """The largest request body a job needs: a round call over syft carrying the weights
    of a model at the policy's parameter cap (the data plane's are smaller).

    Args:
        max_model_params: the policy's ``max_model_params`` (default: the default policy's).

    Returns:
        The bound in bytes (the same one the datasite applies to syft's routes).
    """
    params = Policy.max_model_params if max_model_params is None else int(max_model_params)
    return max(http_guard.SYFT_MIN_BODY, http_guard.SYFT_BYTES_PER_PARAM * params + (16 << 20))

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_ADDRESS = re.compile(r"^(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]|\*)$")
_SIZE = re.compile(r"^\d+[kKmMgG]?$")
_UNSAFE_PATH = re.compile(r'["\\$;{}\s]')


def letsencrypt_paths(domain: str) -> tuple[Path, Path]:
    """Where certbot keeps the certificate chain and key of ``domain``."""
    live = Path("/etc/letsencrypt/live") / domain
    return live / "fullchain.pem", live / "privkey.pem"


def nginx_server_block(
    *,
    domain: str,
    port: int = 443,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    upstream_port: int = 8080,
    upstream_host: str = "127.0.0.1",
    listen: str | None = None,
    max_body: str | None = None,
    max_model_params: int | None = None,
) -> str:
    """An nginx ``server`` block (and the ``map`` and connection zone it uses) that serves
    the datasite on ``upstream_host:upstream_port`` as ``https://domain:port``. It belongs
    in nginx's ``http`` context (a file in /etc/nginx/conf.d/ is). ``cert``/``key`` default
    to certbot's paths for ``domain``; ``listen`` is the address to listen on (default:
    all). ``max_body`` (an nginx size) overrides the body bound derived from
    ``max_model_params`` (:func:`max_body_bytes`; default: the default policy's cap).
    Raises :class:`~fedmtl.errors.ConfigError` on a value that does not belong in a
    config file (the message says which)."""
    if max_body is None:
        max_body = f"{-(-max_body_bytes(max_model_params) // (1 << 20))}m"
    if not _HOSTNAME.match(domain or ""):
        raise ConfigError(
            f"--domain {domain!r} is not a host name: give the name researchers connect to, "
            "e.g. datasite.st-mary.example"
        )
    for what, value in (("--port", port), ("--upstream-port", upstream_port)):
        if not isinstance(value, int) or not 0 < value < 65536:
            raise ConfigError(f"{what} {value!r} is not a TCP port (1-65535)")
    if not (_HOSTNAME.match(upstream_host) or _ADDRESS.match(upstream_host)):
        raise ConfigError(f"upstream host {upstream_host!r} is not a host name or address")
    if listen is not None and not _ADDRESS.match(listen) and listen != "localhost":
        raise ConfigError(f"--listen {listen!r} is not an IP address (e.g. 127.0.0.1, [::1], *)")
    if not _SIZE.match(str(max_body)):
        raise ConfigError(f"body size {max_body!r} is not an nginx size (e.g. 10g, 512m)")
    if (cert is None) != (key is None):
        raise ConfigError("give both --cert and --key (the certificate chain and its private key), or neither")
    if cert is None:
        cert, key = letsencrypt_paths(domain)
    cert, key = Path(cert).expanduser().absolute(), Path(key).expanduser().absolute()
    for what, path in (("--cert", cert), ("--key", key)):
        if _UNSAFE_PATH.search(str(path)):
            raise ConfigError(f"{what} {path}: move the file to a path without spaces, quotes, '$', ';' or braces")

    slug = re.sub(r"[^a-z0-9]", "_", domain.lower()) + f"_{port}"
    var = "$fedmtl_upgrade_" + slug
    zone = "fedmtl_conn_" + slug
    where = f"{listen}:{port}" if listen else str(port)
    upstream = f"{upstream_host}:{upstream_port}"
    return f"""\
# fedmtl datasite over HTTPS: https://{domain}:{port} -> http://{upstream}
# Written by `fedmtl datasite proxy-config`. It belongs in nginx's http {{}} context, e.g. as
# /etc/nginx/conf.d/fedmtl-{domain}.conf; check with `nginx -t`, then `systemctl reload nginx`.
# The datasite must listen on loopback only (`fedmtl datasite launch --host 127.0.0.1`, the
# default) so that HTTPS through this proxy is the only way in.

# websocket upgrades pass through; other requests close the upstream connection as usual
map $http_upgrade {var} {{
    default upgrade;
    ''      close;
}}

# connections per client address
limit_conn_zone $binary_remote_addr zone={zone}:10m;

server {{
    listen {where} ssl;
    server_name {domain};

    ssl_certificate     {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers off;
    ssl_session_timeout 1d;
    ssl_session_tickets off;
    add_header Strict-Transport-Security "max-age=63072000" always;

    # a round call carries the model's weights: bodies as large as the policy's parameter
    # cap needs, no larger; strangers cannot hold connections with slow headers or bodies
    client_max_body_size {max_body};
    client_header_timeout {int(http_guard.HEADER_TIMEOUT_S)}s;
    client_body_timeout {int(http_guard.BODY_GRACE_S)}s;
    send_timeout {SEND_TIMEOUT_S}s;
    keepalive_timeout {http_guard.KEEP_ALIVE_S}s;
    limit_conn {zone} {MAX_CONN_PER_ADDRESS};

    location / {{
        proxy_pass http://{upstream};
        proxy_http_version 1.1;
        proxy_set_header Host $http_host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto https;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection {var};

        # a training round is one call that answers when the round is done
        proxy_connect_timeout 60s;
        proxy_read_timeout {DEFAULT_TIMEOUT_S}s;
        proxy_send_timeout {DEFAULT_TIMEOUT_S}s;
        # stream bodies both ways instead of spooling them to nginx's disk
        proxy_request_buffering off;
        proxy_buffering off;
    }}
}}
"""
