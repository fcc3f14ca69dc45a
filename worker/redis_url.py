"""VIDQ_REDIS_URL: what both its clients, redis-py (job records) and kombu
(Celery's broker), can read, and the Sentinel form (`sentinel://h:p;...`
with `master_name`), as each of them takes it."""
from __future__ import annotations

from urllib.parse import parse_qs, parse_qsl, quote, urlencode, urlsplit, urlunsplit

from .errors import ConfigError
from .netguard import without_credentials

REDIS_SCHEMES = ("redis", "rediss", "sentinel")
USERINFO_FORM = ("redis://:PASSWORD@host:port/0 (redis://USER:PASSWORD@... with a user; "
                 "percent-encode '/', '#', '?', '@', ';', '[' and ']' in it)")


def check_redis_url(url: str) -> None:
    """ConfigError unless each ;-separated part of VIDQ_REDIS_URL reads the same
    to both its clients: redis-py (job records) and kombu (Celery's broker).
    One only redis-py reads (`?password=`, `?db=`, `unix://`) let `vidq enqueue`
    write a batch's jobs and take their slots, then fail sending their tasks."""
    for index, part in enumerate(url.split(";")):
        scheme = part.strip().partition("://")[0].lower()
        if scheme == "unix":
            raise ConfigError("VIDQ_REDIS_URL: unix sockets are not supported (Celery's broker, "
                              "kombu, has no unix:// transport); have Redis listen on TCP and "
                              f"use {USERINFO_FORM}")
        if not part.strip() and index:
            raise ConfigError("VIDQ_REDIS_URL: nothing after a ';' (one at the end?): "
                              "remove it")
        if scheme not in REDIS_SCHEMES and index:
            raise ConfigError("VIDQ_REDIS_URL: a ';' separates Sentinel addresses "
                              "(sentinel://h1:p;sentinel://h2:p); one in a password must be "
                              "percent-encoded, %3B")
        if scheme not in REDIS_SCHEMES:
            raise ConfigError(f"VIDQ_REDIS_URL={without_credentials(part)!r} is not a Redis "
                              "URL: use redis://[:password@]host:port/db, rediss:// (TLS) or "
                              "sentinel://host:port;...")
        _check_redis_query(part)
    for part in url.split(";"):
        try:
            _ = urlsplit(part.strip()).port
        except ValueError as exc:
            # kombu reads the host:port the same way and stops every worker
            # with a traceback about a "port" (review 142).
            why = ("its port is out of range (1-65535)" if "out of range" in str(exc) else
                   "no host:port where one must be: a '/', '#', '?', '[' or ']' in the "
                   "password ends or breaks the address there")
            raise ConfigError(f"VIDQ_REDIS_URL: {why}; {USERINFO_FORM}") from None


def _check_redis_query(part: str) -> None:
    """Only `ssl_*` options (and the sentinel's master_name, vidq's own) may be
    in the query: kombu takes any other name for a keyword of its own and fails
    (`?password=` twice over). No name is shown: with an unencoded '?' in a
    password, what urlsplit calls the query is the password's tail."""
    try:
        names = {name for name, _ in parse_qsl(urlsplit(part.strip()).query,
                                               keep_blank_values=True)}
    except ValueError:
        return  # malformed: connect() says so, naming no piece of it
    if names & {"password", "username"}:
        raise ConfigError(f"VIDQ_REDIS_URL: put the password in the URL's userinfo, "
                          f"{USERINFO_FORM}, not in ?password=: Celery's broker cannot read "
                          "it from the query")
    if "db" in names:
        raise ConfigError("VIDQ_REDIS_URL: put the db in the path, redis://host:port/DB, not in "
                          "?db=: Celery's broker cannot read it from the query")
    if any(name.startswith("ssl_") for name in names) \
            and not part.strip().lower().startswith("rediss://"):
        # On sentinel:// redis-py drops them and kombu applies them: job records
        # in plaintext, and a broker that cannot connect (review 96).
        raise ConfigError("VIDQ_REDIS_URL: ssl_* options need TLS: use rediss://, not "
                          "redis:// or sentinel://")
    if any(name != "master_name" and not name.startswith("ssl_") for name in names):
        raise ConfigError("VIDQ_REDIS_URL: its query may hold only ssl_* options (Celery's "
                          f"broker refuses any other); a password goes in the userinfo, "
                          f"{USERINFO_FORM}")


def broker_tls_verified(url: str) -> str:
    """`url` for kombu: a rediss:// URL that does not say `ssl_cert_reqs`
    gets `required`. kombu's own default is none (it logs "insecure SSL"):
    the broker's connection, carrying the password and every task, took any
    certificate, while redis-py, reading the same URL, checked it (review 142)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "rediss" or "ssl_cert_reqs" in parse_qs(parts.query):
        return url
    query = "&".join(filter(None, [parts.query, "ssl_cert_reqs=required"]))
    return urlunsplit(parts._replace(query=query))


def is_sentinel_url(url: str) -> bool:
    return url.strip().lower().startswith("sentinel://")


def sentinel_url(url: str, master: str) -> str:
    """`url` with the sentinel master's name in it (`?master_name=`); checks that
    a sentinel URL has one and that a master name comes with a sentinel URL."""
    url = url.strip()
    if not is_sentinel_url(url):
        if master.strip():
            raise ConfigError("VIDQ_REDIS_SENTINEL_MASTER is set but VIDQ_REDIS_URL is not "
                              "sentinel://host:port;sentinel://host:port;...")
        return url
    parts = [part.strip() for part in url.split(";") if part.strip()]
    for part in parts:
        if not is_sentinel_url(part):
            shown = without_credentials(part)
            raise ConfigError(f"VIDQ_REDIS_URL: {shown!r} is not sentinel://host:port "
                              "(every ;-separated part must be a sentinel)")
    named = sentinel_master_of(url)
    master = master.strip()
    if named and master and named != master:
        raise ConfigError(f"VIDQ_REDIS_SENTINEL_MASTER={master!r} but VIDQ_REDIS_URL names "
                          f"master_name={named!r}")
    if not (named or master):
        raise ConfigError("VIDQ_REDIS_URL is a sentinel URL: set VIDQ_REDIS_SENTINEL_MASTER "
                          "to the master name the sentinels monitor (e.g. mymaster)")
    if named:
        return ";".join(parts)
    last = parts[-1]
    parts[-1] = last + ("&" if "?" in last else "?") + "master_name=" + quote(master, safe="")
    return ";".join(parts)


def sentinel_master_of(url: str) -> str:
    for part in url.split(";"):
        found = parse_qs(urlsplit(part.strip()).query).get("master_name")
        if found and found[0]:
            return found[0]
    return ""


def without_master_name(url: str) -> str:
    """The sentinel URL as kombu takes it: `master_name` goes in transport options."""
    parts = []
    for part in url.split(";"):
        split = urlsplit(part.strip())
        query = urlencode([(k, v) for k, v in parse_qsl(split.query) if k != "master_name"])
        parts.append(urlunsplit(split._replace(query=query)))
    return ";".join(parts)
