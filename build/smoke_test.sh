#!/usr/bin/env bash
# Smoke test of the frozen executable, and of nothing else: every step runs the built
# `outpost` with a scrubbed environment (env -i: no PYTHONPATH, no venv, no project on any
# path), from a working directory outside the repository. Needs bash and coreutils only.
#
#   build/smoke_test.sh [EXE]      EXE defaults to dist/outpost/outpost
#
# $OUTPOST_CONFIG, when set, is the one thing passed through to every step: the release
# smoke under qemu-user (build/release_smoke.sh) fixes the model layout with it, which
# measuring takes minutes under emulation.
#
# Exits 0 when every check passed; on the first failure prints what failed and the
# server's log, and exits 1.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
EXE="$(realpath "${1:-$ROOT/dist/outpost/outpost}")"
[[ -x "$EXE" ]] || { echo "smoke: $EXE is not an executable; build it with build/freeze.sh" >&2; exit 2; }

tmp="$(mktemp -d /tmp/outpost-smoke.XXXXXX)"
server_pid=""
started=()   # every process this script starts, stopped on exit whatever happened
cleanup() {
    local p
    for p in "${started[@]}"; do
        if kill -0 "$p" 2>/dev/null; then
            kill -TERM "$p" 2>/dev/null || true
            wait "$p" 2>/dev/null || true
        fi
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
cd "$tmp"   # outside the repository

data="$tmp/data"
log="$tmp/server.log"
step=""
# The only way anything runs here: the executable, a bare environment.
# (Servers start as `env ... EXE &`, a simple command: env execs EXE, so $! is its pid.)
ENV=(env -i PATH=/usr/bin:/bin HOME="$tmp" LANG=C.UTF-8 OUTPOST_DATA_DIR="$data")
[[ -z "${OUTPOST_CONFIG:-}" ]] || ENV+=(OUTPOST_CONFIG="$(realpath "$OUTPOST_CONFIG")")
outpost() { "${ENV[@]}" "$EXE" "$@"; }

fail() {
    echo "smoke: FAIL at '$step': $*" >&2
    [[ -f "$log" ]] && { echo "--- server log (last 30 lines) ---" >&2; tail -n 30 "$log" >&2; }
    exit 1
}
begin() { step="$1"; echo "smoke: $step"; }
expect() {  # expect PATTERN TEXT: TEXT contains PATTERN (fixed string)
    [[ "$2" == *"$1"* ]] || fail "expected '$1' in: $2"
}
no_traceback() { [[ "$1" != *Traceback* ]] || fail "a traceback reached the user: $1"; }

# A .npy file written without Python: magic, version 1.0, a header padded to 64 bytes.
npy_f32() {  # npy_f32 FILE SHAPE DATA-COMMAND
    local file="$1" shape="$2" hdr pad len
    hdr="{'descr': '<f4', 'fortran_order': False, 'shape': $shape, }"
    pad=$(( (64 - (10 + ${#hdr} + 1) % 64) % 64 ))
    hdr="$hdr$(printf '%*s' "$pad" '')"$'\n'
    len=${#hdr}
    {
        printf '\x93NUMPY\x01\x00'
        printf "\\x$(printf %02x $((len & 255)))\\x$(printf %02x $((len >> 8)))"
        printf '%s' "$hdr"
        eval "$3"
    } > "$file"
}

begin "version"
out=$(outpost --version) || fail "exit $?"
expect "outpost " "$out"

begin "firmware profiles are bundled (where the build has them)"
if outpost --help | grep -q -E '^ +profiles '; then
    out=$(outpost profiles list) || fail "exit $?: $out"
    expect "x86-cpu" "$out"; expect "jetson-orin-nano-8gb" "$out"
else
    echo "smoke:   skipped: this build has no 'outpost profiles' (issue 5)"
fi

begin "serve --demo (config from the environment: OUTPOST_DATA_DIR)"
"${ENV[@]}" "$EXE" serve --demo --log-format json > "$log" 2>&1 &
server_pid=$!; started+=("$server_pid")
for _ in $(seq 600); do  # up to 60 s: the first start builds the demo models
    grep -q '"msg": "ready"' "$log" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || fail "the server exited early"
    sleep 0.1
done
grep -q '"msg": "ready"' "$log" || fail "the server was not ready within 60 s"
expect '"ready": true' "$(grep '"msg": "ready"' "$log")"
sock="$data/outpost.sock"
[[ -S "$sock" ]] || fail "no socket at $sock (the default under OUTPOST_DATA_DIR)"

begin "infer identity through the socket (frozen client)"
# x = 0, 1, ..., 15 as float32; identity returns it unchanged
npy_f32 x.npy "(1, 16)" "printf '\x00\x00\x00\x00\x00\x00\x80\x3f\x00\x00\x00\x40\x00\x00\x40\x40\x00\x00\x80\x40\x00\x00\xa0\x40\x00\x00\xc0\x40\x00\x00\xe0\x40\x00\x00\x00\x41\x00\x00\x10\x41\x00\x00\x20\x41\x00\x00\x30\x41\x00\x00\x40\x41\x00\x00\x50\x41\x00\x00\x60\x41\x00\x00\x70\x41'"
out=$(outpost infer identity -i x=x.npy --json) || fail "exit $?: $out"
expect '"model": "identity", "version": 1' "$out"
expect '"y": [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0]]' "$out"

begin "infer mlp: three class probabilities that sum to 1"
npy_f32 f.npy "(2, 32)" "for i in 1 2 3 4; do tail -c 64 x.npy; done"  # 0..15, four times
out=$(outpost infer mlp -i features=f.npy --socket "$sock" --json) || fail "exit $?: $out"
row=$(grep -o '"probs": \[\[[^]]*' <<<"$out" | grep -o '[^[]*$') \
    || fail "no probs in: $out"
awk -F', ' -v row="$row" 'BEGIN { n = split(row, p, ", "); s = 0;
    for (i = 1; i <= n; i++) { if (p[i] < 0 || p[i] > 1) exit 1; s += p[i] }
    exit !(n == 3 && s > 0.9999 && s < 1.0001 && p[1] != p[2]) }' \
    || fail "not 3 distinct probabilities summing to 1: $row"

begin "infer: bad requests get one clear line, no traceback"
if out=$(outpost infer no-such-model -i x=x.npy 2>&1); then fail "unknown model accepted"; fi
no_traceback "$out"; expect "NOT_FOUND" "$out"
if out=$(outpost infer identity -i x=missing.npy 2>&1); then fail "missing file accepted"; fi
no_traceback "$out"; expect "missing.npy" "$out"
if out=$(outpost infer identity -i x=f.npy 2>&1); then fail "wrong shape accepted"; fi
no_traceback "$out"; expect "INVALID_ARGUMENT" "$out"

begin "models list (the server's repository, while it serves)"
out=$(outpost models list) || fail "exit $?"
for m in cnn identity mlp; do expect "$m" "$out"; done

begin "hot swap: add identity version 2, activate it through the socket, infer"
out=$(outpost models add identity "$data/models/identity/1/model.onnx" --stage) \
    || fail "exit $?: $out"
expect "added identity version 2" "$out"
out=$(outpost models activate identity 2 2>&1) || fail "exit $?: $out"
out=$(outpost infer identity -i x=x.npy --json) || fail "exit $?: $out"
expect '"model": "identity", "version": 2' "$out"
expect '"y": [[0.0, 1.0, 2.0, 3.0' "$out"

# HTTP/1.0 over bash's /dev/tcp (no curl needed): prints the whole response, or fails
# (quietly) when nothing listens on the port.
http() {  # http METHOD PORT PATH [BODY]
    local body="${4:-}"
    { exec 3<>"/dev/tcp/127.0.0.1/$2"; } 2>/dev/null || return 1
    printf '%s %s HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n' "$1" "$3" >&3
    printf 'Content-Length: %d\r\n\r\n%s' "${#body}" "$body" >&3
    cat <&3
    exec 3<&-
}
wait_http() {  # wait_http PORT PATH PID: until PATH answers 200 (60 s)
    for _ in $(seq 600); do
        kill -0 "$3" 2>/dev/null || return 1
        [[ "$(http GET "$1" "$2" | head -n1)" == *" 200"* ]] && return 0
        sleep 0.1
    done
    return 1
}
# start_http LOG PATH ARGS...: start `outpost ARGS` (where "{port}" in ARGS becomes a
# port below the ephemeral range), wait until PATH answers 200; a port found taken is
# retried with another. Sets $pid and $port.
start_http() {
    local log="$1" path="$2" try
    shift 2
    for try in 1 2 3 4 5; do
        port=$(( 20000 + RANDOM % 12000 ))
        "${ENV[@]}" "$EXE" "${@//\{port\}/$port}" > "$log" 2>&1 &
        pid=$!; started+=("$pid")
        wait_http "$port" "$path" "$pid" && return 0
        kill -0 "$pid" 2>/dev/null && { kill -TERM "$pid"; wait "$pid" || true; }
        grep -q -i "address already in use" "$log" || return 1
    done
    return 1
}

# --- HTTP side (issue 3): runs where `serve --http` exists. Written against the http
# branch before its merge; LEAD: keep it in step with docs/http.md. ---------------------
begin "HTTP: health and an inference over the Open Inference Protocol"
if outpost serve --help | grep -q -- '--http'; then
    start_http "$tmp/http.log" /v2/health/ready serve --data-dir "$tmp/http" \
        --socket "$tmp/http.sock" --demo --http "127.0.0.1:{port}" --log-format json \
        || { log="$tmp/http.log"; fail "GET /v2/health/ready never answered 200"; }
    http_pid=$pid
    out=$(http POST "$port" /v2/models/identity/infer '{"inputs": [{"name": "x",
        "shape": [1, 16], "datatype": "FP32", "data": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
        12, 13, 14, 15]}]}') || fail "no answer to the HTTP infer"
    expect " 200" "$(head -n1 <<<"$out")"
    expect '"name":"y"' "${out// /}"; expect '[0.0,1.0,2.0,3.0,4.0' "${out// /}"
    out=$(http GET "$port" /v2/models/no-such-model/ready) || true
    expect " 404" "$(head -n1 <<<"$out")"
    kill -TERM "$http_pid"; wait "$http_pid" || fail "the HTTP server exited with $?"
else
    echo "smoke:   skipped: this build has no 'serve --http' (issue 3)"
fi

begin "gRPC: the server listens and answers HTTP/2 (grpcio's core is frozen in)"
start_http "$tmp/grpc.log" /v2/health/ready serve --data-dir "$tmp/grpc" \
    --socket "$tmp/grpc.sock" --demo --http "127.0.0.1:{port}" --grpc 127.0.0.1:0 \
    --log-format json || { log="$tmp/grpc.log"; fail "the server with --grpc never got ready"; }
grpc_pid=$pid
gport=$(grep -o '"grpc": *"127\.0\.0\.1:[0-9]*"' "$tmp/grpc.log" | grep -o '[0-9]*"$' | tr -d '"')
[[ -n "$gport" ]] || { log="$tmp/grpc.log"; fail "the ready line names no gRPC address"; }
# HTTP/2's client preface and an empty SETTINGS frame: a gRPC server answers with its own
# SETTINGS frame (type 0x04, the 4th byte of the 9-byte frame header).
exec 3<>"/dev/tcp/127.0.0.1/$gport" || fail "nothing listens on the gRPC port $gport"
printf 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00' >&3
frame=$(timeout 10 head -c 9 <&3 | od -An -tx1 | tr -d ' \n')
exec 3<&-
[[ "${frame:6:2}" == "04" ]] || { log="$tmp/grpc.log"; fail "no HTTP/2 SETTINGS from the gRPC port: '$frame'"; }
kill -TERM "$grpc_pid"; wait "$grpc_pid" || fail "the gRPC server exited with $?"

# --- OTA (issue 6): runs where `outpost fleet` exists. Written against the ota branch
# before its merge; LEAD: keep it in step with docs/ota.md. -----------------------------
begin "OTA: fleet init, publish, roll out, serve; the device updates its running server"
if outpost --help | grep -q -E '^ +fleet '; then
    fleet="$tmp/fleet"
    outpost fleet init "$fleet" > /dev/null || fail "fleet init: exit $?"
    out=$(outpost fleet publish "$fleet" "$data/models/identity/1/model.onnx" \
        --name identity --version 3) || fail "fleet publish: exit $?: $out"
    out=$(outpost fleet rollout "$fleet" identity 3 --fraction 1) \
        || fail "fleet rollout: exit $?: $out"
    start_http "$tmp/fleet.log" /v1/status fleet serve "$fleet" --host 127.0.0.1 \
        --port "{port}" || { log="$tmp/fleet.log"; fail "the fleet server never answered"; }
    fleet_pid=$pid fport=$port
    printf '%s\n' "data_dir = \"$data\"" "[server]" "socket_path = \"$sock\"" "[updater]" \
        "fleet_url = \"http://127.0.0.1:$fport\"" \
        "trusted_root = \"$fleet/metadata/1.root.json\"" \
        'device_id = "smoke-device"' 'health_window_s = 0.0' > device.toml
    out=$(outpost update check --config device.toml 2>&1) || fail "update check: $out"
    expect "identity 2 -> 3: committed" "$out"
    out=$(outpost infer identity -i x=x.npy --json) || fail "exit $?: $out"
    expect '"model": "identity", "version": 3' "$out"   # the running server swapped
    out=$(outpost update check --config device.toml 2>&1) || fail "second check: $out"
    expect "up to date" "$out"
    kill -TERM "$fleet_pid"; wait "$fleet_pid" || true
else
    echo "smoke:   skipped: this build has no 'outpost fleet' (issue 6)"
fi

begin "SIGTERM: drain and exit 0"
kill -TERM "$server_pid"
code=0; wait "$server_pid" || code=$?
server_pid=""
[[ $code == 0 ]] || fail "the server exited with $code"
grep -q '"msg": "stopped"' "$log" || fail "no 'stopped' line in the log"

begin "models add / list into a fresh repository"
fresh="$tmp/fresh"
out=$(outpost models add extra "$data/models/identity/1/model.onnx" --data-dir "$fresh") \
    || fail "exit $?: $out"
expect "added extra version 1" "$out"
out=$(outpost models list --data-dir "$fresh" --json) || fail "exit $?"
expect '"name": "extra"' "$out"; expect '"active_version": 1' "$out"
printf 'not an onnx model' > bogus.onnx
if out=$(outpost models add bogus bogus.onnx --data-dir "$fresh" 2>&1); then
    fail "a file that is not ONNX was accepted"
fi
no_traceback "$out"; expect "bogus.onnx" "$out"
out=$(outpost models list --data-dir "$fresh") || fail "exit $?"
[[ "$out" != *bogus* ]] || fail "the refused model left state behind: $out"

begin "install into a folder: the executable installs itself"
root="$tmp/root"
out=$(outpost install --root "$root" --dry-run) || fail "exit $?: $out"
expect "none done" "$out"
[[ ! -e "$root" ]] || fail "--dry-run changed $root"
out=$(outpost install --root "$root") || fail "exit $?: $out"
installed="$root/opt/outpost/current/outpost"
[[ -x "$installed" ]] || fail "no executable at $installed"
[[ -f "$root/etc/outpost/config.toml" && -f "$root/etc/systemd/system/outpost.service" ]] \
    || fail "config or unit missing: $(find "$root/etc")"
ln -s "$installed" "$tmp/outpost-link"   # like /usr/local/bin/outpost
out=$("${ENV[@]}" "$tmp/outpost-link" config show --config "$root/etc/outpost/config.toml") \
    || fail "the installed copy, run through a symlink, failed: $out"
expect 'socket_path = "/run/outpost/outpost.sock"' "$out"
expect 'data_dir = "/var/lib/outpost"' "$out"

begin "demo (the frozen executable starts a frozen server: launcher uses sys.executable)"
log="$tmp/demo.out"
outpost demo --seconds 0.2 --data-dir "$tmp/demo" > "$log" 2>&1 || fail "exit $?"
out=$(cat "$log")
for m in identity mlp cnn; do expect "$m" "$out"; done
expect "server stopped cleanly (exit 0)" "$out"

echo "smoke: all checks passed ($EXE)"
