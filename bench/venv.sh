# Sourced by the benchmark scripts: the bench-only Python environment, outside the repository
# ($CHORUS_BENCH_VENV, default ~/.cache/chorus/bench-venv), made on first use with packages from
# PyPI only. After sourcing, "$venv/bin/python" is its interpreter.
#   bench_torch   makes sure it holds torch==2.11.0 (the anchor of the training benchmarks)
#   bench_optuna  makes sure it holds optuna==5.0.0 (the anchor of the search benchmarks)
#   bench_curves  makes sure it holds numpy and scikit-learn (bench/curves.py trains with them)
cache="${CHORUS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chorus}"
venv="${CHORUS_BENCH_VENV:-$cache/bench-venv}"

bench_python_has() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$1" 2>/dev/null
}

bench_torch() {
  if ! bench_python_has 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.11.0")'; then
    echo "bench: making $venv with torch==2.11.0" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --find-links "$cache/wheels" torch==2.11.0
  fi
}

bench_optuna() {
  if ! bench_python_has 'import optuna, sys; sys.exit(optuna.__version__ != "5.0.0")'; then
    echo "bench: installing optuna==5.0.0 into $venv" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet optuna==5.0.0
  fi
}

bench_curves() {
  if ! bench_python_has 'import numpy, sklearn, sys; sys.exit(numpy.__version__ != "2.4.6" or sklearn.__version__ != "1.8.0")'; then
    echo "bench: installing numpy==2.4.6 scikit-learn==1.8.0 into $venv" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet numpy==2.4.6 scikit-learn==1.8.0
  fi
}
