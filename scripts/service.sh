# Shared by scripts/garage.sh and scripts/moto.sh (sourced, not run):
# loopback ports, supervised servers that never outlive their owner, and
# stopping them by PID.

# N free TCP ports on 127.0.0.1, one per line (held open together while
# they are chosen, so they are distinct).
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
PY
}

# alive PID: the process exists and is not a zombie.
alive() {
  local state
  read -r _ _ state _ 2>/dev/null <"/proc/$1/stat" || return 1
  [ "$state" != Z ]
}

# supervise OWNER PIDFILE LOG CMD...: start CMD in the background, write its
# PID to PIDFILE, and kill it when OWNER (a PID; 0 for none) exits. CMD also
# gets SIGKILL when its supervisor dies, so no server survives a killed
# test. Returns at once.
supervise() {
  local owner=$1 pidfile=$2 log=$3
  shift 3
  rm -f "$pidfile"
  (
    trap '' HUP
    setpriv --pdeathsig KILL -- "$@" </dev/null >>"$log" 2>&1 &
    child=$!
    echo "$child" >"$pidfile.tmp" && mv "$pidfile.tmp" "$pidfile"
    while alive "$child"; do
      if [ "$owner" != 0 ] && ! alive "$owner"; then
        kill -TERM "$child" 2>/dev/null
        sleep 2
        kill -KILL "$child" 2>/dev/null
        break
      fi
      sleep 0.5
    done
    wait "$child" 2>/dev/null
  ) </dev/null >/dev/null 2>&1 &
  local i
  for i in $(seq 100); do
    [ -s "$pidfile" ] && return 0
    sleep 0.02
  done
  echo "could not start $1" >&2
  return 1
}

# stop_pidfile PIDFILE: TERM the process, KILL it after 5 s; remove PIDFILE.
stop_pidfile() {
  local pidfile=$1 pid i
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -TERM "$pid" 2>/dev/null; then
    for i in $(seq 50); do
      alive "$pid" || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# wait_port PORT SECONDS: until 127.0.0.1:PORT accepts a connection.
wait_port() {
  local port=$1 limit=$2 start=$SECONDS
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    [ $((SECONDS - start)) -lt "$limit" ] || return 1
    sleep 0.05
  done
}

# The directory that caches fixtures outside the clone.
cache_root() {
  echo "${VMA_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vma-test}"
}
