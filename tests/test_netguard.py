"""worker.netguard: the SSRF guard for result URLs. No network: DNS names go
through a fake resolver; literal IPs and 'localhost' use the real getaddrinfo."""
from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from worker.errors import ConfigError, ResultRefused, UpstreamUnavailable
from worker.netguard import UrlPolicy, check_size, check_url, redacted, without_credentials

PUBLIC = UrlPolicy()


def fake_dns(table: dict[str, list[str]]):
    """A getaddrinfo look-alike answering from `table`; unknown names fail like DNS."""

    def resolve(host: str, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for a in table[host]:
            fam = socket.AF_INET6 if ":" in a else socket.AF_INET
            out.append((fam, socket.SOCK_STREAM, 6, "", (a, port or 0)))
        return out

    return resolve


DNS = fake_dns(
    {
        "cdn.example.com": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
        "cdn.example.com.": ["93.184.216.34"],
        "rebind.example.com": ["93.184.216.34", "10.1.2.3"],
        "internal.example.com": ["192.168.1.20"],
        "minio.local": ["10.5.0.7"],
        "api.sandbox.test": ["172.20.0.2"],
        "mapped.example.com": ["::ffff:169.254.169.254"],
    }
)


def refused(url: str, policy: UrlPolicy = PUBLIC, resolve=socket.getaddrinfo) -> str:
    with pytest.raises(ResultRefused) as info:
        check_url(url, policy, resolve)
    return str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example.com/v/1.mp4?X-Amz-Signature=abc",
        "http://cdn.example.com:8080/v.mp4",
        "HTTPS://CDN.EXAMPLE.COM/v.mp4",
        "https://cdn.example.com./v.mp4",
    ],
)
def test_public_url_is_allowed(url):
    check_url(url, PUBLIC, DNS)


def test_public_literal_ips_are_allowed():
    check_url("https://93.184.216.34/v.mp4", PUBLIC)
    check_url("https://[2606:2800:220:1:248:1893:25c8:1946]/v.mp4", PUBLIC)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/v.mp4",
        "http://127.8.9.10:6379/",
        "http://localhost/v.mp4",
        "http://LOCALHOST:8900/v.mp4",
        "http://[::1]/v.mp4",
        "http://10.0.0.1/",
        "http://172.16.0.1/",
        "http://172.31.255.254/",
        "http://192.168.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.1.1/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::ffff:7f00:1]/",
        "http://[2002:7f00:1::]/",  # 6to4 wrapping 127.0.0.1
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 wrapping 169.254.169.254
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://0.0.0.0/",
        "http://[::]/",
        "http://100.64.0.1/",
        "http://100.127.255.254/",
        "http://224.0.0.1/",
        "http://224.0.1.1/",
        "http://[ff02::1]/",
        "http://240.0.0.1/",
        "http://255.255.255.255/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://0x7f000001/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://127.0.0.1./",
        "http://0/",
    ],
)
def test_non_public_addresses_are_refused(url):
    assert "non-public" in refused(url)


@pytest.mark.parametrize(
    "host", ["internal.example.com", "rebind.example.com", "mapped.example.com"]
)
def test_names_resolving_to_non_public_addresses_are_refused(host):
    msg = refused(f"https://{host}/v.mp4", resolve=DNS)
    assert host in msg and "non-public" in msg


def test_any_non_public_answer_refuses_mixed_dns():
    msg = refused("https://rebind.example.com/v.mp4", resolve=DNS)
    assert "10.1.2.3" in msg


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://cdn.example.com/v.mp4",
        "gopher://127.0.0.1:6379/_INFO",
        "data:video/mp4;base64,AAAA",
        "cdn.example.com/v.mp4",
        "//cdn.example.com/v.mp4",
        "javascript:alert(1)",
    ],
)
def test_bad_schemes_are_refused(url):
    assert "scheme" in refused(url, resolve=DNS)


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pass@cdn.example.com/v.mp4",
        "http://user@cdn.example.com/v.mp4",
        "http://cdn.example.com@127.0.0.1/",
        "http://@cdn.example.com/",
    ],
)
def test_userinfo_is_refused(url):
    msg = refused(url, resolve=DNS)
    assert "credentials" in msg and "pass" not in msg


@pytest.mark.parametrize(
    "url",
    [
        "http:///v.mp4",
        "http://:80/v.mp4",
        "http://cdn.example.com:99999/",
        "http://[::1/",
        "http://cdn.example.com\\@127.0.0.1/",
        "http://cdn.example.com/\nHost: 127.0.0.1",
    ],
)
def test_malformed_urls_are_refused(url):
    refused(url, resolve=DNS)


def test_unresolvable_host_is_transient():
    with pytest.raises(UpstreamUnavailable, match="cannot resolve"):
        check_url("https://nowhere.example.com/v.mp4?token=s3cret", PUBLIC, DNS)
    try:
        check_url("https://nowhere.example.com/v.mp4?token=s3cret", PUBLIC, DNS)
    except UpstreamUnavailable as exc:
        assert "s3cret" not in str(exc)


