#!/usr/bin/env bash
# Build third_party/miles-31f1ca9.tar.gz: the pip-installable subset of the pinned Miles snapshot
# (radixark/miles @ 31f1ca961a94cb860cec3b2dea34ec332bfa8f76, Apache-2.0), so CI can
# `pip install --no-deps third_party/miles-31f1ca9.tar.gz` without the shared/ folder.
#
# Kept: LICENSE, setup.py, pyproject.toml, requirements.txt (setup.py reads it at build time) and every
# *.py under miles/. Dropped: docs, examples, tests, scripts, tools, docker, miles_plugins/ (only
# imported by the Megatron backend, inside try/except), dashboard static assets, jinja templates and
# the CUDA kernel source (the last two are not installed by setup.py from the full tree either).
# The files are copied byte for byte; nothing is edited. The archive is deterministic (sorted names,
# fixed mtime/owner, gzip -n), so a rebuild from the same source gives the same bytes.
#
# usage: tools/vendor_miles.sh [SOURCE_TARBALL] [--verify]
#   SOURCE_TARBALL  default: <repo>/../shared/vendor/miles-31f1ca9.tar.gz
#   --verify        also pip-install the result into a temp dir and import miles.utils.types
#                   (uses $PYTHON, default python3; needs setuptools+wheel from the package index)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMIT_SHORT="31f1ca9"
SRC_SHA256="ba21bf15821e22172aafb64db9c8c1652827c4a56a4962b1f83b1bf2231ca7f8"
NAME="miles-${COMMIT_SHORT}"
MTIME="2026-08-21 00:00:00Z"  # commit date of the snapshot

SRC=""
VERIFY=0
for a in "$@"; do
  case "$a" in
    --verify) VERIFY=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) SRC="$a" ;;
  esac
done
SRC="${SRC:-$REPO/../shared/vendor/${NAME}.tar.gz}"
OUT_DIR="$REPO/third_party"
OUT="$OUT_DIR/${NAME}.tar.gz"

[ -f "$SRC" ] || { echo "source tarball not found: $SRC" >&2; exit 1; }
got="$(sha256sum "$SRC" | cut -d' ' -f1)"
if [ "$got" != "$SRC_SHA256" ]; then
  echo "sha256 mismatch for $SRC: got $got, expected $SRC_SHA256" >&2
  exit 1
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src" "$WORK/stage/$NAME"
tar -xzf "$SRC" -C "$WORK/src"

cd "$WORK/src"
for f in LICENSE setup.py pyproject.toml requirements.txt; do
  [ -f "$f" ] || { echo "missing $f in $SRC" >&2; exit 1; }
done
[ -f miles/__init__.py ] || { echo "missing miles/__init__.py in $SRC" >&2; exit 1; }
{
  printf '%s\n' LICENSE setup.py pyproject.toml requirements.txt
  find miles -type f -name '*.py' ! -path '*/__pycache__/*'
} | LC_ALL=C sort > "$WORK/files.txt"
# copy with the original permissions (cp -p), paths relative to the snapshot root
while IFS= read -r f; do
  mkdir -p "$WORK/stage/$NAME/$(dirname "$f")"
  cp -p "$f" "$WORK/stage/$NAME/$f"
done < "$WORK/files.txt"

mkdir -p "$OUT_DIR"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="$MTIME" --format=gnu \
  -C "$WORK/stage" -cf - "$NAME" | gzip -9n > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"

n_files="$(wc -l < "$WORK/files.txt")"
size="$(stat -c %s "$OUT")"
echo "wrote $OUT: $size bytes, $n_files files, sha256 $(sha256sum "$OUT" | cut -d' ' -f1)"

if [ "$VERIFY" = 1 ]; then
  PY="${PYTHON:-python3}"
  "$PY" -m pip install -q --no-deps --target "$WORK/site" "$OUT"
  (cd "$WORK" && PYTHONPATH="$WORK/site" "$PY" -c \
    "import miles.utils.types as t; print('import ok:', t.Sample.__module__, t.__file__)")
fi
