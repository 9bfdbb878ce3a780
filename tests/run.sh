#!/usr/bin/env bash
# Install what the tests need (as root, on Debian 12), then lint, type-check and run the suite.
# Extra arguments go to pytest, e.g. `tests/run.sh -k proxy -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/install.sh --test
venv=${POWERPLANE_VENV:-/opt/powerplane}
export PATH="$venv/bin:$PATH"
echo "==> ruff"; ruff check .
echo "==> mypy"; mypy
echo "==> pytest"
set +e
pytest -p no:cacheprovider -ra "$@"
rc=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure here, not a pass.
exit "$rc"
