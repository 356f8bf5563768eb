"""The ``pop3sf`` command: check the config, bind, (daemonize,) drop privileges, serve.

The order matters: listeners are bound (or inherited from systemd) while still privileged,
python-daemon detaches *before* logging and worker threads exist (a fork keeps no threads, and a
journald socket opened earlier would end up as a client's fd), then privileges are dropped and
the server starts.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import ConfigError, Settings, load_config
from .listeners import ListeningSocket, open_listeners
from .logs import setup_logging
from .server import Server
from .tls import make_context

DEFAULT_CONFIG = "/etc/pop3sf.conf"
log = logging.getLogger("pop3sf")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pop3sf", description="POP3 server framework daemon.")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help="config file "
                   f"(default {DEFAULT_CONFIG})")
    p.add_argument("--check-config", action="store_true",
                   help="validate the config (and certificates, adapter) and exit 0 or 78")
    p.add_argument("--daemon", action="store_true", help="detach (python-daemon, pidfile)")
    p.add_argument("--version", action="version", version=f"pop3sf {__version__}")
    return p


def _fail(message: str) -> int:
    print(f"pop3sf: error: {message}", file=sys.stderr)
    return 1


def check(settings: Settings) -> None:
    """Everything start-up would check, without binding: certificates and the adapter config."""
    make_context(settings.tls, settings.source)
    try:
        settings.adapter_class(settings.adapter_config).check()
    except Exception as exc:
        raise ConfigError(f"{settings.source}: [adapter] ({settings.adapter_type}): {exc}") \
            from None


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each worker thread its own malloc arena and keeps freed chunk buffers in
    each; two arenas keep the server's footprint flat while it streams big messages."""
    try:
        ctypes.CDLL(None).mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_config(args.config)
        check(settings)
    except ConfigError as exc:
        _fail(str(exc))
        return os.EX_CONFIG     # 78: systemd's RestartPreventExitStatus= stops a restart loop
    if args.check_config:
        print(f"pop3sf: {args.config}: configuration OK")
        return 0
    if args.daemon:
        from . import daemon

        try:
            daemon.refuse_daemon_under_systemd()
            # before binding: "already running as pid N" beats EADDRINUSE
            daemon.check_pidfile(settings.server.pidfile, settings.server.user)
        except daemon.DaemonError as exc:
            return _fail(str(exc))
    inherited = None
    if os.environ.get("LISTEN_FDS"):
        from . import systemd

        inherited = systemd.listen_fds()
    try:
        listeners = open_listeners(settings.listeners, inherited)
    except ConfigError as exc:
        return _fail(str(exc))
    for ls in listeners:
        print(f"pop3sf: listening on {ls.describe()}", file=sys.stderr, flush=True)
    if args.daemon:
        from . import daemon

        try:
            context = daemon.daemonize(settings.server.pidfile,
                                       [ls.sock.fileno() for ls in listeners],
                                       pidfile_owner=settings.server.user)
        except daemon.DaemonError as exc:
            return _fail(str(exc))
        with context:
            return _serve(settings, listeners, args.config, daemonized=True)
    return _serve(settings, listeners, args.config)


def _serve(settings: Settings, listeners: list[ListeningSocket], path: str,
           daemonized: bool = False) -> int:
    limit_malloc_arenas()
    logs = setup_logging(settings.logging.target, settings.logging.level,
                         settings.logging.queue_size, daemonized)
    try:
        if os.geteuid() == 0 and settings.server.user:
            from . import control, daemon

            control.prepare_directory(settings.server.control_socket, settings.server.user,
                                      settings.server.group)
            try:
                daemon.drop_privileges(settings.server.user, settings.server.group or None)
            except daemon.DaemonError as exc:
                log.error("cannot start: %s", exc)
                return 1
        try:
            server = Server(settings)
            server.start(listeners)
        except ConfigError as exc:
            log.error("%s", exc)
            return os.EX_CONFIG
        except Exception as exc:
            log.error("cannot start: %s", exc)
            return 1
        server.on_tick.append(logs.handler.report_drops)
        _install_signals(server, path)
        notify = _systemd_notifier(server)
        log.info("pop3sf %s started (%s adapter, %d listeners)", __version__,
                 settings.adapter_type, len(listeners))
        notify("READY=1\nSTATUS=" + server.status())
        server.serve_forever()
        notify("STOPPING=1")
        log.info("pop3sf stopped")
        return 0
    finally:
        logs.stop()


def _install_signals(server: Server, path: str) -> None:
    def reload() -> None:
        notify = _systemd_notifier(server, ticks=False)
        notify("RELOADING=1")
        try:
            server.reload(load_config(path))
        except ConfigError as exc:
            log.error("reload failed, old configuration kept: %s", exc)
        notify("READY=1\nSTATUS=" + server.status())

    server.loop.add_signal_handler(signal.SIGTERM, server.shutdown)
    server.loop.add_signal_handler(signal.SIGINT, server.shutdown)
    server.loop.add_signal_handler(signal.SIGHUP, reload)


def _systemd_notifier(server: Server, ticks: bool = True) -> Callable[[str], None]:
    """sd_notify when systemd asked for it; STATUS once a second and watchdog pings."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return lambda _state: None
    from . import systemd

    if ticks:
        interval = systemd.watchdog_interval()
        last = {"status": ""}

        def tick() -> None:
            status = server.status()
            state = "WATCHDOG=1" if interval else ""
            if status != last["status"]:
                last["status"] = status
                state += ("\n" if state else "") + "STATUS=" + status
            if state:
                systemd.notify(state)

        server.on_tick.append(tick)
    return systemd.notify


if __name__ == "__main__":
    sys.exit(main())
