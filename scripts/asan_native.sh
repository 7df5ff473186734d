#!/usr/bin/env bash
# lmnet's native CPU kernels under AddressSanitizer: builds them with -fsanitize=address into a
# cache of their own (the normal build is untouched) and runs pytest with the sanitizer's runtime
# preloaded, so a read or write outside a tensor stops the run with the line that did it.
#
#   bash scripts/asan_native.sh                       # the kernels' tests and two training tests
#   bash scripts/asan_native.sh tests/engine/test_train.py -k resume
#
# Needs gcc's libasan (Debian: part of gcc). libstdc++ is preloaded too: without it the
# sanitizer cannot intercept C++ exceptions and aborts at the first one any library throws.
# The test that builds without a compiler is left out (its subprocess would not find the
# preloaded runtime's build).
set -euo pipefail
cd "$(dirname "$0")/.."
asan="$(gcc -print-file-name=libasan.so)"
stdcxx="$(gcc -print-file-name=libstdc++.so.6)"
[ -f "$asan" ] || { echo "no libasan.so from gcc here: install gcc's sanitizer runtime" >&2; exit 2; }
[ "$#" -gt 0 ] || set -- tests/layers/test_fast_path.py tests/layers/test_depthwise.py \
    tests/layers/test_native_attention.py tests/layers/test_dropout.py \
    tests/layers/test_layer_norm.py tests/engine/test_train_seams.py \
    "tests/engine/test_experiments.py::test_matrix_skip_resume_and_tables"
export LMNET_NATIVE_CACHE="${LMNET_ASAN_CACHE:-${TMPDIR:-/tmp}/lmnet-native-asan}"
export ASAN_OPTIONS="detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
LD_PRELOAD="$asan $stdcxx" python - "$@" <<'EOF'
import sys

import lmnet.layers.native as native

native._FLAGS = [*native._FLAGS, "-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
import pytest  # noqa: E402

sys.exit(pytest.main(["-q", "-p", "no:faulthandler", "-p", "no:cacheprovider",
                      # these two start plain subprocesses (no sanitizer, another build name)
                      "-k", "not (without_a_compiler or never_compiles)", *sys.argv[1:]]))
EOF
