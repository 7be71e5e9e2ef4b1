# Sourced by bench/gpu_check.sh and bench/gpu_train_check.sh from the repo root, with OUT and BUDGET_S set
# (WHEELS, the folder of carried wheels, defaults to .whl).
# BUDGET_S counts from here (installs, imports and the run alike): DEADLINE is when the script must be done.
# Picks the Python (PYTHON, else python3, else .venv/bin/python). Where that Python lacks what the runs import
# (the box has torch but not deepspeed & co), the carried wheels of .whl/ are checked complete against
# bench/gpu_wheels.txt and the box's packages (bench/gpu_wheels.py) and installed into /tmp/site; a missing or
# incomplete .whl/ stops the script at once (exit 3), before any device time goes into installs or imports.
# Then records nvidia-smi and the versions, and defines bounded_run.
DEADLINE=$(( $(date +%s) + BUDGET_S ))
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && ! "$PY" -c 'import torch' 2>/dev/null; then PY=.venv/bin/python; fi
have='import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("torch", "deepspeed", "rotary_embedding_torch", "hjson", "pydantic", "soundfile")))'
WHEELS="${WHEELS:-.whl}"
if ! "$PY" -c "$have" 2>/dev/null; then
    if ! "$PY" bench/gpu_wheels.py check "$WHEELS"; then
        echo "error: $PY lacks deepspeed (or another package the runs import) and $WHEELS/ cannot supply it (above)." >&2
        echo "Prepare .whl/ with 'make gpu-wheels' in the repo root here, then call the device tool with carry=[\".whl\"]." >&2
        exit 3
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true; fi
"$PY" -c 'import torch, deepspeed, rotary_embedding_torch; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "cuda", torch.cuda.is_available())'
echo "budget ${BUDGET_S} s; $(( DEADLINE - $(date +%s) )) s left after set-up"

# bounded_run NAME ARGS...: bench/NAME.py --out $OUT/NAME.json --deadline $DEADLINE ARGS, its output also in
# $OUT/NAME.log; returns its exit status. The script stops itself by the deadline (and rewrites its JSON as
# it goes); `timeout` is the backstop 15 s later (SIGTERM, which the scripts turn into a clean stop; SIGKILL 10 s on).
bounded_run() {
    local name=$1
    shift
    set +e
    timeout -k 10 $(( DEADLINE - $(date +%s) + 15 )) "$PY" "bench/$name.py" --out "$OUT/$name.json" --deadline "$DEADLINE" "$@" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    set -e
    echo "$name exit status $status after $(( BUDGET_S - DEADLINE + $(date +%s) )) s of ${BUDGET_S}; results in $OUT/$name.json"
    return "$status"
}
