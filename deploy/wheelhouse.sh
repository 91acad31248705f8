#!/usr/bin/env bash
# `make wheelhouse`: the packages of deploy/wheelhouse.txt as wheels for CPython $WHEEL_PYTHON on
# x86-64 Linux, into $WHEELHOUSE, for a GPU machine that has PyTorch but no package index.
# Usage: deploy/wheelhouse.sh PYTHON (the Python whose pip downloads them).
set -euo pipefail
python=$1
out=${WHEELHOUSE:-.whl}
version=${WHEEL_PYTHON:-3.12}
tag=cp${version/./}
platforms=(--platform manylinux2014_x86_64)
for n in 17 24 27 28 31 34 35 36 37 38 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
mkdir -p "$out"
grep -v -e '^#' -e '^[[:space:]]*$' "$(dirname "$0")/wheelhouse.txt" | while read -r requirement; do
    if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
            --implementation cp "${platforms[@]}" -d "$out" "$requirement" 2>/dev/null; then
        # Published as source only: built here, which is right for pure Python alone (checked below).
        "$python" -m pip wheel --quiet --no-deps -w "$out" "$requirement"
    fi
done
# A compiled wheel built here would be for this machine's Python, not the target's.
wrong=$(find "$out" -name '*.whl' ! -name '*-none-any.whl' ! -name "*-${tag}-*" -printf '%f\n')
if [ -n "$wrong" ]; then
    echo "wheelhouse: not for CPython $version: $wrong" >&2
    exit 1
fi
echo "wheelhouse: $(find "$out" -name '*.whl' | wc -l) wheels for CPython $version in $out"
