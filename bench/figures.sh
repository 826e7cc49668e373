#!/usr/bin/env bash
# The figures of bench/README.md, each from one command, measured on this machine in one run:
#
#   bench/figures.sh ratios memory   # Reserve+Commit pairs/s and RLS calls/s over health checks/s
#                                    # (and pairs of health checks: a two-call task's ceiling)
#   bench/figures.sh ratios redis    # the same on a local redis-server
#   bench/figures.sh ratios embedded # the same on the memory store with a data dir
#   bench/figures.sh data-dir        # Reserve+Commit pairs with a data dir over pairs without one
#                                    # (each beside its server's health-check pairs)
#   bench/figures.sh latency memory  # p99 Reserve at 1/2, 1/4 and 1/8 of the saturation rate; p99.9
#                                    # at saturation (the Reserve of Reserve+Commit tasks), beside
#                                    # health checks at the same calls per second
#   bench/figures.sh latency redis
#   bench/figures.sh latency embedded
#   bench/figures.sh latency-stores  # Reserve p99 of the Redis store beside the memory store's at
#                                    # 1/2 and 1/4 of the memory store's saturation rate
#   bench/figures.sh replicas        # Redis: Reserve+Commit pairs on one replica, then
#                                    # on three with the connections spread over all of them (so
#                                    # most calls are forwarded to their account's owner), and the
#                                    # share of calls forwarded
#   bench/figures.sh stores          # the memory store, then Redis: health checks, Reserve+Commit pairs and counted RLS
#                                    # calls (a counter per key, 10,000 keys), each over memory's
#   bench/figures.sh memory          # bytes per account, 1,000,000 accounts (cargo bench --bench memory)
#   bench/figures.sh week [DIR]      # 1,000,000 accounts, 20 tasks each over a simulated week, on a
#                                    # data dir (kept at DIR if given): RSS, data dir size, reopening
#                                    # (cargo bench --bench data_dir)
#   bench/figures.sh startup DIR     # quotad's start on that data dir: until health answers, and the
#                                    # first read of an account on disk
#   bench/figures.sh soak            # 10 minutes at a steady rate with a data dir, short idle
#                                    # eviction and short retention: RSS every 10 s, its slope
#                                    # after 2 minutes and over the second half
#   bench/figures.sh redis-week      # Redis: the week of `week` on one replica that
#                                    # owns every partition: its RSS, accounts in memory, Redis's
#                                    # used_memory (cargo bench --bench owned)
#   bench/figures.sh redis-soak      # Redis: 10 minutes at a steady rate over three
#                                    # replicas, short idle eviction and retention: each replica's
#                                    # RSS every 10 s and its slope after the retention and over the
#                                    # second half; Redis's used_memory
#   bench/figures.sh admission       # ns per decision beside governor and limitador (criterion)
#   bench/figures.sh redis-cost      # Redis's own instructions per Reserve+Commit pair (callgrind),
#                                    # at 4 and at 32 in flight
#
# quotad and quotactl run as release builds on loopback; the load generator shares the machine,
# so every figure is a ratio of runs made the same way, one after the other.
# BENCH_SECONDS (default 10) sets each run's length. QUOTAD_ENV adds NAME=VALUE settings to the
# quotad that ratios, latency, latency-stores, data-dir, stores, replicas and redis-cost start, e.g.
# QUOTAD_ENV=QUOTAD_SERVER__WORKER_THREADS=1.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${BENCH_SECONDS:-10}"
token="bench-admin-token"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A redis-server on a free port (REDIS_PORT), with nothing saved. Optional: REDIS_UNDER, a
# command to run it under, and REDIS_ARGS.
start_redis() {
  REDIS_PORT="$(free_port)"
  # shellcheck disable=SC2086 # both are word lists
  ${REDIS_UNDER:-} redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    ${REDIS_ARGS:-} >/dev/null 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 150); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
}

