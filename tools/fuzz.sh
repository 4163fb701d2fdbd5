#!/usr/bin/env bash
# Coverage-guided fuzzing of everything in Skiff that parses guest or user bytes: the cargo-fuzz
# targets in fuzz/ (libFuzzer, with AddressSanitizer, debug assertions and overflow checks),
# bounded in time. Installs cargo-fuzz and a C++ compiler (libFuzzer is built from source) if
# absent, builds every target once, runs each for its share of the time, two at a time on
# machines with two or more cores, and prints a table. Fails on a crash, a hang (-timeout) or
# a failed assertion, naming the input that reproduces it.
#
#   tools/fuzz.sh [SECONDS_TOTAL]     (default 90; wall-clock time of the runs, build excluded)
#
# Corpora are kept in ${XDG_CACHE_HOME:-$HOME/.cache}/skiff/fuzz/TARGET and grow from run to
# run, cut down to a minimal set past 1000 inputs (without a usable cache folder, a temporary
# one is used); fuzz/seeds/TARGET are the hand-made starting inputs (fuzz/seeds/generate.py).
# Crashing inputs land in fuzz/artifacts/TARGET/. By hand, on the stable toolchain
# (RUSTC_BOOTSTRAP lets it take the -Z flags cargo-fuzz passes for the sanitizer):
#
#   RUSTC_BOOTSTRAP=1 cargo fuzz build                   # every target
#   RUSTC_BOOTSTRAP=1 cargo fuzz run virtio_block -- -max_total_time=60
#   RUSTC_BOOTSTRAP=1 cargo fuzz run virtio_block fuzz/artifacts/virtio_block/crash-...
#
# Time on 2 cores: the first build about 3-6 minutes (Skiff and its dependencies, instrumented;
# cargo-fuzz itself about 30 s more), later builds seconds; then SECONDS_TOTAL.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-90}
say() { echo "[fuzz] $*" >&2; }

# libfuzzer-sys compiles libFuzzer's C++ sources.
tools/need-packages.sh g++
if ! cargo fuzz --version >/dev/null 2>&1; then
	say "installing cargo-fuzz"
	cargo install --locked cargo-fuzz@0.13.2
fi

export RUSTC_BOOTSTRAP=1
# cargo fuzz has no --locked: check the lock file first, so a stale one fails here. A new
# dependency of Skiff itself needs fuzz/Cargo.lock updated too: `cargo update -p skiff` in fuzz/.
cargo fetch --locked --manifest-path fuzz/Cargo.toml
say "building the fuzz targets"
cargo fuzz build
bindir=fuzz/target/x86_64-unknown-linux-gnu/release
mapfile -t targets < <(cargo fuzz list)

cache=${XDG_CACHE_HOME:-$HOME/.cache}/skiff/fuzz
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then
	say "no usable cache folder $cache: corpora last for this run only"
	cache=$work/corpus
fi

jobs=$(nproc)
[ "$jobs" -gt 2 ] && jobs=2
share=$((budget * jobs / ${#targets[@]}))
[ "$share" -lt 5 ] && share=5
say "${#targets[@]} targets, ${share}s each, $jobs at a time"

run_target() {
	local t=$1 dict=() rc=0
	mkdir -p "$cache/$t" "fuzz/artifacts/$t"
	case $t in api_request | config_file) dict=(-dict=fuzz/dict/json.dict) ;; esac
	# A corpus only grows; past 1000 inputs it is cut down to those that keep its coverage.
	if [ "$(find "$cache/$t" -type f | wc -l)" -gt 1000 ]; then
		mkdir "$work/$t.merged"
		if "$bindir/$t" -merge=1 -timeout=10 "$work/$t.merged" "$cache/$t" >"$work/$t.merge.log" 2>&1; then
			rm -rf "$cache/$t" && mv "$work/$t.merged" "$cache/$t"
		fi
	fi
	# -timeout: an input running 10 s is a hang (the MMIO target turns a register access
	# that waits on the device's lock into one).
	"$bindir/$t" "${dict[@]}" -max_total_time="$share" -timeout=10 -rss_limit_mb=2048 \
		-print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
		"$cache/$t" "fuzz/seeds/$t" >"$work/$t.log" 2>&1 || rc=$?
	echo "$rc" >"$work/$t.rc"
}

running=0
for t in "${targets[@]}"; do
	if [ "$running" -ge "$jobs" ]; then
		wait -n || true
		running=$((running - 1))
	fi
	run_target "$t" &
	running=$((running + 1))
done
wait || true

failed=0
printf '%-16s %12s %8s %8s\n' target executions corpus crashes
for t in "${targets[@]}"; do
	log=$work/$t.log
	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
	corpus=$(find "$cache/$t" -type f | wc -l)
	crashes=0
	if [ "$(cat "$work/$t.rc")" != 0 ]; then
		crashes=1
		failed=1
	fi
	printf '%-16s %12s %8s %8s\n' "$t" "${runs:-?}" "$corpus" "$crashes"
done
if [ "$failed" = 1 ]; then
	for t in "${targets[@]}"; do
		[ "$(cat "$work/$t.rc")" = 0 ] && continue
		say "$t failed:"
		# The panic or sanitizer report, and the frames of Skiff's code in its stack.
		{
			grep -m 1 -A 2 'panicked at' "$work/$t.log" || true
			grep -m 1 -A 3 -E '(ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|^ALARM)' "$work/$t.log" || true
			grep -m 8 -E '#[0-9]+ 0x[0-9a-f]+ in skiff' "$work/$t.log" || true
		} >&2
		input=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$work/$t.log" | tail -n 1)
		say "reproducer: ${input:-none written}"
		[ -n "$input" ] && say "rerun it: RUSTC_BOOTSTRAP=1 cargo fuzz run $t $input"
	done
	exit 1
fi
say "no crash, hang or failed check"
