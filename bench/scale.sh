#!/usr/bin/env bash
# Scale benchmark of the coordinator: the same simulated-worker load (bench/scale, the
# `chorus-scale` load generator) against two coordinator builds side by side, BASE (the build
# before the write-path changes, commit b8ac20c) and NEW (this checkout), alternating BASE then
# NEW for each case, then a side-by-side table.
#
#   bench/scale.sh [BASE_BIN_DIR] [NEW_BIN_DIR]
#
# A directory given holds a `chorus-coordinator` binary to use as is. Without one, NEW is
# `cargo build --release -p chorus-coordinator` of this checkout, and BASE is built once from
# commit $CHORUS_SCALE_BASE_REV (default b8ac20c) in a git worktree under
# ~/.cache/chorus/scale-base and kept there (delete that directory to rebuild).
#
# Sizes (space-separated lists run one case per entry):
#   CHORUS_SCALE_IDLE       workers of the idle case             (default "1000 5000 10000")
#   CHORUS_SCALE_REPORTS    in-flight trials of the reports case (default "1000")
#   CHORUS_SCALE_EVENTS     metric events per ReportTrial call in the reports case (default "1";
#                           a list runs one case per entry; workers batch what they have)
#   CHORUS_SCALE_GROWTH     TRIALSxSTEPS of the growth case      (default "200x500")
#   CHORUS_SCALE_QUERIES    WORKERSxTRIALS of the queries case   (default "5000x100000")
#   CHORUS_SCALE_QUICK=1    small sizes everywhere, short windows (a sanity run of a few minutes)
#   CHORUS_SCALE_WINDOW     measurement window (default 60s; 15s when quick)
#   CHORUS_SCALE_RUNS       runs of each case per build (default 1); the table shows medians
#   CHORUS_SCALE_LIMIT      time limit of one case in seconds (default 900): a case that has not
#                           finished by then is stopped and reported as such
#   CHORUS_SCALE_ENCODING   metric encoding, typed|json|both (default both: every build reads it)
#   CHORUS_SCALE_SCENARIOS  which cases (default "idle reports growth queries")
#   CHORUS_SCALE_ONLY       base|new: run one build only
#   CHORUS_SCALE_OUT        results file (JSON lines; default target/scale/results-TIMESTAMP.jsonl)
#
# Both the generator and the coordinator run on this machine and share its cores: the table
# shows each case's generator CPU next to the coordinator's, so a saturated machine is visible.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BASE_REV=${CHORUS_SCALE_BASE_REV:-b8ac20c}
CACHE=${CHORUS_SCALE_CACHE:-$HOME/.cache/chorus/scale-base}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

log() { printf '== %s\n' "$*" >&2; }

# The base build shares this checkout's target directory, so its dependencies are compiled once
# for both builds; its binary is copied out of it into the cache.
build_base() {
    local bin="$CACHE/bin-$BASE_REV/chorus-coordinator"
    if [[ -x "$bin" ]]; then
        echo "$CACHE/bin-$BASE_REV"
        return
    fi
    if [[ ! -d "$CACHE/src-$BASE_REV" ]]; then
        mkdir -p "$CACHE"
        git -C "$ROOT" worktree add --detach "$CACHE/src-$BASE_REV" "$BASE_REV" >&2
    fi
    log "building BASE ($BASE_REV) in $CACHE/src-$BASE_REV"
    (cd "$CACHE/src-$BASE_REV" && CARGO_TARGET_DIR="$TARGET" cargo build --release --locked -p chorus-coordinator >&2)
    mkdir -p "$CACHE/bin-$BASE_REV"
    cp "$TARGET/release/chorus-coordinator" "$bin.tmp"
    mv "$bin.tmp" "$bin"
    echo "$CACHE/bin-$BASE_REV"
}

build_new() {
    log "building NEW (this checkout)"
    cargo build --release --locked -p chorus-coordinator >&2
    mkdir -p "$TARGET/scale/new"
    cp "$TARGET/release/chorus-coordinator" "$TARGET/scale/new/chorus-coordinator"
    echo "$TARGET/scale/new"
}