# $1: memory|redis|embedded (redis: one replica owning every partition; embedded: the memory
# store with a data dir: DATA_DIR, or a new temporary one). Optional: REDIS_UNDER and REDIS_ARGS (see start_redis); QUOTAD_ENV, extra NAME=VALUE
# settings for quotad.
start_quotad() {
  cargo build --release --quiet --bin quotad --bin quotactl
  local port; port="$(free_port)"
  local args=(serve --listen "127.0.0.1:$port")
  if [ "$1" = redis ]; then
    start_redis
    args+=(--store redis --redis-url "redis://127.0.0.1:$REDIS_PORT")
  fi
  if [ "$1" = embedded ]; then
    if [ -z "${DATA_DIR:-}" ]; then TEMP_DIR="$(mktemp -d)"; DATA_DIR="$TEMP_DIR/data"; fi
    args+=(--data-dir "$DATA_DIR")
  fi
  # shellcheck disable=SC2086
  env QUOTAD_ADMIN_TOKEN="$token" QUOTAD_HTTP_LISTEN=127.0.0.1:0 QUOTAD_LOG_FORMAT=pretty ${QUOTAD_ENV:-} \
    target/release/quotad "${args[@]}" >/dev/null 2>&1 &
  QUOTAD_PID=$!
  ADDR="http://127.0.0.1:$port"
  for _ in $(seq 300); do
    target/release/quotactl --addr "$ADDR" bench --workload health --requests 1 --warmup 0s --json >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "quotad did not start" >&2; exit 1
}

# A replica on the Redis of start_redis, on key prefix $1: gRPC and HTTP ports of
# its own, advertising its gRPC address (so the others forward to it), with QUOTAD_ENV's
# settings. Its pid, gRPC address and HTTP address are appended to REPLICA_PIDS, REPLICA_GRPC and
# REPLICA_HTTP.
REPLICA_PIDS=(); REPLICA_GRPC=(); REPLICA_HTTP=()
replica_start() {
  local grpc http; grpc="$(free_port)"; http="$(free_port)"
  # shellcheck disable=SC2086 # QUOTAD_ENV is a word list
  env QUOTAD_ADMIN_TOKEN="$token" QUOTAD_HTTP_LISTEN="127.0.0.1:$http" QUOTAD_LOG_FORMAT=pretty \
    QUOTAD_STORE__REDIS__KEY_PREFIX="$1" \
    QUOTAD_STORE__REDIS__ADVERTISE_ADDR="127.0.0.1:$grpc" ${QUOTAD_ENV:-} \
    target/release/quotad serve --listen "127.0.0.1:$grpc" --store redis \
    --redis-url "redis://127.0.0.1:$REDIS_PORT" >/dev/null 2>&1 &
  REPLICA_PIDS+=($!)
  REPLICA_GRPC+=("http://127.0.0.1:$grpc"); REPLICA_HTTP+=("127.0.0.1:$http")
  for _ in $(seq 300); do
    target/release/quotactl --addr "http://127.0.0.1:$grpc" bench --workload health --requests 1 --warmup 0s --json >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "quotad did not start" >&2; exit 1
}

replicas_stop() {
  if [ "${#REPLICA_PIDS[@]}" -gt 0 ]; then
    kill "${REPLICA_PIDS[@]}" 2>/dev/null || true; wait "${REPLICA_PIDS[@]}" 2>/dev/null || true
  fi
  REPLICA_PIDS=(); REPLICA_GRPC=(); REPLICA_HTTP=()
}

