#!/usr/bin/env bash
# Draws the README's pictures (docs/images/) from the demo sweep, so they are made by Chorus
# itself and never edited by hand: the demo's random sweep, then `chorus plot curves`, `parallel`
# and `importance` of it.
set -euo pipefail
cd "$(dirname "$0")/.."
CHORUS_DEMO_PICTURES=docs/images exec scripts/demo.sh "$@"
