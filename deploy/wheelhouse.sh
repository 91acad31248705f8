#!/usr/bin/env bash
# `make wheelhouse`: the packages of deploy/wheelhouse.txt as wheels for CPython $WHEEL_PYTHON on
# x86-64 Linux, into $WHEELHOUSE, for a GPU machine that has PyTorch but no package index.
# Usage: deploy/wheelhouse.sh PYTHON (the Python whose pip downloads them).
# The wheels are fetched into a new folder first and replace the folder's old wheels only when
# all of them came and all are for that Python: no stale version or other Python stays beside.
set -euo pipefail
python=$1
out=${WHEELHOUSE:-.whl}
version=${WHEEL_PYTHON:-3.12}
tag=cp${version/./}
platforms=(--platform manylinux2014_x86_64)
for n in 17 24 27 28 31 34 35 36 37 38 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
mkdir -p "$out"
fresh=$(mktemp -d "${TMPDIR:-/tmp}/wheelhouse.XXXXXX")
trap 'rm -rf "$fresh"' EXIT
grep -v -e '^#' -e '^[[:space:]]*$' "$(dirname "$0")/wheelhouse.txt" | while read -r requirement; do
    if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
            --implementation cp "${platforms[@]}" -d "$fresh" "$requirement" </dev/null 2>"$fresh/why"; then
        # Published as source only: built here, which is right for pure Python alone (checked below).
        "$python" -m pip wheel --quiet --no-deps -w "$fresh" "$requirement" </dev/null \
            || { cat "$fresh/why" >&2; exit 1; }
    fi
done
# A compiled wheel built here would be for this machine's Python, not the target's.
wrong=$(find "$fresh" -name '*.whl' ! -name '*-none-any.whl' ! -name "*-${tag}-*" ! -name '*-abi3-*' \
    -printf '%f\n')
if [ -n "$wrong" ]; then
    echo "wheelhouse: not for CPython $version: $wrong" >&2
    exit 1
fi
find "$out" -maxdepth 1 -name '*.whl' -delete
mv "$fresh"/*.whl "$out"/
echo "wheelhouse: $(find "$out" -maxdepth 1 -name '*.whl' | wc -l) wheels for CPython $version in $out"
