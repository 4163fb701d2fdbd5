#!/usr/bin/env bash
# Property-based fuzzing of Skiff's API from resources/api/openapi.json with schemathesis
# (from PyPI, installed into a cached virtualenv), bounded in time. Passes when no request got a
# 5xx, every status and body is the documented one, schema-invalid requests were refused, and
# Skiff still answers afterwards. /logger, /metrics and /snapshot/create are left out: their
# bodies name files to create, which random data must not do on the host (/snapshot/load only
# reads).
#
#   tools/fuzz-api.sh [SECONDS]     (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-60}
say() { echo "[fuzz-api] $*" >&2; }

tools/need-packages.sh socat curl python3-venv
venv=${XDG_CACHE_HOME:-$HOME/.cache}/skiff/venv-schemathesis
if [ ! -x "$venv/bin/st" ]; then
	say "installing schemathesis into $venv"
	python3 -m venv "$venv"
	"$venv/bin/pip" install -q 'schemathesis>=4,<5'
fi
cargo build --locked -q
skiff=$PWD/target/debug/skiff

work=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
sock=$work/api.sock
(cd "$work" && exec "$skiff" --api-sock "$sock" --log-path "$work/skiff.log" </dev/null >"$work/console.log" 2>"$work/stderr.log") &
skiff_pid=$!
pids+=("$skiff_pid")
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { say "skiff did not open its socket"; cat "$work/stderr.log" >&2; exit 1; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$sock" &
pids+=("$!")
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.05; done

say "fuzzing for ${budget}s"
# From the scratch folder, so schemathesis's cache does not land in the tree.
schema=$PWD/resources/api/openapi.json
(cd "$work" && "$venv/bin/st" run "$schema" --url "http://127.0.0.1:$port" \
	--checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection \
	--exclude-path /logger --exclude-path /metrics --exclude-path /snapshot/create \
	--max-time "$budget" --request-timeout 10 --workers 2 --warnings off)
kill -0 "$skiff_pid" || { say "skiff died"; cat "$work/stderr.log" >&2; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code}' --unix-socket "$sock" http://localhost/)
[ "$code" = 200 ] || { say "skiff stopped answering (GET / -> $code)"; exit 1; }
if grep -q panicked "$work/stderr.log"; then say "skiff panicked"; cat "$work/stderr.log" >&2; exit 1; fi
say "no server errors, no crash; Skiff still answers"
