"""A private Dovecot instance as the reference server (benchmarks/README.md).

Own config (``dovecot -F -c CONF``), own ``base_dir``/``state_dir`` under a temp dir, loopback
ports only, Dovecot's default one-process-per-session (high-security login) mode, no auth cache.
It never reads /etc/dovecot nor touches a system instance: everything it writes is under its work
dir or the dataset's own index directory. Run as root, the mail processes use the data's owner
(``nobody``), the internal and login processes Debian's ``dovecot``/``dovenull`` users.

    python benchmarks/dovecot.py --quick   # start one on the quick dataset and run a POP3 check
"""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

import seed
from servers import HOST, Server

BINARY = shutil.which("dovecot") or "/usr/sbin/dovecot"

#: Lifted only for the scenarios that hold thousands of connections (listed in the report):
#: Dovecot's defaults cap a service at 100 processes (1024 for pop3) and 1000 clients.
MANY_CONNECTIONS = """
default_process_limit = {n}
default_client_limit = {c}
service pop3 {{
  process_limit = {n}
}}
service pop3-login {{
  process_limit = {n}
}}
"""


def many_connections(n: int) -> str:
    return MANY_CONNECTIONS.format(n=n + 100, c=2 * n + 1000)


class Dovecot(Server):
    name = "dovecot"

    def __init__(self, workroot: Path, dataset: seed.Dataset, cert: Path, key: Path,
                 variant: str = "full", extra: str = "") -> None:
        super().__init__(workroot)
        self.dataset = dataset
        self.variant = variant
        self.cert, self.key = cert, key
        self.extra = extra
        self.conf = self.dir / "dovecot.conf"

    def _users(self) -> tuple[str, str, int, int]:
        """(internal user, login user, mail uid, mail gid) that work for whoever runs this."""
        if os.geteuid() == 0:
            mail = pwd.getpwnam(seed.MAIL_USER)
            try:
                pwd.getpwnam("dovecot")
                pwd.getpwnam("dovenull")
                internal, login = "dovecot", "dovenull"
            except KeyError:
                internal = login = seed.MAIL_USER
            return internal, login, mail.pw_uid, mail.pw_gid
        me = pwd.getpwuid(os.geteuid())
        return me.pw_name, me.pw_name, me.pw_uid, me.pw_gid

    def config_text(self) -> str:
        internal, login, uid, gid = self._users()
        index = self.dataset.dovecot_index(self.variant)
        passwd = self.dataset.passwd(self.variant)
        return f"""# written by pop3sf benchmarks/dovecot.py; a private instance
base_dir = {self.dir}/run
state_dir = {self.dir}/state
instance_name = pop3sf-bench-{self.ports['pop3']}
protocols = pop3
listen = {HOST}
log_path = {self.dir}/dovecot.log
ssl = yes
ssl_cert = <{self.cert}
ssl_key = <{self.key}
auth_cache_size = 0
auth_mechanisms = plain login
default_internal_user = {internal}
default_login_user = {login}
first_valid_uid = {min(uid, 500)}
first_valid_gid = {min(gid, 1)}
mail_location = maildir:~/Maildir:INDEX={index}/%u:CONTROL={index}/%u
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = passwd-file
  args = {passwd}
  default_fields = uid={uid} gid={gid}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {HOST}
    port = {self.ports['pop3']}
  }}
  inet_listener pop3s {{
    address = {HOST}
    port = {self.ports['pop3s']}
    ssl = yes
  }}
}}
{self.extra}
"""

    def prepare(self) -> list[str]:
        for sub in ("run", "state"):
            (self.dir / sub).mkdir(exist_ok=True)
        self.conf.write_text(self.config_text())
        return [BINARY, "-F", "-c", str(self.conf)]

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    def log_tail(self, n: int = 30) -> str:
        out = super().log_tail(n)
        try:
            lines = (self.dir / "dovecot.log").read_text(errors="replace").splitlines()
            out += "\n" + "\n".join(lines[-n:])
        except OSError:
            pass
        return out


def main() -> int:
    import argparse
    import poplib
    import tempfile

    from servers import make_cert

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    ds = seed.seed(seed.QUICK if args.quick else seed.FULL)
    work = Path(tempfile.mkdtemp(prefix="pop3sf-bench-"))
    os.chmod(work, 0o755)
    cert, key = make_cert(work)
    srv = Dovecot(work, ds, cert, key)
    with srv:
        print("startup", srv.startup)
        user = ds.groups["session"][0]
        p = poplib.POP3(HOST, srv.ports["pop3"])
        p.user(user)
        p.pass_(seed.password(user))
        print(p.stat(), p.uidl()[1][:3])
        p.quit()
    srv.cleanup()
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
