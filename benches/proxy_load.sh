#!/usr/bin/env bash
# Load benchmark of the sidecar's data plane, in one run:
#   direct   wrk -> tool
#   nginx    wrk -> nginx (reverse proxy, keep-alive upstream) -> tool
#   sidecar  wrk -> perfecx sidecar (/tools/web_search/..., shipped policies) -> tool
# for 1 KiB and 16 KiB JSON bodies: the highest throughput (closed loop) with the proxy's CPU time
# per request in that run, and latency at a fixed rate (RATE requests/s, paced with wrk's delay());
# then the sidecar's resident memory.
#
# Needs wrk and nginx (Debian: apt-get install -y wrk nginx). Only 127.0.0.1 is used.
# Usage: benches/proxy_load.sh            (DURATION=10s CONNS=32 RATE=2000 POLICY_DIR=policies)
# The ports (TOOL_PORT=18081 NGINX_PORT=18080 SIDECAR_PORT=18001 ADMIN_PORT=18000) can be moved
# when another copy of the benchmark runs on the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
THREADS=${THREADS:-2}
RATE=${RATE:-2000}
PACED_CONNS=${PACED_CONNS:-20}
POLICY_DIR=$(realpath "${POLICY_DIR:-policies}")
TOOL_PORT=${TOOL_PORT:-18081} NGINX_PORT=${NGINX_PORT:-18080}
SIDECAR_PORT=${SIDECAR_PORT:-18001} ADMIN_PORT=${ADMIN_PORT:-18000}

for bin in wrk nginx; do
    command -v "$bin" >/dev/null || { echo "error: $bin is not installed (apt-get install -y wrk nginx)" >&2; exit 1; }
done
[ -d "$POLICY_DIR" ] || { echo "error: no policy directory $POLICY_DIR" >&2; exit 1; }

cargo build --release --quiet --bin perfecx --example bench_tool
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid" 2>/dev/null)" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$target_dir/release/examples/bench_tool" "127.0.0.1:$TOOL_PORT" &
pids+=($!)

mkdir -p "$work/nginx-tmp"
cat >"$work/nginx.conf" <<NGINX
worker_processes auto;
user root;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/nginx-tmp/body;
    proxy_temp_path $work/nginx-tmp/proxy;
    fastcgi_temp_path $work/nginx-tmp/fastcgi;
    uwsgi_temp_path $work/nginx-tmp/uwsgi;
    scgi_temp_path $work/nginx-tmp/scgi;
    client_body_buffer_size 64k;
    upstream tool { server 127.0.0.1:$TOOL_PORT; keepalive 64; }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://tool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffers 8 32k;
        }
    }
}
NGINX
nginx -p "$work" -c "$work/nginx.conf" -g 'daemon off;' &
pids+=($!)

cat >"$work/sidecar.yaml" <<YAML
agent_id: load-benchmark
listen: 127.0.0.1:$SIDECAR_PORT
admin_listen: 127.0.0.1:$ADMIN_PORT
policy_dir: $POLICY_DIR
upstreams:
  - name: web_search
    http_url: http://127.0.0.1:$TOOL_PORT
YAML
RUST_LOG=warn "$target_dir/release/perfecx" sidecar --config "$work/sidecar.yaml" &
sidecar_pid=$!
pids+=($sidecar_pid)

wait_for() {
    for _ in $(seq 100); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "error: $1 did not come up" >&2; exit 1
}
wait_for "http://127.0.0.1:$TOOL_PORT/"
wait_for "http://127.0.0.1:$NGINX_PORT/"
wait_for "http://127.0.0.1:$ADMIN_PORT/readyz"

# JSON bodies of ordinary words: nothing in them that a policy forbids.
make_body() {
    python3 -c '
import json, sys
size = int(sys.argv[1])
words = "the quick brown fox jumps over the lazy dog while searching for rust books ".split()
text, i = [], 0
doc = {"query": "rust async runtimes", "options": {"limit": 10, "lang": "en"}, "context": ""}
while len(json.dumps(doc)) < size:
    text.append(words[i % len(words)]); i += 1
    doc["context"] = " ".join(text)
print(json.dumps(doc)[:size - 2] + "\"}" if len(json.dumps(doc)) > size else json.dumps(doc), end="")
' "$1" >"$2"
}
make_body 1024 "$work/body-1k.json"
make_body 16384 "$work/body-16k.json"
for b in 1k 16k; do python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$work/body-$b.json"; done

lua() { # $1 body file, $2 delay in ms (0: none)
    cat <<LUA
local f = io.open("$1", "rb"); local body = f:read("*a"); f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
LUA
    if [ "$2" != 0 ]; then echo "function delay() return $2 end"; fi
}

