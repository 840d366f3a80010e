#!/usr/bin/env bash
# Set up the aarch64 (ARM NEON) build-and-run environment of the TVM backend. Idempotent:
# what exists in the cache dir is reused.
#
#   bash .ci/arm_setup.sh                 # kernels route + full (Relax VM) route
#   bash .ci/arm_setup.sh --kernels-only  # kernels route only (no arm64 root, ~20 s cold)
#
# Kernels route (run_under_qemu of the test harness tests/qemu.py: single TVM kernels, what
# tests/test_arm.py needs):
#  1. apt-get installs what is missing of gcc-aarch64-linux-gnu + libc6-dev-arm64-cross
#     (cross compiler, and the aarch64 glibc that is also the emulated system root) and
#     qemu-user-static (runs aarch64 programs on x86; no binfmt needed).
#  2. builds the aarch64 kernel runner (C, against TVM-FFI's headers; source in
#     tests/qemu.py) into the cache dir: it dlopen()s an exported library under
#     `qemu-aarch64-static -L /usr/aarch64-linux-gnu` and provides the few runtime hooks TVM
#     kernels call (parallel launch, workspace, errors).
#  3. self-test: bqc's binary dense for aarch64, `cnt` in its assembly, qemu run == numpy.
#
# Full route (run_vm_under_qemu: whole Relax VM executables with TVM's real aarch64 runtime):
#  4. debootstrap (apt) --foreign an arm64 Debian bookworm root with python3.11, unpacked with
#     dpkg -x into $ROOT/rootfs (~250 MB);
#  5. the host pip installs the aarch64 wheels of apache-tvm (same version as the host's),
#     apache-tvm-ffi and numpy into $ROOT/site; TVM's compiler library is deleted (runtime only);
#  6. self-test: a Relax VM executable (call_tir of the binary dense) run in the root == numpy.
#
# Env: BQC_ARM_ROOT (cache dir, default ~/.cache/bqc/arm64), PYTHON (interpreter with bqc and
#      tvm; default python3), BQC_DEBIAN_MIRROR (default http://deb.debian.org/debian),
#      BQC_ARM_NO_SELFTEST=1 (skip the self-tests).
set -euo pipefail

FULL=1
for arg in "$@"; do
  case "$arg" in
    --kernels-only) FULL=0 ;;
    --full) FULL=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "arm_setup: unknown argument $arg (use --kernels-only or --full)" >&2; exit 2 ;;
  esac
done

ROOT="${BQC_ARM_ROOT:-$HOME/.cache/bqc/arm64}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
HARNESS="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/qemu.py"  # the qemu test harness
MIRROR="${BQC_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
t0=$(date +%s)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu)
[ -e /usr/aarch64-linux-gnu/lib/crti.o ] || need+=(libc6-dev-arm64-cross)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
if [ "$FULL" = 1 ] && [ ! -x "$ROOT/rootfs/usr/bin/python3.11" ]; then
  command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
fi

if [ "${#need[@]}" -gt 0 ]; then
  if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
    echo "arm_setup: need root (or sudo) to apt-get install ${need[*]}" >&2
    exit 1
  fi
  echo "arm_setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # wait for other apt/dpkg users instead of failing on the lock
  APT_OPTS=(-o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
  $SUDO apt-get "${APT_OPTS[@]}" update -qq
  $SUDO apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "arm_setup: toolchain present (aarch64-linux-gnu-gcc, qemu-aarch64-static)"
fi
t1=$(date +%s)

mkdir -p "$ROOT"
export BQC_ARM_ROOT="$ROOT"
runner=$("$PY" "$HARNESS" build-runner)
echo "arm_setup: runner $runner"
if [ "${BQC_ARM_NO_SELFTEST:-0}" != "1" ]; then
  "$PY" "$HARNESS" selftest
fi
t2=$(date +%s)
echo "arm_setup: kernels route ready in $((t2 - t0)) s (apt $((t1 - t0)) s)"

if [ "$FULL" = 1 ]; then
  DEBOOTSTRAP=$(command -v debootstrap || echo /usr/sbin/debootstrap)
  if [ ! -x "$ROOT/rootfs/usr/bin/python3.11" ]; then
    echo "arm_setup: building the arm64 root (debootstrap --foreign, dpkg -x)"
    tmp="$ROOT/rootfs.tmp"
    $SUDO rm -rf "$tmp"
    $SUDO "$DEBOOTSTRAP" --foreign --arch=arm64 --variant=minbase \
      --include=python3.11-minimal,libpython3.11-stdlib bookworm "$tmp" "$MIRROR" >"$ROOT/debootstrap.log" 2>&1 \
      || { tail -20 "$ROOT/debootstrap.log" >&2; exit 1; }
    for deb in "$tmp"/var/cache/apt/archives/*.deb; do
      $SUDO dpkg -x "$deb" "$tmp"
    done
    $SUDO rm -f "$tmp"/var/cache/apt/archives/*.deb
    [ -z "$SUDO" ] || $SUDO chown -R "$(id -u):$(id -g)" "$tmp"
    mv "$tmp" "$ROOT/rootfs"
  fi
  tvm_ver=$("$PY" -c "import tvm; print(tvm.__version__)")
  stamp="$ROOT/site/.bqc-apache-tvm-$tvm_ver"
  if [ ! -e "$stamp" ]; then
    echo "arm_setup: installing aarch64 wheels (apache-tvm==$tvm_ver, numpy) into $ROOT/site"
    rm -rf "$ROOT/site.tmp"
    "$PY" -m pip install -q --disable-pip-version-check --no-warn-script-location \
      --platform manylinux_2_28_aarch64 --only-binary=:all: --python-version 3.11 --implementation cp \
      --target "$ROOT/site.tmp" "apache-tvm==$tvm_ver" numpy >"$ROOT/pip.log" 2>&1 \
      || { tail -30 "$ROOT/pip.log" >&2; exit 1; }
    rm -f "$ROOT/site.tmp/tvm/lib/libtvm_compiler.so"  # 240 MB; the VM driver needs the runtime only
    touch "$ROOT/site.tmp/.bqc-apache-tvm-$tvm_ver"
    rm -rf "$ROOT/site"
    mv "$ROOT/site.tmp" "$ROOT/site"
  fi
  if [ "${BQC_ARM_NO_SELFTEST:-0}" != "1" ]; then
    "$PY" "$HARNESS" selftest-vm
  fi
fi
t3=$(date +%s)
echo "arm_setup: done in $((t3 - t0)) s (apt $((t1 - t0)) s, kernels $((t2 - t1)) s, arm64 root $((t3 - t2)) s); cache dir $ROOT"
