#!/bin/sh
# Runs every line of the Procfile in the background, with .env, as honcho or
# foreman would (each process logs to $LOG_DIR/NAME.log); Ctrl-C or kill stops them all.
# Needs `turnline` and `redis-server` on PATH (activate the virtualenv).
cd "$(dirname "$0")"
set -a
. ./.env
set +a
LOG_DIR=${LOG_DIR:-/tmp/turnline-multinode}
mkdir -p "$LOG_DIR"
pids=""
trap 'kill $pids 2>/dev/null; wait; exit 0' INT TERM
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  name=${line%%:*}
  sh -c "exec ${line#*:}" > "$LOG_DIR/$name.log" 2>&1 &
  pids="$pids $!"
  echo "started $name (pid $!): $LOG_DIR/$name.log"
done < Procfile
echo "gateways: http://127.0.0.1:$GATEWAY1_PORT/ and http://127.0.0.1:$GATEWAY2_PORT/ ; try: python demo.py"
wait
