#!/usr/bin/env bash
# Runs the fuzz targets under fuzz/ (cargo fuzz, libFuzzer) for a short time each.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to $CHORUS_FUZZ_SECONDS, else 60; 0 only replays the committed seeds
# and regressions. TARGETs default to every target (`cargo fuzz list --fuzz-dir fuzz`).
#
# Each target starts from three corpus directories: a working corpus kept in the cache (first, so
# libFuzzer adds what it finds there and every run continues from the last), the seeds committed
# in fuzz/seeds/TARGET and the reproducers of past crashes in fuzz/regressions/TARGET. The build
# is cached under ${CHORUS_CACHE:-~/.cache/chorus}/fuzz as well, outside the repository, so only
# the first run on a machine pays for it. A crash, a panic, an input slower than
# $CHORUS_FUZZ_TIMEOUT seconds (default 10) or one allocation over 256 MiB fails the script; the
# input is saved under fuzz/artifacts/TARGET/ and its path printed with the command that replays it.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-${CHORUS_FUZZ_SECONDS:-60}}"
[ $# -gt 0 ] && shift
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
  echo "fuzz: SECONDS_PER_TARGET must be a whole number, got '$seconds'" >&2
  exit 2
fi
timeout_s="${CHORUS_FUZZ_TIMEOUT:-10}"

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cache="${CHORUS_CACHE:-$HOME/.cache/chorus}/fuzz"
mkdir -p "$cache"

# cargo fuzz builds with AddressSanitizer (`-Zsanitizer=address`), which stable rustc accepts only
# with RUSTC_BOOTSTRAP=1; no nightly toolchain is needed. `--sanitizer none` also works on stable
# without it, but then libFuzzer cannot see allocations, and `-malloc_limit_mb` (our check that no
# input makes a parser allocate without bound) does nothing. Set it for every cargo call here:
# cargo caches rustc's answers per target directory, including a refusal given without it.
export RUSTC_BOOTSTRAP=1
fuzz=(cargo fuzz)
common=(--fuzz-dir fuzz --target-dir "$cache/target")

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <("${fuzz[@]}" list --fuzz-dir fuzz)
fi

echo "fuzz: building the fuzz targets (cached in $cache/target)" >&2
"${fuzz[@]}" build "${common[@]}" >&2

failed=()
for t in "${targets[@]}"; do
  corpus=("$cache/corpus/$t" "fuzz/seeds/$t")
  [ -d "fuzz/regressions/$t" ] && corpus+=("fuzz/regressions/$t")
  mkdir -p "$cache/corpus/$t" "fuzz/artifacts/$t"
  if [ "$seconds" -eq 0 ]; then
    limit=(-runs=0)
  else
    limit=(-max_total_time="$seconds")
  fi
  # A target's tokens (keys of the grammar, edge values) help libFuzzer past the parser's surface.
  [ -f "fuzz/dicts/$t.dict" ] && limit+=(-dict="fuzz/dicts/$t.dict")
  before="$(ls -1 "fuzz/artifacts/$t")"
  echo "fuzz: $t for ${seconds}s" >&2
  log="$cache/$t.log"
  if "${fuzz[@]}" run "${common[@]}" "$t" "${corpus[@]}" -- \
      "${limit[@]}" -timeout="$timeout_s" -rss_limit_mb=2048 -malloc_limit_mb=256 \
      -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' "$log" | tr '\n' ' ' >&2 || true
    echo >&2
  else
    # What went wrong (the panic message or the sanitizer's report, without stack frames), then
    # the input; the whole log stays in $log.
    grep -m1 -A15 -E "panicked at|ERROR: (AddressSanitizer|libFuzzer)" "$log" |
      grep -vE '^ *(#[0-9]+ 0x|[0-9]+: |at )' >&2 || tail -n 40 "$log" >&2
    grep -E '^(SUMMARY|Base64):' "$log" >&2 || true
    new="$(comm -13 <(echo "$before") <(ls -1 "fuzz/artifacts/$t") | sed "s|^|fuzz/artifacts/$t/|")"
    echo "fuzz: $t FAILED; reproducer: ${new:-none saved (see $log)}" >&2
    for f in $new; do
      # libFuzzer names a crash by the SHA-1 of its input: say when it is a known regression.
      for r in fuzz/regressions/"$t"/*; do
        [ -f "$r" ] && [ "crash-$(sha1sum <"$r" | cut -c1-40)" = "$(basename "$f")" ] &&
          echo "fuzz: $f is the recorded regression $r" >&2
      done
      echo "fuzz: replay with: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz --target-dir $cache/target $t $f" >&2
    done
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${#failed[@]} of ${#targets[@]} targets failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets ran clean" >&2
