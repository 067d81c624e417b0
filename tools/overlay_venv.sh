#!/usr/bin/env bash
# Makes DIR a virtual environment (unless it is one already) that sees
# BASE_PYTHON's packages after its own, through a .pth file: what is installed
# into DIR wins, everything else (torch, numpy, pytest...) is BASE_PYTHON's.
# Not --system-site-packages: for a virtual environment such as .venv, that
# would be the base interpreter's packages, not the environment's.  Install
# into DIR with
#   BASE_PYTHON -m pip --python DIR/bin/python install --ignore-installed ...
# (--ignore-installed: beside BASE_PYTHON's copy of a package, never
# uninstalling it).  Used by test_wheel.sh and test_torch_version.sh.
#
#   bash tools/overlay_venv.sh BASE_PYTHON DIR
set -euo pipefail
BASE_PYTHON=${1:?usage: $0 BASE_PYTHON DIR}
DIR=${2:?usage: $0 BASE_PYTHON DIR}
[ -x "$DIR/bin/python" ] || "$BASE_PYTHON" -m venv --without-pip "$DIR"
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
purelib "$BASE_PYTHON" > "$(purelib "$DIR/bin/python")/base-packages.pth"