# Built before NEW: both builds write target/release/chorus-coordinator, so each is copied out.
BASE_DIR=${1:-}
NEW_DIR=${2:-}
ONLY=${CHORUS_SCALE_ONLY:-}
if [[ "$ONLY" != new && -z "$BASE_DIR" ]]; then BASE_DIR=$(build_base); fi
if [[ "$ONLY" != base && -z "$NEW_DIR" ]]; then NEW_DIR=$(build_new); fi
log "building the load generator"
cargo build --release --locked -p chorus-scale >&2
GEN="$TARGET/release/chorus-scale"
if [[ -n "${CHORUS_SCALE_BUILD_ONLY:-}" ]]; then exit 0; fi

if [[ -n "${CHORUS_SCALE_QUICK:-}" ]]; then
    IDLE=${CHORUS_SCALE_IDLE:-"200 1000"}
    REPORTS=${CHORUS_SCALE_REPORTS:-"100"}
    GROWTH=${CHORUS_SCALE_GROWTH:-"50x100"}
    QUERIES=${CHORUS_SCALE_QUERIES:-"500x2000"}
    WINDOW=${CHORUS_SCALE_WINDOW:-15s}
    WARMUP=5s
else
    IDLE=${CHORUS_SCALE_IDLE:-"1000 5000 10000"}
    REPORTS=${CHORUS_SCALE_REPORTS:-"1000"}
    GROWTH=${CHORUS_SCALE_GROWTH:-"200x500"}
    QUERIES=${CHORUS_SCALE_QUERIES:-"5000x100000"}
    WINDOW=${CHORUS_SCALE_WINDOW:-60s}
    WARMUP=10s
fi
RUNS=${CHORUS_SCALE_RUNS:-1}
LIMIT=${CHORUS_SCALE_LIMIT:-900}
ENCODING=${CHORUS_SCALE_ENCODING:-both}
SCENARIOS=${CHORUS_SCALE_SCENARIOS:-"idle reports growth queries"}
OUT=${CHORUS_SCALE_OUT:-$TARGET/scale/results-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
mkdir -p "$(dirname "$OUT")"

builds=()
[[ -n "$BASE_DIR" ]] && builds+=("base=$BASE_DIR")
[[ -n "$NEW_DIR" ]] && builds+=("new=$NEW_DIR")

# One case against one build. The generator stops itself at the limit and still reports; the
# outer timeout is the backstop for a generator that cannot (its coordinator dies with it).
run_case() {
    local label=$1 dir=$2
    shift 2
    local line
    log "$label: $*"
    if line=$(timeout -k 30 $((LIMIT + 120)) "$GEN" --coordinator "$dir/chorus-coordinator" --label "$label" \
        --metric-encoding "$ENCODING" --time-limit "${LIMIT}s" --window "$WINDOW" --warmup "$WARMUP" "$@"); then
        :
    else
        local rc=$?
        if [[ -z "$line" ]]; then
            line=$(jq -cn --arg label "$label" --arg scenario "$1" --arg args "$*" --argjson rc "$rc" \
                '{label: $label, scenario: $scenario, args: $args, completed: false,
                  reason: "the generator exited with status \($rc) without a result (killed by the time limit?)"}')
        fi
    fi
    printf '%s\n' "$line" | tail -n 1 >>"$OUT"
}

cases=()
for s in $SCENARIOS; do
    case $s in
    idle) for n in $IDLE; do cases+=("idle --workers $n"); done ;;
    reports)
        for t in $REPORTS; do
            for e in ${CHORUS_SCALE_EVENTS:-1}; do
                cases+=("reports --workers $((t * 2)) --in-flight $t --events-per-call $e")
            done
        done
        ;;
    growth) for g in $GROWTH; do cases+=("growth --in-flight ${g%x*} --steps ${g#*x}"); done ;;
    queries) for q in $QUERIES; do cases+=("queries --workers ${q%x*} --trials ${q#*x}"); done ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
    esac
done

log "results go to $OUT"
for c in "${cases[@]}"; do
    for ((r = 1; r <= RUNS; r++)); do
        for b in "${builds[@]}"; do
            # shellcheck disable=SC2086 # the case is a word list on purpose
            run_case "${b%%=*}" "${b#*=}" $c
        done
    done
done
"$GEN" table "$OUT"
