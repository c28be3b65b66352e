# Sourced by each example's run.sh from the repository root: a .venv with shitate installed (and the extras
# named as arguments, e.g. `source examples/setup.sh eval`), made on first use.
if [ ! -x .venv/bin/shitate ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
if [ $# -gt 0 ]; then
  .venv/bin/pip install --quiet -e ".[$(IFS=,; echo "$*")]"
else
  .venv/bin/pip install --quiet -e .
fi