# Latency in microseconds from wrk's "NN%  1.23ms" lines.
to_us() { awk '{v=$1; u=v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
    m = (u=="us") ? 1 : (u=="ms") ? 1000 : (u=="s") ? 1000000 : 1; printf "%.0f", v*m }'; }

# CPU time (user + system) of processes $@ so far, in clock ticks.
cpu_ticks() {
    for p in "$@"; do awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0; done |
        awk '{t += $1} END {print t + 0}'
}
tick_us=$((1000000 / $(getconf CLK_TCK)))

run_wrk() { # $1 url, $2 lua, $3 connections, $4... the proxy's processes (none: direct)
    local url=$1 script=$2 conns=$3; shift 3
    local before after
    before=$(cpu_ticks "$@")
    wrk -t"$THREADS" -c"$conns" -d"$DURATION" --latency -s "$script" "$url" >"$work/wrk.out" 2>&1 || true
    after=$(cpu_ticks "$@")
    local rps p50 p99 errors requests cpu="-"
    requests=$(awk '/requests in/ {print $1}' "$work/wrk.out")
    [ $# -gt 0 ] && [ "${requests:-0}" -gt 0 ] && cpu=$(( (after - before) * tick_us / requests ))
    rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$work/wrk.out")
    p50=$(awk '$1=="50%" {print $2}' "$work/wrk.out" | to_us)
    p99=$(awk '$1=="99%" {print $2}' "$work/wrk.out" | to_us)
    errors=$(awk '/Non-2xx|Socket errors/ {printf "%s ", $0}' "$work/wrk.out")
    echo "$rps $p50 $p99 $cpu ${errors:-none}"
}

declare -A url=(
    [direct]="http://127.0.0.1:$TOOL_PORT/search"
    [nginx]="http://127.0.0.1:$NGINX_PORT/search"
    [sidecar]="http://127.0.0.1:$SIDECAR_PORT/tools/web_search/search"
)
delay_ms=$(python3 -c "print(round($PACED_CONNS * 1000 / $RATE, 3))")

# Each target must answer 200 with the body before it is measured.
for t in direct nginx sidecar; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' --data-binary @"$work/body-1k.json" "${url[$t]}")
    [ "$code" = 200 ] || { echo "error: $t answered $code" >&2; exit 1; }
done

echo "# perfecx load benchmark: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, wrk -t$THREADS, $DURATION per run"
echo "# policies: $POLICY_DIR ($(ls "$POLICY_DIR" | grep -Ev '\.test\.ya?ml$' | grep -Ec '\.(ya?ml|json)$') files)"
# The processes whose CPU time is counted per request: none for direct, nginx's workers, the
# sidecar.
declare -A procs=(
    [direct]=""
    [nginx]="$(pgrep -P "$(cat "$work/nginx.pid")" | tr '\n' ' ')"
    [sidecar]="$sidecar_pid"
)
printf "%-6s %-8s | %10s %9s %9s %10s | %9s %9s %12s | %s\n" body target "max req/s" "p50 us" "p99 us" "CPU us/req" "p50@$RATE" "p99@$RATE" "p99 added" errors
declare -A paced_p99
for size in 1k 16k; do
    lua "$work/body-$size.json" 0 >"$work/max.lua"
    lua "$work/body-$size.json" "$delay_ms" >"$work/paced.lua"
    for t in direct nginx sidecar; do
        # shellcheck disable=SC2086 # the process list splits into arguments
        read -r rps p50 p99 cpu err < <(run_wrk "${url[$t]}" "$work/max.lua" "$CONNS" ${procs[$t]})
        read -r _ pp50 pp99 _ perr < <(run_wrk "${url[$t]}" "$work/paced.lua" "$PACED_CONNS")
        paced_p99[$t]=$pp99
        added="-"
        [ "$t" != direct ] && added=$(( pp99 - ${paced_p99[direct]} ))
        printf "%-6s %-8s | %10s %9s %9s %10s | %9s %9s %12s | %s %s\n" "$size" "$t" "$rps" "$p50" "$p99" "$cpu" "$pp50" "$pp99" "$added" "$err" "$perr"
    done
done
rss=$(awk '/^VmRSS/ {print $2}' /proc/$sidecar_pid/status)
hwm=$(awk '/^VmHWM/ {print $2}' /proc/$sidecar_pid/status)
echo "sidecar resident memory: now $((rss / 1024)) MiB ($rss kB), peak $((hwm / 1024)) MiB ($hwm kB)"
curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | grep -E '^perfecx_tool_calls_total' || true
