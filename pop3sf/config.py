"""Reading and validating /etc/pop3sf.conf (configobj + the configspec shipped in the package).

Every problem is reported as one :class:`ConfigError` naming the file, section, key and what is
allowed, so the server never starts half-configured.
"""

from __future__ import annotations

import grp
import ipaddress
import logging
import os
import pwd
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from configobj import ConfigObj, ConfigObjError, flatten_errors, get_extra_values
from validate import Validator

from pop3sf.adapters import Adapter, load_adapter_class
from pop3sf.adapters.base import ConfigError, validate_options

__all__ = ["ConfigError", "Settings", "load_config", "settings_from", "settings_from_dict"]

log = logging.getLogger("pop3sf.config")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ServerSection(NamedTuple):
    user: str
    group: str
    pidfile: str
    shutdown_grace: float
    control_socket: str
    #: Serving processes (``auto``: one per core); 1 = no supervising parent (pop3sf.fleet).
    processes: int = 1


class MetricsSection(NamedTuple):
    #: (host, port) of the OpenMetrics endpoint, or None (off).
    listen: tuple[str, int] | None = None


NO_METRICS = MetricsSection()


class LoggingSection(NamedTuple):
    target: str
    level: str
    queue_size: int
    file: str


class Listener(NamedTuple):
    """One ``[listeners]`` subsection. With ``proxy_protocol`` other than ``no`` every
    connection must come from ``trusted_proxies`` and start with a PROXY header naming the
    client (docs/deployment.md); ``proxy_tls_trusted`` lets the header's SSL TLV count as TLS."""

    name: str
    addresses: tuple[tuple[str, int], ...]
    tls: bool
    proxy_protocol: str = "no"
    trusted_proxies: tuple[Network, ...] = ()
    proxy_tls_trusted: bool = False


class TLSSection(NamedTuple):
    certificate: str
    private_key: str
    ciphers: str


class ProtocolSection(NamedTuple):
    implementation_version: bool
    non_utf8_clients: str
    max_line_length: int
    max_auth_line_length: int
    output_backlog: int


class AuthSection(NamedTuple):
    plaintext_auth_networks: tuple[Network, ...]
    penalty_initial: float
    penalty_max: float
    penalty_decay: float
    penalty_table_size: int
    max_auth_in_flight: int
    max_auth_in_flight_per_address: int


class LimitsSection(NamedTuple):
    max_connections: int
    max_connections_per_address: int
    max_sessions_per_user: int
    max_bad_commands: int
    max_messages: int
    authorization_timeout: float
    tls_handshake_timeout: float
    idle_timeout: float
    send_stall_timeout: float
    tcp_keepalive: bool
    proxy_header_timeout: float


class WorkersSection(NamedTuple):
    auth_threads: int
    mailbox_threads: int
    call_timeout: float
    max_stuck_calls: int


# The sections are named tuples, cheaper to define than dataclasses (start-up runs every
# definition); Settings stays a dataclass for its cached adapter lookup.
@dataclass(frozen=True)
class Settings:
    source: str
    server: ServerSection
    logging: LoggingSection
    listeners: tuple[Listener, ...]
    tls: TLSSection
    protocol: ProtocolSection
    auth: AuthSection
    limits: LimitsSection
    workers: WorkersSection
    adapter_type: str
    adapter_keys: dict[str, Any] = field(repr=False)
    raw: ConfigObj = field(repr=False, compare=False)
    metrics: MetricsSection = NO_METRICS

    @property
    def service_user(self) -> str:
        return self.server.user

    # The adapter's module is imported, and its keys validated, on first use: a server started
    # as root does that only after dropping privileges.
    @cached_property
    def _adapter(self) -> tuple[type[Adapter], dict[str, Any]]:
        return resolve_adapter(self.adapter_type, self.adapter_keys, self.source)

    @property
    def adapter_class(self) -> type[Adapter]:
        return self._adapter[0]

    @property
    def adapter_config(self) -> dict[str, Any]:
        return self._adapter[1]


def _spec(text: str) -> ConfigObj:
    return ConfigObj(text.splitlines(), list_values=False, _inspec=True)


def _validate(cfg: ConfigObj, source: str) -> None:
    """Validate in place; raise ConfigError for the first bad, missing or unknown key."""
    result = cfg.validate(Validator(), preserve_errors=True, copy=True)
    if result is not True:
        for sections, key, error in flatten_errors(cfg, result):
            where = "[" + "][".join(sections) + "]" if sections else "top level"
            if key is None:
                raise ConfigError(f"{source}: section {where} is missing")
            spec = cfg.configspec
            for s in sections:
                spec = spec.get(s, spec.get("__many__", {}))
            allowed = spec.get(key, "?") if hasattr(spec, "get") else "?"
            problem = "is missing" if error is False else f"is invalid: {error}"
            raise ConfigError(f"{source}: {where} {key} {problem} (allowed: {allowed})")
    extra = get_extra_values(cfg)
    if extra:
        sections, name = extra[0]
        where = "[" + "][".join(sections) + "]" if sections else "top level"
        raise ConfigError(f"{source}: {where} has an unknown key or section {name!r}")