def test_base_url_host_is_allowed():
    policy = UrlPolicy.build("http://127.0.0.1:8900")
    assert ipaddress.ip_network("127.0.0.1/32") in policy.allowed_networks
    check_url("http://127.0.0.1:8900/files/1.mp4?sig=x", policy)
    check_url("http://127.0.0.1:9999/other", policy)
    check_url("http://2130706433:8900/files/1.mp4", policy)  # same address, other spelling
    refused("http://127.0.0.2:8900/", policy)  # only that exact address
    refused("http://10.0.0.1/", policy)
    refused("http://169.254.169.254/", policy)
    check_url("https://cdn.example.com/v.mp4", policy, DNS)  # public still fine


def test_base_url_name_and_its_private_addresses_are_allowed():
    policy = UrlPolicy.build("http://api.sandbox.test:8900/v2", resolve=DNS)
    assert "api.sandbox.test" in policy.allowed_hosts
    assert policy.allowed_networks == (ipaddress.ip_network("172.20.0.2/32"),)
    check_url("http://API.Sandbox.Test./x.mp4", policy, DNS)
    check_url("http://172.20.0.2/x.mp4", policy)
    refused("http://172.20.0.3/x.mp4", policy)


def test_public_base_url_adds_no_networks_and_survives_dns_failure():
    assert UrlPolicy.build("https://cdn.example.com", resolve=DNS).allowed_networks == ()
    policy = UrlPolicy.build("https://nowhere.example.com", resolve=DNS)
    assert policy.allowed_hosts == frozenset({"nowhere.example.com"})


def test_ipv6_base_url():
    policy = UrlPolicy.build("http://[::1]:8900")
    check_url("http://[::1]:8900/v.mp4", policy)
    refused("http://127.0.0.1:8900/v.mp4", policy)


def test_allowlist_by_name():
    policy = UrlPolicy.build("https://api.example.com", "MinIO.local., other.test")
    assert {"minio.local", "other.test"} <= policy.allowed_hosts
    check_url("http://minio.local:9000/bucket/v.mp4", policy, DNS)
    refused("http://internal.example.com/v.mp4", policy, DNS)


def test_allowlist_by_cidr_and_address():
    policy = UrlPolicy.build("https://api.example.com", " 10.0.0.0/8 , 192.168.1.20,fd00::/8")
    check_url("http://10.200.3.4/v.mp4", policy)
    check_url("http://internal.example.com/v.mp4", policy, DNS)
    check_url("http://[fd12::1]/v.mp4", policy)
    refused("http://192.168.1.21/v.mp4", policy)
    refused("http://127.0.0.1/v.mp4", policy)
    assert "scheme" in refused("gopher://10.0.0.1/", policy)  # allowlist never relaxes scheme
    assert "credentials" in refused("http://u:p@10.0.0.1/", policy)


def test_bad_allowlist_entry_is_a_config_error():
    with pytest.raises(ConfigError):
        UrlPolicy.build("https://api.example.com", "10.0.0.0/33")


def test_error_message_never_shows_query_or_credentials():
    msg = refused("http://169.254.169.254/latest/meta-data/?X-Amz-Signature=s3cret#frag")
    assert "http://169.254.169.254/latest/meta-data/" in msg
    assert "s3cret" not in msg and "frag" not in msg
    msg = refused("ftp://bob:hunter2@cdn.example.com/v.mp4?token=s3cret")
    assert "hunter2" not in msg and "s3cret" not in msg


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://cdn.example.com/v/1.mp4?X-Amz-Signature=abc&t=1#x", "https://cdn.example.com/v/1.mp4"),
        ("https://u:p@cdn.example.com:8443/v.mp4?t=1", "https://cdn.example.com:8443/v.mp4"),
        ("http://[::1]:8900/a?b", "http://[::1]:8900/a"),
        ("data:video/mp4;base64,AAAA", "data:video/mp4;base64,AAAA"),
        ("http://[::1/x?tok", "<unparseable URL>"),
    ],
)
def test_redacted(url, shown):
    assert redacted(url) == shown


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:pw@h:6379/0", "redis://h:6379/0"),
        ("redis://h:6379/0?password=s3cret", "redis://h:6379/0"),
        ("s3://bucket/p?secret=s3cret#frag", "s3://bucket/p"),
        ("redis://:s3/cr#et@h:6379/0", "redis://..."),  # '@' after a '#': whose is it?
        ("redis://h:6379/0?password=s3c@ret", "redis://..."),
        ("notaurl", "<not a URL>"),
    ],
)
def test_without_credentials(url, shown):
    """A configured URL in a message: no userinfo, query or fragment, nor any tail of them."""
    assert without_credentials(url) == shown


def test_check_size():
    policy = UrlPolicy(max_bytes=1000)
    check_size(0, policy)
    check_size(1000, policy)
    with pytest.raises(ResultRefused, match="1001"):
        check_size(1001, policy)
    check_size(2 * 1024**3, UrlPolicy())
    with pytest.raises(ResultRefused):
        check_size(2 * 1024**3 + 1, UrlPolicy())
    assert UrlPolicy.build("http://127.0.0.1", max_bytes=5).max_bytes == 5
