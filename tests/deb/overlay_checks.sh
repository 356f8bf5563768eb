#!/bin/sh
# overlay_checks.sh DEB DIR - install the .deb where no systemd runs (a throw-away overlay,
# see ovl-run.sh) and check it; DIR holds pop_check.py. Run under with-journald.sh for the
# by-hand --daemon part. Prints "ok - NAME" or "FAIL - NAME" per check (details on stderr).
set -u
DEB=$1; DIR=$2
ok() { echo "ok - $1"; }
fail() { echo "FAIL - $1"; }
check() { name=$1; shift; if "$@" >&2; then ok "$name"; else fail "$name"; fi; }
out_empty() { name=$1; shift; out=$("$@" 2>&1); rc=$?
    if [ -z "$out" ] && [ $rc -eq 0 ]; then ok "$name"; else echo "$out" >&2; fail "$name"; fi; }

check "apt-get install ./pop3sf.deb" apt-get install -y --no-install-recommends "$DEB"
check "binary in /usr/sbin" test -x /usr/sbin/pop3sf -a ! -e /usr/bin/pop3sf
check "pop3sf-admin installed" test -x /usr/sbin/pop3sf-admin
check "entry point uses Debian's python3" sh -c 'head -1 /usr/sbin/pop3sf | grep -qx "#!/usr/bin/python3"'
check "package under Debian's python3" /usr/bin/python3 -c 'import pop3sf.cli, pop3sf.systemd, pop3sf.daemon, pop3sf.adapters.directory'
check "units installed" test -f /lib/systemd/system/pop3sf.service -a -f /lib/systemd/system/pop3sf.socket -a -f /lib/systemd/system/pop3sf-tls.socket
check "man pages installed" test -f /usr/share/man/man8/pop3sf.8.gz -a -f /usr/share/man/man5/pop3sf.conf.5.gz -a -f /usr/share/man/man8/pop3sf-admin.8.gz
check "man pages render without warnings" sh -c 'for p in pop3sf.8 pop3sf.conf.5 pop3sf-admin.8; do
    s=${p##*.}; out=$(MANWIDTH=80 man --warnings -l /usr/share/man/man$s/$p.gz 2>&1 >/dev/null)
    [ -z "$out" ] || { echo "$p: $out"; exit 1; }; done'
check "virtual-mail drop-in example shipped" test -f /usr/share/doc/pop3sf/examples/virtual-mail.conf.example
check "system user pop3sf (nologin, home /var/lib/pop3sf)" sh -c '
    e=$(getent passwd pop3sf) || exit 1; uid=$(echo "$e" | cut -d: -f3)
    [ "$uid" -lt 1000 ] && echo "$e" | grep -q ":/var/lib/pop3sf:/usr/sbin/nologin$"'
check "pop3sf is in group ssl-cert" sh -c 'id -nG pop3sf | tr " " "\n" | grep -qx ssl-cert'
check "conffile root:pop3sf 0640" sh -c '[ "$(stat -c "%U:%G %a" /etc/pop3sf.conf)" = "root:pop3sf 640" ]'
check "/etc/pop3sf.conf is a conffile" sh -c 'dpkg-query -W -f="\${Conffiles}" pop3sf | grep -q "/etc/pop3sf.conf "'
check "/var/lib/pop3sf/mail owned by pop3sf" sh -c '[ "$(stat -c "%U:%G" /var/lib/pop3sf/mail)" = "pop3sf:pop3sf" ]'
# Without systemd no CacheDirectory= makes it: the package does, for the shipped size_cache_dir.
check "/var/cache/pop3sf made by the package, pop3sf:pop3sf 0750" sh -c '[ "$(stat -c "%U:%G %a" /var/cache/pop3sf)" = "pop3sf:pop3sf 750" ]'
check "snakeoil certificate present" test -s /etc/ssl/certs/ssl-cert-snakeoil.pem -a -s /etc/ssl/private/ssl-cert-snakeoil.key
check "sockets enabled" test -L /etc/systemd/system/sockets.target.wants/pop3sf.socket -a -L /etc/systemd/system/sockets.target.wants/pop3sf-tls.socket
check "service not enabled (socket-activated only)" sh -c '! ls /etc/systemd/system/*.wants/pop3sf.service 2>/dev/null | grep -q .'
out_empty "systemd-analyze verify prints nothing" systemd-analyze verify /lib/systemd/system/pop3sf.service /lib/systemd/system/pop3sf.socket /lib/systemd/system/pop3sf-tls.socket
check "systemd-analyze security --offline=true <= 2.0" sh -c '
    out=$(systemd-analyze security --offline=true --no-pager /lib/systemd/system/pop3sf.service 2>&1)
    level=$(echo "$out" | sed -n "s/.*Overall exposure level for pop3sf.service: \([0-9.]*\).*/\1/p")
    echo "exposure: $level"; [ -n "$level" ] && awk "BEGIN { exit !($level <= 2.0) }"'
check "no PrivateNetwork, no IP deny-lists" sh -c '! grep -Eq "^(PrivateNetwork=yes|IPAddressDeny=)" /lib/systemd/system/pop3sf.service'
check "pop3sf --check-config (root)" pop3sf --check-config
check "pop3sf --check-config (as user pop3sf)" runuser -u pop3sf -- pop3sf --check-config
check "pop3sf --version" pop3sf --version
check "shipped config has no users" sh -c '[ -z "$(pop3sf-admin user list)" ]'
check "pop3sf-admin user add" sh -c 'echo "s3cret pw" | pop3sf-admin user add alice'
check "pop3sf-admin message add" sh -c 'echo "overlay test message" | pop3sf-admin message add alice'
check "user files belong to pop3sf" sh -c '[ -z "$(find /var/lib/pop3sf/mail ! -user pop3sf)" ]'

# By hand, daemonized: binds 110/995 itself (private netns), drops to pop3sf, logs to journald.
check "pop3sf --daemon starts" pop3sf --daemon
for i in $(seq 100); do [ -s /run/pop3sf/pop3sf.pid ] && break; sleep 0.05; done
pid=$(cat /run/pop3sf/pop3sf.pid 2>/dev/null)
check "daemon pidfile names a live process" kill -0 "${pid:-0}"
# The pidfile is written while detaching, before privileges are dropped: wait for the drop.
for i in $(seq 100); do [ "$(ps -o user= -p "${pid:-0}")" = pop3sf ] && break; sleep 0.05; done
check "daemon runs as pop3sf" sh -c "[ \"\$(ps -o user= -p ${pid:-0})\" = pop3sf ]"
check "second --daemon refused (exit 1)" sh -c 'pop3sf --daemon; [ $? -eq 1 ]'
check "POP3 over STLS on 110 reads the mail" sh -c "/usr/bin/python3 $DIR/pop_check.py stls 127.0.0.1 110 alice 's3cret pw' | grep -q 'overlay test message'"
check "POP3 over implicit TLS on 995 reads the mail" sh -c "/usr/bin/python3 $DIR/pop_check.py tls 127.0.0.1 995 alice 's3cret pw' | grep -q 'overlay test message'"
check "the daemon keeps exact sizes in /var/cache/pop3sf" sh -c '[ -s /var/cache/pop3sf/sizes-v2.log ] && [ "$(stat -c %U /var/cache/pop3sf/sizes-v2.log)" = pop3sf ]'
check "daemon survives SIGHUP" sh -c "kill -HUP ${pid:-0}; sleep 0.5; kill -0 ${pid:-0}"
check "daemon stops on SIGTERM" sh -c "kill -TERM ${pid:-0}; for i in \$(seq 100); do kill -0 ${pid:-0} 2>/dev/null || exit 0; sleep 0.1; done; exit 1"
check "pidfile removed at exit" test ! -e /run/pop3sf/pop3sf.pid

# A daemon killed with SIGKILL leaves its pidfile: the next start removes it and says so,
# on the terminal and in the log (test_deb.py reads the journal).
pop3sf --daemon
for i in $(seq 100); do [ -s /run/pop3sf/pop3sf.pid ] && break; sleep 0.05; done
pid=$(cat /run/pop3sf/pop3sf.pid 2>/dev/null)
kill -KILL "${pid:-0}"
for i in $(seq 100); do kill -0 "${pid:-0}" 2>/dev/null || break; sleep 0.05; done
check "SIGKILL leaves a stale pidfile" sh -c "[ \"\$(cat /run/pop3sf/pop3sf.pid)\" = ${pid:-0} ] && ! kill -0 ${pid:-0}"
err=$(pop3sf --daemon 2>&1); rc=$?
echo "$err" >&2
check "--daemon over a stale pidfile starts (exit 0)" test "$rc" -eq 0
check "--daemon names the stale pidfile it removes" sh -c "echo \"\$1\" | grep -q 'removing stale pidfile /run/pop3sf/pop3sf.pid (pid ${pid:-0} not running'" sh "$err"
for i in $(seq 100); do new=$(cat /run/pop3sf/pop3sf.pid 2>/dev/null); [ -n "$new" ] && [ "$new" != "$pid" ] && break; sleep 0.05; done
check "the new daemon serves" sh -c "/usr/bin/python3 $DIR/pop_check.py tls 127.0.0.1 995 alice 's3cret pw' | grep -q 'overlay test message'"
kill -TERM "${new:-0}"
for i in $(seq 100); do kill -0 "${new:-0}" 2>/dev/null || break; sleep 0.1; done

check "apt-get purge" apt-get purge -y pop3sf
check "purge removed the conffile" test ! -e /etc/pop3sf.conf
check "purge kept the mail" sh -c '[ -n "$(find /var/lib/pop3sf/mail/alice -type f -name "*.txt")" ]'
check "purge removed the size cache" test ! -e /var/cache/pop3sf
check "purge removed the enable symlinks" test ! -e /etc/systemd/system/sockets.target.wants/pop3sf.socket
exit 0
