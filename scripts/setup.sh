#!/usr/bin/env bash
# Sets up a fresh machine for xaiserve: system packages (Debian), the CPU torch wheel, and the
# package itself with its test tools. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)  # DICOM IOD validator of the DICOM output tests
# headless browser of the web viewer's tests (tests/test_web_browser.py, driven by selenium)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
# torch first, pinned, so that nothing below pulls a multi-GB CUDA build (the package metadata
# only asks for a compatible range, which this wheel satisfies)
$PY -m pip install -q --disable-pip-version-check torch==2.13.0
# every extra: training (train), the spiral runtime's numba (spiral), tests and linters (test, dev),
# PyAV for bench/bench_stream.py (bench)
$PY -m pip install -q --disable-pip-version-check -e ".[train,spiral,test,dev,bench]"
# the ONNX-to-torch converter of ONNX-only user models (handlers/nets/onnx_torch.py). --no-deps: it
# declares torchvision, which would pull another (CUDA) torch; it needs it only for two detection
# ops, and its other requirements (torch, onnx, numpy) are installed above
$PY -m pip install -q --disable-pip-version-check --no-deps onnx2torch==1.5.15
echo "setup: done ($($PY -c 'import torch, onnxruntime; print("torch", torch.__version__, "onnxruntime", onnxruntime.__version__)'))"
