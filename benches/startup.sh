#!/bin/bash
# Seconds from launch to the first completed training iteration of `caml-wgpu train --iters 1
# --val-every 0`, with the given cache folder (CAML_PIPELINE_CACHE): run it once with an empty
# folder (cold), then again (warm). Extra arguments go to `train` (e.g. --data DIR --preset small).
#
#   benches/startup.sh /tmp/cache             # cold
#   benches/startup.sh /tmp/cache             # warm
set -u
cache=$1; shift
bin=${CAML_WGPU:-target/release/caml-wgpu}
out=$(mktemp -d)
t0=$(date +%s%N)
CAML_PIPELINE_CACHE=$cache "$bin" train --iters 1 --val-every 0 --out "$out/run" "$@" > "$out/stdout" 2>&1 &
pid=$!
while ! grep -q '^1,' "$out/run/log.csv" 2>/dev/null; do
    sleep 0.02
    kill -0 $pid 2>/dev/null || break
done
first=$(( ($(date +%s%N) - t0) / 1000000 ))
wait $pid
rc=$?
[ $rc = 0 ] || cat "$out/stdout"
echo "first iteration ${first} ms after launch (exit status $rc; load $(cut -d' ' -f1-3 /proc/loadavg))"
rm -rf "$out"
exit $rc
