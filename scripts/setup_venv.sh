# Sourced by scripts/test.sh and scripts/demo.sh: create the virtual environment and install the
# package with the extras given as the first argument.
#
# VENV (default .venv) picks the environment folder. TORCH_SPEC (default torch==2.13.0, a CPU
# build) is installed first so that the package's torch range does not pull a CUDA build.
setup_venv() {
  local extras="$1"
  VENV="${VENV:-.venv}"
  TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install --quiet -e ".[$extras]"
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
}
