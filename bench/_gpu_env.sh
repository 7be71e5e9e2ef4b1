# Sourced by bench/gpu_check.sh and bench/gpu_train_check.sh, from the repo root, with OUT set: picks the
# Python (PYTHON, else python3, else .venv/bin/python), installs the carried wheels of .whl/ where that
# Python lacks what they hold (a venv that has them, here, skips this), records nvidia-smi and the versions,
# and defines bounded_run.
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && ! "$PY" -c 'import torch' 2>/dev/null; then PY=.venv/bin/python; fi
have='import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("deepspeed", "rotary_embedding_torch", "hjson", "pydantic", "soundfile")))'
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "$have"; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true; fi
"$PY" -c 'import torch, deepspeed, rotary_embedding_torch; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "cuda", torch.cuda.is_available())'

# bounded_run SECONDS NAME ARGS...: bench/NAME.py --out $OUT/NAME.json ARGS, stopped after SECONDS, its output
# also in $OUT/NAME.log; returns its exit status. The scripts rewrite their JSON as they go, so a stop keeps
# whatever finished.
bounded_run() {
    local seconds=$1 name=$2
    shift 2
    set +e
    timeout "$seconds" "$PY" "bench/$name.py" --out "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    set -e
    echo "$name exit status $status; results in $OUT/$name.json"
    return "$status"
}
