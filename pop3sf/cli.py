"""The ``pop3sf`` command: check the config, bind, (daemonize,) drop privileges, serve.

The order matters: listeners are bound (or inherited from systemd) while still privileged,
python-daemon detaches *before* logging and worker threads exist (a fork keeps no threads, and a
journald socket opened earlier would end up as a client's fd), then privileges are dropped and
only then is the adapter imported and built: starting is its check. ``--check-config``, and
``--daemon`` before it detaches, check the adapter and the certificates as the service user
beforehand: in a child process that dropped root first (:func:`check_as_service`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import __version__, logs
from .config import (
    ConfigError,
    ServiceAccount,
    Settings,
    adapter_error,
    load_config,
    readable_secrets,
    service_account,
)
from .listeners import ListeningSocket, open_listeners

if TYPE_CHECKING:  # the server is imported once the sockets listen: they queue clients meanwhile
    from pop3sf.adapters import Adapter

    from .server import Server

DEFAULT_CONFIG = "/etc/pop3sf.conf"
#: sysexits.h EX_CONFIG: the configuration can't work; systemd does not restart on it.
EX_CONFIG = 78
#: sysexits.h EX_SOFTWARE: the check itself crashed.
EX_SOFTWARE = 70
log = logging.getLogger("pop3sf")


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=78)


def _parser() -> argparse.ArgumentParser:
    # A fixed width: finding the terminal's would import shutil (and bz2, lzma) at every start.
    p = argparse.ArgumentParser(prog="pop3sf", description="POP3 server framework daemon.",
                                formatter_class=_HelpFormatter)
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help="config file "
                   f"(default {DEFAULT_CONFIG})")
    p.add_argument("--check-config", action="store_true",
                   help="validate the config as the service user (certificates, adapter, data "
                        f"source) and exit 0, or {EX_CONFIG} naming the problem")
    p.add_argument("--no-connect", action="store_true",
                   help="with --check-config: do not connect to the data source (offline)")
    p.add_argument("--daemon", action="store_true", help="detach (python-daemon, pidfile)")
    p.add_argument("--version", action="version", version=f"pop3sf {__version__}")
    return p


def _fail(message: str, status: int = EX_CONFIG) -> int:
    log.error("%s", message)
    return status


def check(settings: Settings, connect: bool = False) -> None:
    """Everything start-up would check, without binding: certificates and the adapter config;
    with *connect*, reaching the data source too (:meth:`Adapter.probe`)."""
    from .tls import make_context

    make_context(settings.tls, settings.source)
    adapter_class = settings.adapter_class
    adapter = None
    try:
        adapter = adapter_class(settings.adapter_config)
        adapter.check()
        if connect:
            adapter.probe()
    except Exception as exc:  # whatever the adapter found wrong is a configuration error here
        raise adapter_error(settings.source, settings.adapter_type, exc) from None
    finally:
        if adapter is not None:
            try:
                adapter.close()
            except Exception:
                pass


def check_as_service(settings: Settings, account: ServiceAccount | None,
                     connect: bool = False) -> None:
    """:func:`check` with the service user's rights, so that a key or directory only root can
    read fails here and not in the running server. As root with a service user, the check runs
    in a child process that dropped root first; otherwise in this process."""
    if account is None or os.geteuid() != 0 or account.uid == 0:
        check(settings, connect)
        return
    from . import daemon

    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                                        # the child: never returns
        os.close(rfd)
        status, message = 0, ""
        try:
            daemon.drop_privileges(account.name, settings.server.group or None)
            check(settings, connect)
        except (ConfigError, daemon.PrivilegeError) as exc:
            status, message = EX_CONFIG, str(exc)
        except BaseException as exc:
            status, message = EX_SOFTWARE, f"checking as user {account.name} failed: " \
                f"{type(exc).__name__}: {exc}"
        with os.fdopen(wfd, "wb") as out:
            out.write(message.encode("utf-8", "replace"))
        os._exit(status)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        message = pipe.read().decode("utf-8", "replace")
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code != 0:
        raise ConfigError(message or f"checking as user {account.name} failed (status {code})")


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each worker thread its own malloc arena and keeps freed chunk buffers in
    each; two arenas keep the server's footprint flat while it streams big messages. The
    systemd unit sets MALLOC_ARENA_MAX, which glibc reads itself: no ctypes at start-up then."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.bootstrap()
    try:
        return _run(args)
    except Exception:
        logs.bootstrap()            # a crash, too, reaches the journal at its priority
        log.critical("pop3sf failed unexpectedly", exc_info=True)
        return EX_SOFTWARE
    finally:
        logs.end_bootstrap()


def _run(args: argparse.Namespace) -> int:
    detach = args.daemon and not args.check_config
    try:
        settings = load_config(args.config, resolve=False)
        account = service_account(settings)
        target = logs.resolve_target(settings.logging, detach, settings.source)
        if args.check_config or detach:
            # In the foreground, starting the server is this check (as the service user, after
            # binding): doing it twice would double the start-up's CPU.
            check_as_service(settings, account, connect=args.check_config and not args.no_connect)
    except ConfigError as exc:
        _fail(str(exc))
        return EX_CONFIG     # systemd's RestartPreventExitStatus= stops a restart loop
    if args.check_config:
        _warn_secrets(settings, account)
        if account is not None and os.geteuid() not in (0, account.uid):
            log.warning("checked with the rights of uid %d, not of the service user %s: run "
                        "the check as root or as %s", os.geteuid(), account.name, account.name)
        print(f"pop3sf: {args.config}: configuration OK")
        return 0
    if args.daemon:
        from . import daemon

        try:
            daemon.refuse_daemon_under_systemd()
            # before binding: "already running as pid N" beats EADDRINUSE
            daemon.check_pidfile(settings.server.pidfile, settings.server.user)
        except daemon.DaemonError as exc:
            return _fail(str(exc), 1)
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
            logs.end_bootstrap()
            context = daemon.daemonize(settings.server.pidfile,
                                       [ls.sock.fileno() for ls in listeners],
                                       pidfile_owner=settings.server.user)
        except daemon.DaemonError as exc:
            print(f"pop3sf: error: {exc}", file=sys.stderr)
            return 1
        with context:
            return _serve(settings, account, target, listeners, args.config)
    return _serve(settings, account, target, listeners, args.config)


def _warn_secrets(settings: Settings, account: ServiceAccount | None) -> None:
    warning = readable_secrets(settings, account)
    if warning:
        log.warning("%s", warning)


def _serve(settings: Settings, account: ServiceAccount | None, target: str,
           listeners: list[ListeningSocket], path: str) -> int:
    limit_malloc_arenas()
    if settings.server.processes > 1:
        return _supervise(settings, account, target, listeners, path)
    from .server import Server

    conf = settings.logging
    pipeline = logs.setup_logging(target, conf.level, conf.queue_size, conf.file)
    try:
        _warn_secrets(settings, account)
        status = _drop_privileges(settings, account)
        if status:
            return status
        server, status = _start_server(settings, listeners,
                                       lambda adapter: Server(settings, adapter))
        if server is None:
            return status
        server.on_tick.append(pipeline.handler.report_drops)
        exporter = None
        if settings.metrics.listen is not None:
            from . import metrics

            exporter = metrics.serve_for(server, settings.metrics.listen)
        _install_signals(server, path)
        notify = _systemd_notifier(server)
        log.info("pop3sf %s started (%s adapter, %s)", __version__,
                 settings.adapter_type, logs.counted(len(listeners), "listener"))
        notify("READY=1\nSTATUS=" + server.status())
        try:
            server.serve_forever()
        finally:
            if exporter is not None:
                exporter.close()
        notify("STOPPING=1")
        log.info("pop3sf stopped")
        return 0
    finally:
        pipeline.stop()


def _drop_privileges(settings: Settings, account: ServiceAccount | None) -> int:
    """As root: prepare the control socket's directory and become the service user; 0 or the
    exit status."""
    if os.geteuid() == 0 and account is not None:
        from . import control, daemon

        control.prepare_directory(settings.server.control_socket, account.uid, account.gid)
        try:
            daemon.drop_privileges(account.name, settings.server.group or None)
        except daemon.DaemonError as exc:
            log.error("cannot start: %s", exc)
            return EX_CONFIG
    return 0


def _start_server(settings: Settings, listeners: list[ListeningSocket],
                  make: Callable[[Adapter], Server]) -> tuple[Server | None, int]:
    """Build the adapter and the server (``make(adapter)``) and start it: (server, 0), or
    (None, exit status) with the reason logged. A :class:`ConfigError` of the adapter
    (building it, or its ``start``, the only source of one in :meth:`Server.start`) says it
    comes from ``[adapter]``."""
    try:
        try:
            adapter = settings.adapter_class(settings.adapter_config)
        except ConfigError as exc:
            raise adapter_error(settings.source, settings.adapter_type, exc) from None
        server = make(adapter)
        try:
            server.start(listeners)
        except ConfigError as exc:
            raise adapter_error(settings.source, settings.adapter_type, exc) from None
    except ConfigError as exc:
        log.error("%s", exc)
        return None, EX_CONFIG
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return None, 1
    return server, 0


def _supervise(settings: Settings, account: ServiceAccount | None, target: str,
               listeners: list[ListeningSocket], path: str) -> int:
    """``[server] processes = N``: this process supervises N serving children (pop3sf.fleet).

    The parent logs without a queue thread: it must stay thread-free to fork children at any
    time, and it serves no client a slow log write could delay.
    """
    from . import fleet, systemd
    from .child import ChildServer, child_settings
    from .shared import SharedState

    conf = settings.logging
    handler = logs.output_handler(target, conf.file)
    root = logging.getLogger()
    logs.end_bootstrap()
    root.addHandler(handler)
    root.setLevel(conf.level.upper())
    logs.replay_early()
    try:
        _warn_secrets(settings, account)
        status = _drop_privileges(settings, account)
        if status:
            return status

        def child_main(index: int, sock: socket.socket, shared: SharedState) -> int:
            pipeline = logs.setup_logging(target, conf.level, conf.queue_size, conf.file)
            try:
                own = child_settings(settings, index)
                server, status = _start_server(
                    own, listeners, lambda adapter: ChildServer(own, index, sock, shared, adapter))
                if server is None:
                    return status
                assert isinstance(server, ChildServer)
                server.on_tick.append(pipeline.handler.report_drops)
                server.loop.add_signal_handler(signal.SIGTERM, server.shutdown)
                server.loop.add_signal_handler(signal.SIGINT, server.shutdown)
                server.loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the parent's
                server.on_reload = lambda: server.reload_from(path)
                server.ready()
                server.serve_forever()
                return 0
            finally:
                pipeline.stop()

        notify: Callable[[str], None] = lambda _state: None  # noqa: E731
        watchdog = None
        if os.environ.get("NOTIFY_SOCKET"):
            notify, watchdog = systemd.notify, systemd.watchdog_interval()
        supervisor = fleet.Supervisor(settings, path, listeners, child_main, notify, watchdog)
        log.info("pop3sf %s starting %d processes (%s adapter, %s)", __version__,
                 settings.server.processes, settings.adapter_type,
                 logs.counted(len(listeners), "listener"))
        status = supervisor.run()
        log.info("pop3sf stopped")
        return status
    finally:
        root.removeHandler(handler)
        handler.close()


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