stop() {
  replicas_stop
  [ -n "${QUOTAD_PID:-}" ] && kill "$QUOTAD_PID" 2>/dev/null && wait "$QUOTAD_PID" 2>/dev/null || true
  [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null || true
  if [ -n "${TEMP_DIR:-}" ]; then rm -rf "$TEMP_DIR"; DATA_DIR=""; TEMP_DIR=""; fi
  QUOTAD_PID=""; REDIS_PID=""
}
trap stop EXIT

# A run of BENCH_SECONDS after 2 s of warm-up, or as LENGTH says (e.g. "--requests 100 --warmup 0s").
bench() { # workload, extra args...
  local workload="$1"; shift
  local length=(--duration "${seconds}s" --warmup 2s)
  [ -n "${LENGTH:-}" ] && read -r -a length <<<"$LENGTH"
  QUOTAD_ADMIN_TOKEN="$token" target/release/quotactl --addr "$ADDR" --json bench \
    --workload "$workload" "${length[@]}" "$@"
}

field() { jq -r "$1"; }

case "${1:-}" in
  ratios)
    store="${2:?memory, redis or embedded}"
    start_quotad "$store"
    health="$(bench health)"
    # The ceiling of a two-call task: two health checks, made the way a pair makes its calls.
    floor="$(bench health-pair)"
    pairs="$(bench reserve-commit)"
    rls="$(bench rls)"
    h="$(echo "$health" | field .ops_per_s)"
    f="$(echo "$floor" | field .ops_per_s)"
    p="$(echo "$pairs" | field .ops_per_s)"
    r="$(echo "$rls" | field .ops_per_s)"
    echo "store $store, 4 connections, 64 in flight, ${seconds} s each"
    printf '%-26s %10.0f /s  p99 %6s µs\n' "health checks" "$h" "$(echo "$health" | field .latency_us.p99)"
    printf '%-26s %10.0f /s  p99 %6s µs  ratio %.2f\n' "health-check pairs" "$f" "$(echo "$floor" | field .latency_us.p99)" "$(jq -n "$f / $h")"
    printf '%-26s %10.0f /s  p99 %6s µs  ratio %.2f\n' "Reserve+Commit pairs" "$p" "$(echo "$pairs" | field .latency_us.p99)" "$(jq -n "$p / $h")"
    printf '%-26s %10.0f /s  p99 %6s µs  ratio %.2f\n' "RLS calls" "$r" "$(echo "$rls" | field .latency_us.p99)" "$(jq -n "$r / $h")"
    ;;
  latency)
    # Reserve latency inside Reserve+Commit tasks (the Reserve alone is timed), at saturation and
    # at a half, a quarter and an eighth of the saturation rate (open loop: timed from each
    # task's scheduled start), each beside the floor: health checks at the same calls per second
    # (a task is two calls).
    store="${2:?memory, redis or embedded}"
    start_quotad "$store"
    saturated="$(bench reserve-commit)"
    max="$(echo "$saturated" | field .ops_per_s)"
    echo "store $store, Reserve within Reserve+Commit tasks, 4 connections, 64 in flight, ${seconds} s each"
    printf 'saturation  %8.0f tasks/s  Reserve p99 %6s µs  p99.9 %6s µs\n' "$max" "$(echo "$saturated" | field .reserve_latency_us.p99)" "$(echo "$saturated" | field .reserve_latency_us.p99_9)"
    for share in 2 4 8; do
      rate="$(jq -n "$max / $share | floor")"
      paced="$(bench reserve-commit --rate "$rate")"
      floor="$(bench health --rate "$((rate * 2))")"
      printf '1/%s rate   %8s tasks/s  Reserve p99 %6s µs  p99.9 %6s µs   floor: health at %s calls/s p99 %6s µs  p99.9 %6s µs\n' \
        "$share" "$rate" "$(echo "$paced" | field .reserve_latency_us.p99)" "$(echo "$paced" | field .reserve_latency_us.p99_9)" \
        "$((rate * 2))" "$(echo "$floor" | field .latency_us.p99)" "$(echo "$floor" | field .latency_us.p99_9)"
    done
    ;;
  latency-stores)
    # The Redis store's Reserve p99 beside the memory store's at the same rates: a half and a
    # quarter of the memory store's saturation (open loop), the memory store first.
    start_quotad memory
    max="$(bench reserve-commit | field .ops_per_s)"
    stop
    echo "Reserve within Reserve+Commit tasks, 4 connections, 64 in flight, ${seconds} s each;" \
      "the memory store's saturation: $max tasks/s"
    declare -A p99
    for share in 2 4; do
      rate="$(jq -n "$max / $share | floor")"
      for store in memory redis; do
        start_quotad "$store"
        paced="$(bench reserve-commit --rate "$rate")"
        p99[$store]="$(echo "$paced" | field .reserve_latency_us.p99)"
        printf '1/%s rate %8s tasks/s  %-6s achieved %8.0f /s  Reserve p99 %8s µs  p99.9 %8s µs\n' \
          "$share" "$rate" "$store" "$(echo "$paced" | field .ops_per_s)" "${p99[$store]}" \
          "$(echo "$paced" | field .reserve_latency_us.p99_9)"
        stop
      done
      printf '1/%s rate: Redis p99 / memory p99 = %.2f (goal at 1/2: at most 1.5)\n' "$share" \
        "$(jq -n "${p99[redis]} / ${p99[memory]}")"
    done
    ;;
  data-dir)
    # The memory store without and with a data dir, one after the other; each server's pairs
    # beside its own health-check pairs, so that a slower stretch of the machine shows.
    echo "Reserve+Commit pairs, 4 connections, 64 in flight, ${seconds} s each"
    declare -A pairs
    for store in memory embedded; do
      start_quotad "$store"
      floor="$(bench health-pair | field .ops_per_s)"
      run="$(bench reserve-commit)"
      pairs[$store]="$(echo "$run" | field .ops_per_s)"
      printf '%-9s pairs %8.0f /s  p99 %6s µs   health-check pairs %8.0f /s   pairs / health-check pairs %.2f\n' \
        "$store" "${pairs[$store]}" "$(echo "$run" | field .latency_us.p99)" "$floor" "$(jq -n "${pairs[$store]} / $floor")"
      stop
    done
    printf 'pairs with a data dir / pairs without: %.2f (goal: at least 0.8)\n' "$(jq -n "${pairs[embedded]} / ${pairs[memory]}")"
    ;;
  stores)
    # Counted RLS calls: a rule with a counter per account_id value in domain "edge", never over
    # its limit, so every call counts (the rls workload names one account per call).
    rules='[{domain="edge",entries=[{key="account_id"}],requests_per_unit=1000000000,unit="minute"}]'
    echo "health checks, Reserve+Commit pairs and counted RLS calls (10,000 keys), 4 connections," \
      "64 in flight, ${seconds} s each; ratios over the memory store's"
    declare -A pairs rls
    for store in memory redis; do
      QUOTAD_ENV="${QUOTAD_ENV:-} QUOTAD_RLS__RULES=$rules" start_quotad "$store"
      h="$(bench health | field .ops_per_s)"
      run="$(bench reserve-commit)"
      pairs[$store]="$(echo "$run" | field .ops_per_s)"
      counted="$(bench rls --rls-domain edge --accounts 10000)"
      rls[$store]="$(echo "$counted" | field .ops_per_s)"
      printf '%-7s health %8.0f /s   pairs %8.0f /s p99 %6s µs (%.2f)   RLS %8.0f /s p99 %6s µs (%.2f)\n' \
        "$store" "$h" "${pairs[$store]}" "$(echo "$run" | field .latency_us.p99)" \
        "$(jq -n "${pairs[$store]} / ${pairs[memory]}")" "${rls[$store]}" \
        "$(echo "$counted" | field .latency_us.p99)" "$(jq -n "${rls[$store]} / ${rls[memory]}")"
      stop
    done
    ;;
  replicas)
    cargo build --release --quiet --bin quotad --bin quotactl
    start_redis
    forwarded() { # sum of answered forwards over the replicas' metrics
      local n=0 h v
      for h in "${REPLICA_HTTP[@]}"; do
        v="$(curl -s "http://$h/metrics" | awk '/^quotad_forwarded_calls_total\{outcome="answered"\}/ {print int($2)}' | head -1)"
        n=$(( n + ${v:-0} ))
      done
      echo "$n"
    }
    echo "Redis, Reserve+Commit pairs, 6 connections, 64 in flight, ${seconds} s each"
    replica_start one
    ADDR="${REPLICA_GRPC[0]}"
    one="$(bench reserve-commit --connections 6)"
    replicas_stop
    for _ in 1 2 3; do replica_start three; done
    sleep 5 # every replica has joined and taken its partitions
    ADDR="${REPLICA_GRPC[0]}"
    before="$(forwarded)"
    three="$(bench reserve-commit --connections 6 --also "${REPLICA_GRPC[1]}" --also "${REPLICA_GRPC[2]}")"
    after="$(forwarded)"
    p1="$(echo "$one" | field .ops_per_s)"; p3="$(echo "$three" | field .ops_per_s)"
    # Calls over the whole run, warm-up included, as the counters count them.
    calls="$(echo "$three" | jq '.ops_per_s * (.duration_s + .warmup_s) * 2')"
    printf 'one replica     %8.0f pairs/s  p99 %6s µs\n' "$p1" "$(echo "$one" | field .latency_us.p99)"
    printf 'three replicas  %8.0f pairs/s  p99 %6s µs  (%.2f of one)  forwarded: %s calls, about %.0f%% of them\n' \
      "$p3" "$(echo "$three" | field .latency_us.p99)" "$(jq -n "$p3 / $p1")" "$((after - before))" \
      "$(jq -n "($after - $before) * 100 / $calls")"
    ;;
  week)
    if [ -n "${2:-}" ]; then export BENCH_DATA_DIR="$2"; fi
    cargo bench --bench data_dir
    ;;
  startup)
    DATA_DIR="${2:?the data dir of a week run: bench/figures.sh week DIR}"
    [ -d "$DATA_DIR" ] || { echo "no data dir at $DATA_DIR" >&2; exit 1; }
    cargo build --release --quiet --bin quotad --bin quotactl
    begin="$(date +%s%N)"
    start_quotad embedded
    up="$(date +%s%N)"
    target/release/quotactl --addr "$ADDR" usage acct-00000042 >/dev/null
    read_done="$(date +%s%N)"
    echo "data dir of $(du -sh "$DATA_DIR" | cut -f1): health answered after $(( (up - begin) / 1000000 )) ms (polled every 100 ms);" \
      "the first read of an account on disk then took $(( (read_done - up) / 1000000 )) ms (one quotactl call)"
    ;;
  soak)
    # A steady rate well under saturation, idle accounts leaving memory after SOAK_EVICT seconds
    # and short retention, so that what is kept reaches its steady state within minutes: first
    # answers and closed reservations kept SOAK_RETENTION seconds (holds live at most that
    # long), SOAK_RECENT charges of history per account, the export's default 100,000 charges.
    # After that, memory holds the active accounts and fjall's bounded buffers, and the data on
    # disk stops growing, so RSS should stop growing too.
    minutes="${SOAK_MINUTES:-10}"
    rate="${SOAK_RATE:-2000}"
    evict="${SOAK_EVICT:-30}"
    accounts="${SOAK_ACCOUNTS:-100000}"
    retention="${SOAK_RETENTION:-120}"
    recent="${SOAK_RECENT:-5}"
    QUOTAD_ENV="QUOTAD_STORE__EMBEDDED__EVICT_IDLE_SECONDS=$evict QUOTAD_LIMITS__DEFAULT_TTL_SECONDS=60
      QUOTAD_LIMITS__MAX_TTL_SECONDS=$retention QUOTAD_LIMITS__IDEMPOTENCY_RETENTION_SECONDS=$retention
      QUOTAD_LIMITS__RECENT_EVENTS=$recent" start_quotad embedded
    echo "data dir, $rate pairs/s over $accounts accounts (uniform) for $minutes min, idle accounts" \
      "evicted after $evict s, answers kept $retention s, $recent charges of history per account"
    samples="$(mktemp)"
    LENGTH="--duration $((minutes * 60))s --warmup 0s" \
      bench reserve-commit --rate "$rate" --accounts "$accounts" --zipf 0 --credit-share 0 \
      --over-limit-share 0 >"$samples.run" &
    load=$!
    start="$(date +%s)"
    while kill -0 "$load" 2>/dev/null; do
      t=$(( $(date +%s) - start ))
      rss="$(awk '/VmRSS/ {print $2}' "/proc/$QUOTAD_PID/status")"
      echo "$t $rss" >>"$samples"
      printf 't %4s s  RSS %6.1f MiB  data dir %s\n' "$t" "$(jq -n "$rss / 1024")" "$(du -sh "$DATA_DIR" | cut -f1)"
      sleep 10
    done
    wait "$load"
    echo "pairs/s: $(field .ops_per_s <"$samples.run"), p99 $(field .latency_us.p99 <"$samples.run") µs"
    # Least-squares slope of RSS over time, from the third minute on and over the second half:
    # fjall's buffers (memtables, block cache) fill during the first minutes.
    for from in 120 $((minutes * 30)); do
      awk -v from="$from" '$1 >= from { n++; sx += $1; sy += $2; sxx += $1*$1; sxy += $1*$2 }
        END { if (n < 2) { print "too few samples"; exit }
              slope = (n*sxy - sx*sy) / (n*sxx - sx*sx);
              printf "RSS slope after %d s: %.2f MiB per minute over %d samples\n", from, slope * 60 / 1024, n }' "$samples"
    done
    rm -f "$samples" "$samples.run"
    ;;
  redis-week)
    cargo bench --bench owned
    ;;
  redis-soak)
    # The soak above on Redis: one redis-server, three replicas on one key
    # prefix, the load's connections spread over all three (so most calls are forwarded to
    # their account's owner). The same short retention and idle eviction, so that what each
    # owner keeps reaches its steady state within minutes; after that its RSS should stop
    # growing. Redis keeps every account and, per partition, up to `export_max_len` (100,000)
    # charges of the export, which this run does not reach: its used_memory grows with the
    # export.
    minutes="${SOAK_MINUTES:-10}"
    rate="${SOAK_RATE:-1000}" # forwarding: most calls take a second hop on the same cores
    evict="${SOAK_EVICT:-30}"
    accounts="${SOAK_ACCOUNTS:-100000}"
    retention="${SOAK_RETENTION:-120}"
    recent="${SOAK_RECENT:-5}"
    cargo build --release --quiet --bin quotad --bin quotactl
    start_redis
    QUOTAD_ENV="QUOTAD_STORE__EMBEDDED__EVICT_IDLE_SECONDS=$evict QUOTAD_LIMITS__DEFAULT_TTL_SECONDS=60
      QUOTAD_LIMITS__MAX_TTL_SECONDS=$retention QUOTAD_LIMITS__IDEMPOTENCY_RETENTION_SECONDS=$retention
      QUOTAD_LIMITS__RECENT_EVENTS=$recent"
    for _ in 1 2 3; do replica_start soak; done
    sleep 5 # every replica has joined and taken its partitions
    ADDR="${REPLICA_GRPC[0]}"
    used() { redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r'; }
    exported() { # events in the export, over every partition's stream
      local n=0 key
      for key in $(redis-cli -p "$REDIS_PORT" --scan --pattern 'soak:*:x'); do
        n=$(( n + $(redis-cli -p "$REDIS_PORT" xlen "$key") ))
      done
      echo "$n"
    }
    echo "Redis, three replicas, $rate pairs/s over $accounts accounts (uniform) for $minutes min," \
      "6 connections spread over the replicas, idle accounts evicted after $evict s, answers kept" \
      "$retention s, $recent charges of history per account"
    redis_start="$(used)"
    samples="$(mktemp)"
    LENGTH="--duration $((minutes * 60))s --warmup 0s" \
      bench reserve-commit --rate "$rate" --accounts "$accounts" --zipf 0 --credit-share 0 \
      --over-limit-share 0 --connections 6 --also "${REPLICA_GRPC[1]}" --also "${REPLICA_GRPC[2]}" \
      >"$samples.run" &
    load=$!
    start="$(date +%s)"
    while kill -0 "$load" 2>/dev/null; do
      t=$(( $(date +%s) - start ))
      line="$t"
      for pid in "${REPLICA_PIDS[@]}"; do line="$line $(awk '/VmRSS/ {print $2}' "/proc/$pid/status")"; done
      echo "$line" >>"$samples"
      read -r _ r1 r2 r3 <<<"$line"
      printf 't %4s s  RSS %6.1f %6.1f %6.1f MiB  Redis used_memory %6.1f MiB\n' "$t" \
        "$(jq -n "$r1 / 1024")" "$(jq -n "$r2 / 1024")" "$(jq -n "$r3 / 1024")" "$(jq -n "$(used) / 1048576")"
      sleep 10
    done
    wait "$load"
    run="$(cat "$samples.run")"
    echo "pairs/s: $(echo "$run" | field .ops_per_s), p99 $(echo "$run" | field .latency_us.p99) µs," \
      "p99.9 $(echo "$run" | field .latency_us.p99_9) µs, errors: $(echo "$run" | jq -c .errors)"
    printf 'Redis used_memory at the start %.1f MiB, at the end %.1f MiB; %s charges in the export\n' \
      "$(jq -n "$redis_start / 1048576")" "$(jq -n "$(used) / 1048576")" "$(exported)"
    # Least-squares slope of each replica's RSS, after the retention and over the second half.
    for replica in 1 2 3; do
      for from in "$retention" $((minutes * 30)); do
        awk -v from="$from" -v col=$((replica + 1)) -v replica="$replica" \
          '$1 >= from { n++; sx += $1; sy += $col; sxx += $1*$1; sxy += $1*$col }
          END { if (n < 2) { printf "replica %d: too few samples after %d s\n", replica, from; exit }
                slope = (n*sxy - sx*sy) / (n*sxx - sx*sx);
                printf "replica %d: RSS slope after %d s: %.2f MiB per minute over %d samples\n", replica, from, slope * 60 / 1024, n }' "$samples"
      done
    done
    rm -f "$samples" "$samples.run"
    ;;
  memory)
    cargo bench --bench memory
    ;;
  admission)
    cargo bench --bench admission
    ;;
  redis-cost)
    # What a pair costs Redis itself, counted in instructions by callgrind: repeatable to a
    # fraction of a per cent on a shared machine, where times vary by tens. Two runs differ only
    # in the number of pairs, so start-up and the load generator's setup cancel out. Redis's
    # timers are slowed and quotad's lease renewals spaced out (and its waits for Redis made
    # long), so that the count does not depend on how long valgrind takes.
    command -v valgrind >/dev/null || { echo "needs valgrind" >&2; exit 1; }
    instructions() { # pairs, in flight; prints the instructions and the batches written
      local out; out="$(mktemp)"
      REDIS_UNDER="valgrind --tool=callgrind --callgrind-out-file=$out" \
      REDIS_ARGS="--hz 1 --enable-debug-command local" \
      QUOTAD_ENV="QUOTAD_STORE__REDIS__LEASE_MS=600000 QUOTAD_STORE__REDIS__COMMAND_TIMEOUT_MS=20000 QUOTAD_STORE__EMBEDDED__WRITE_TIMEOUT_MS=60000 ${QUOTAD_ENV:-}" \
        start_quotad redis
      redis-cli -p "$REDIS_PORT" debug set-active-expire 0 >/dev/null
      LENGTH="--requests $1 --warmup 0s" \
        bench reserve-commit --accounts 1000 --concurrency "$2" --connections 1 >/dev/null
      local batches
      batches="$(redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' |
        awk -F'[=,]' '/^cmdstat_exec:/ {print $2}')"
      stop # Redis writes the counts as it exits
      echo "$(grep -E '^(summary|totals):' "$out" | head -1 | awk '{print $2}') ${batches:-0}"
      rm -f "$out"
    }
    # At 4 in flight a batch holds a decision or two, as on a lightly loaded owner; at 32 a
    # batch holds many, as under load. Under valgrind Redis is far slower than quotad, so a
    # batch fills up to what is in flight: the batch size is printed beside each figure.
    for inflight in 4 32; do
      read -r few few_batches < <(instructions 1000 "$inflight")
      read -r many many_batches < <(instructions 3000 "$inflight")
      echo "Redis instructions per Reserve+Commit pair at $inflight in flight:" \
        "$(( (many - few) / 2000 )) (runs of 1,000 and 3,000 pairs: $few and $many;" \
        "$(jq -n "4000 / ($many_batches - $few_batches) | . * 10 | round / 10") decisions a batch)"
    done
    ;;
  *)
    sed -n '2,40p' "$0"
    exit 2
    ;;
esac