def parse_address(text: str, source: str, listener: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``*:port`` (all IPv6 and IPv4 addresses)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{source}: [listeners][{listener}] addresses: {text!r} is not "
                          "HOST:PORT (e.g. 0.0.0.0:110 or [::]:995)")
    host = host.strip("[]")
    if host == "*":
        host = "::"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{source}: [listeners][{listener}] addresses: {host!r} is not an "
                          "IP address") from None
    return host, int(port)


def parse_networks(texts: list[str], source: str, where: str) -> tuple[Network, ...]:
    """Addresses and CIDR networks (``127.0.0.0/8``, ``::1``): one bad entry is an error."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{source}: {where}: {text!r} is not an address or network "
                              "(e.g. 192.0.2.10, 127.0.0.0/8, ::1/128)") from None
    return tuple(networks)


def _listener(name: str, sec: Mapping[str, Any], source: str) -> Listener:
    where = f"[listeners][{name}]"
    trusted = parse_networks([t for t in sec["trusted_proxies"] if t.strip()], source,
                             f"{where} trusted_proxies")
    mode = sec["proxy_protocol"]
    if mode != "no" and not trusted:
        raise ConfigError(f"{source}: {where} proxy_protocol = {mode} needs trusted_proxies: "
                          "the addresses of the load balancers allowed to name clients")
    if mode == "no" and (trusted or sec["proxy_tls_trusted"]):
        log.warning("%s: %s trusted_proxies and proxy_tls_trusted have no effect with "
                    "proxy_protocol = no", source, where)
    return Listener(name, tuple(parse_address(a, source, name) for a in sec["addresses"]),
                    sec["tls"], mode, trusted, sec["proxy_tls_trusted"])


def load_config(path: str, resolve: bool = True) -> Settings:
    """Read and validate a config file; with *resolve* false, the adapter is left for later
    (its module not imported, its keys not validated)."""
    try:
        cfg = ConfigObj(path, file_error=True, encoding="utf-8", interpolation=False)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ConfigObjError as exc:
        raise ConfigError(f"{path}: syntax error: {exc}") from None
    return settings_from(cfg, path, resolve)


def settings_from_dict(data: Mapping[str, Any], source: str = "<config>") -> Settings:
    """Validate settings given as nested dicts (tests, embedding)."""
    return settings_from(ConfigObj(dict(data), interpolation=False), source)


def settings_from(cfg: ConfigObj, source: str, resolve: bool = True) -> Settings:
    with open(os.path.join(os.path.dirname(__file__), "configspec.ini"), encoding="utf-8") as f:
        cfg.configspec = _spec(f.read())
    adapter_section = cfg.get("adapter")
    adapter_keys = dict(adapter_section) if isinstance(adapter_section, Mapping) else None
    # Validate the server's sections with the adapter's keys set aside; they get their own spec.
    if adapter_keys is not None:
        cfg["adapter"] = {"type": adapter_keys.get("type", "")} if "type" in adapter_keys else {}
    _validate(cfg, source)
    if not cfg["listeners"]:
        raise ConfigError(f"{source}: [listeners] needs at least one [[name]] subsection")
    settings = _build(cfg, source, cfg["adapter"]["type"], adapter_keys or {})
    if resolve:
        settings.adapter_class  # noqa: B018 -- import and validate now
    return settings


def resolve_adapter(adapter_type: str, keys: Mapping[str, Any],
                    source: str) -> tuple[type[Adapter], dict[str, Any]]:
    """Import the adapter class and validate its ``[adapter]`` keys against its configspec."""
    try:
        adapter_class = load_adapter_class(adapter_type)
    except ConfigError as exc:
        raise ConfigError(f"{source}: [adapter] type: {exc}") from None
    rest = {k: v for k, v in keys.items() if k != "type"}
    try:
        options = validate_options(adapter_class.configspec, rest, allow_unknown=False)
    except ConfigError as exc:
        raise adapter_error(source, adapter_type, exc) from None
    return adapter_class, options


def adapter_error(source: str, adapter_type: str, exc: BaseException) -> ConfigError:
    """What an adapter said about its configuration, placed: file, section and adapter type
    in front of the adapter's own message (which names the key)."""
    return ConfigError(f"{source}: [adapter] ({adapter_type}): {exc}")


def _build(cfg: ConfigObj, source: str, adapter_type: str,
           adapter_keys: dict[str, Any]) -> Settings:
    listeners = tuple(_listener(name, sec, source) for name, sec in cfg["listeners"].items())
    tls = TLSSection(**cfg["tls"])
    if any(lst.tls for lst in listeners) and not (tls.certificate and tls.private_key):
        raise ConfigError(f"{source}: [tls] certificate and private_key are required by the "
                          "implicit-TLS listener(s)")
    if bool(tls.certificate) != bool(tls.private_key):
        raise ConfigError(f"{source}: [tls] certificate and private_key go together")
    logging_section = LoggingSection(**cfg["logging"])
    if logging_section.target == "file" and not os.path.isabs(logging_section.file):
        raise ConfigError(f"{source}: [logging] file must be an absolute path with "
                          f"target = file (got {logging_section.file!r})")
    auth = dict(cfg["auth"])
    networks = parse_networks(auth.pop("plaintext_auth_networks"), source,
                              "[auth] plaintext_auth_networks")
    protocol = ProtocolSection(**cfg["protocol"])
    if protocol.max_auth_line_length < protocol.max_line_length:
        raise ConfigError(f"{source}: [protocol] max_auth_line_length must be at least "
                          "max_line_length")
    limits = LimitsSection(**cfg["limits"])
    if limits.idle_timeout < 600:
        log.warning("%s: [limits] idle_timeout %s s is below RFC 1939's 10-minute autologout "
                    "floor", source, limits.idle_timeout)
    server_keys = dict(cfg["server"])
    server = ServerSection(processes=parse_processes(server_keys.pop("processes"), source),
                           **server_keys)
    listen = cfg["metrics"]["listen"].strip()
    try:
        metrics = MetricsSection(parse_address(listen, source, "") if listen else None)
    except ConfigError:
        raise ConfigError(f"{source}: [metrics] listen: {listen!r} is not IP:PORT (e.g. "
                          "127.0.0.1:9110)") from None
    if server.control_socket and not server.control_socket.startswith("/"):
        raise ConfigError(f"{source}: [server] control_socket must be an absolute path")
    return Settings(
        source=source,
        server=server,
        logging=logging_section,
        listeners=listeners,
        tls=tls,
        protocol=protocol,
        auth=AuthSection(plaintext_auth_networks=networks, **auth),
        limits=limits,
        workers=WorkersSection(**cfg["workers"]),
        adapter_type=adapter_type,
        adapter_keys=adapter_keys,
        raw=cfg,
        metrics=metrics,
    )


def parse_processes(text: str, source: str) -> int:
    """``auto`` (one per core) or a count from 1 to 256."""
    value = str(text).strip().lower()
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if value.isdigit() and 1 <= int(value) <= 256:
        return int(value)
    raise ConfigError(f"{source}: [server] processes is invalid: {text!r} (allowed: auto or "
                      "a number from 1 to 256)")


class ServiceAccount(NamedTuple):
    """``[server] user``/``group`` resolved: who the server runs as once it dropped root."""

    name: str
    uid: int
    gid: int


def lookup_account(user: str, group: str | None = None) -> tuple[pwd.struct_passwd, int]:
    """*user*'s passwd entry and the gid to run with (*group*'s, default the user's primary
    group). Raises LookupError naming the ``[server]`` key that is wrong."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise LookupError(f"[server] user: unknown user {user!r} (create it, e.g. "
                          f"'adduser --system --group {user}')") from None
    if not group:
        return entry, entry.pw_gid
    try:
        return entry, grp.getgrnam(group).gr_gid
    except KeyError:
        raise LookupError(f"[server] group: unknown group {group!r}") from None


def service_account(settings: Settings) -> ServiceAccount | None:
    """The configured service user and group, or None when ``user`` is empty; an unknown user
    or group is a :class:`ConfigError` (the server could never start)."""
    if not settings.server.user:
        return None
    try:
        entry, gid = lookup_account(settings.server.user, settings.server.group)
    except LookupError as exc:
        raise ConfigError(f"{settings.source}: {exc.args[0]}") from None
    return ServiceAccount(entry.pw_name, entry.pw_uid, gid)


SECRET_WORDS = ("password", "secret", "passphrase")


def inline_secrets(settings: Settings) -> list[str]:
    """``[section] key`` of every non-empty key named like a secret (not a ``*_file`` path)."""
    def walk(section: Mapping[str, Any], where: str) -> Iterator[str]:
        for key, value in section.items():
            if isinstance(value, Mapping):
                yield from walk(value, f"{where}[{key}]")
            elif (value and any(w in key.lower() for w in SECRET_WORDS)
                  and not key.endswith("_file")):
                yield f"{where} {key}"
    raw = {k: v for k, v in settings.raw.items() if k != "adapter"}
    return [*walk(raw, ""), *walk(settings.adapter_keys, "[adapter]")]


def readable_secrets(settings: Settings, account: ServiceAccount | None) -> str | None:
    """A warning when the config file holds a secret others can read, else None.

    Readable by the service's own group is expected (it reads the file itself under systemd);
    by anyone else, or by everyone, is not.
    """
    secrets = inline_secrets(settings)
    if not secrets:
        return None
    try:
        st = os.stat(settings.source)
    except OSError:
        return None
    own = {0, account.gid if account else os.getegid()}
    if st.st_mode & stat.S_IROTH:
        who = "everyone"
    elif st.st_mode & stat.S_IRGRP and st.st_gid not in own:
        try:
            who = f"group {grp.getgrgid(st.st_gid).gr_name}"
        except KeyError:
            who = f"group {st.st_gid}"
    else:
        return None
    return (f"{settings.source} holds {', '.join(secrets)} and is readable by {who} "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): make it root:<service group> 0640, or move "
            "the secret to a password_file")
