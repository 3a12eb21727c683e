#!/usr/bin/env bash
# The GPU rows that issues 17 and 18 still lack (docs/speed.md, "GPU."), in one device call of at most ~540 s:
#   (a) bench/speed.py, NestedUNet + DS at 96x96, batch 16 and 64: ours against the seed loop, img/s and MFU; alone
#       on the GPU first, then ours with --compile reduce-overhead (CUDA graphs) at batch 64;
#   (b) configs/dsb2018_96_NestedUNet_wDS_bcedice.yml, 100 epochs, --loader device, then val.py on its validation
#       split and on dsb2018_test_96;
#   (c) configs/dsb2018_96_NestedUNet_wDS_bcedice_b64.yml, 100 epochs, --loader device;
# (b), (c) and the CUDA-graphs row of (a) share the GPU (under CUDA MPS where it starts). Each part has a timeout
# that ends it before the whole call's; what finished comes back: *.log, b16_log.csv, b64_log.csv,
# b16_val_scores.csv, b16_test_scores.csv and summary.json (the figures against the goals), 8 files under $OUT.
#
#   bash bench/gpu_session.sh          # on the device; carry .whl, inputs/dsb2018_96, inputs/dsb2018_test_96
#   OUT=/tmp/o bash bench/gpu_session.sh --dry    # the same steps on the CPU: 32x32 synthetic images, 1 epoch
# GPU_SESSION_SECONDS (default 540) is the time the whole may take.
#
# .whl holds albumentations and what python3 there lacks (KINDS.md's list; typing-extensions is there, but pydantic
# 2.14 needs >= 4.16), fetched once in the repository's root (/.whl/ is in .gitignore), 7.7 MB:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl albumentations==2.0.8 \
#     albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
DRY=0
[ "${1:-}" = --dry ] && DRY=1
: "${OUT:?OUT must name the folder for the results}"
mkdir -p "$OUT"
# the logs are appended to and the summary reads every row of them: an earlier session's would pass for this one's
[ -z "$(ls -A "$OUT")" ] || { echo "error: OUT=$OUT is not empty: give a new or empty folder" >&2; exit 1; }
END=$((SECONDS + ${GPU_SESSION_SECONDS:-540} - 15))  # 15 s kept for the copies and the summary
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK" || exit 1

# part LOG SECONDS COMMAND...: the command under a timeout of at most SECONDS and at most what is left of the call,
# its output appended to $OUT/LOG.log; returns its exit status
part() {
    local log=$1 cap=$2 left=$((END - SECONDS))
    shift 2
    [ "$left" -lt "$cap" ] && cap=$left
    [ "$cap" -gt 0 ] || { echo "$log: no time left for $*" | tee -a "$OUT/$log.log"; return 124; }
    echo "== $(date +%T) $* (timeout ${cap} s)" >>"$OUT/$log.log"
    timeout -k 10 "$cap" "$@" >>"$OUT/$log.log" 2>&1
    local rc=$?
    echo "$log: exit $rc after $*" | tee -a "$OUT/$log.log"
    return $rc
}

if [ $DRY = 1 ]; then
    export OMP_NUM_THREADS=1  # the parts that run at once share a few CPUs
    DEV=cpu TRAIN=syn_train TEST=syn_test
    "$PY" "$REPO/synthetic.py" --out inputs/syn_train --num_images 12 --size 32 >/dev/null || exit 1
    "$PY" "$REPO/synthetic.py" --out inputs/syn_test --num_images 4 --size 32 --seed 1000 >/dev/null || exit 1
    # --in_process: a fresh interpreter per measurement, as on the device, only adds its imports here (tests cover
    # speed.py's measuring subprocesses themselves)
    SPEED=(--size 32 --num_images 24 --steps 1 --repeats 1 --warmup 0 --num_workers 0 --in_process)
    BATCHES=(4) GRAPHS=()  # compiling on the CPU takes minutes, and without it the row is the first one again
    SMALL=(--epochs 1 --input_h 32 --input_w 32 --batch_size 4 --num_workers 0)
else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$REPO"/.whl/*.whl || { echo "carry .whl (see this script's header)"; exit 1; }
    export PYTHONPATH=/tmp/site
    nvidia-smi
    "$PY" -c 'import torch, albumentations as A; print("torch", torch.__version__, "cuda", torch.version.cuda,
torch.cuda.get_device_name(0), "albumentations", A.__version__)' || exit 1
    if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then
        trap 'echo quit | nvidia-cuda-mps-control; rm -rf "$WORK"' EXIT
        timeout 60 "$PY" -c 'import torch; torch.ones(1, device="cuda").sum().item()' ||
            { echo quit | nvidia-cuda-mps-control; echo "MPS refused CUDA: plain concurrent processes"; }
    fi
    ln -s "$REPO/inputs" inputs
    DEV=cuda TRAIN=dsb2018_96 TEST=dsb2018_test_96
    SPEED=(--num_images 640 --repeats 2 --num_workers 8)
    BATCHES=(16 64) GRAPHS=(--compile reduce-overhead --batch_sizes 64)
    SMALL=()
fi
# val.py as users run it, its scores printed as one line "SCORES <what> <JSON>" for the summary
SCORE=(env "PYTHONPATH=$REPO:${PYTHONPATH:-}" "$PY" -c
       'import json, sys, utils, val; what = sys.argv.pop(1); print("SCORES", what, json.dumps(utils.run_cli(val.main)))')
B16=configs/dsb2018_96_NestedUNet_wDS_bcedice.yml
B64=configs/dsb2018_96_NestedUNet_wDS_bcedice_b64.yml

# one speed.py per batch size: it prints its figures only at its end, so a timeout loses one row, not all
for batch in "${BATCHES[@]}"; do
    part speed $((170 / ${#BATCHES[@]})) "$PY" "$REPO/bench/speed.py" --device $DEV --archs NestedUNet_wDS \
        "${SPEED[@]}" --batch_sizes "$batch"
done
b16() {
    # 150 s kept for its two val.py runs: a training stopped by its timeout keeps its best epoch's model.pth
    part b16 $((END - SECONDS - 150)) "$PY" "$REPO/train.py" --config "$REPO/$B16" --name b16 --dataset $TRAIN \
        --device $DEV --loader device "${SMALL[@]}"
    [ -f models/b16/model.pth ] || return
    part b16 90 "${SCORE[@]}" val --name b16 --no_overlays
    part b16 90 "${SCORE[@]}" test --name b16 --dataset $TEST --no_overlays
}
b64() {
    part b64 600 "$PY" "$REPO/train.py" --config "$REPO/$B64" --name b64 --dataset $TRAIN --device $DEV \
        --loader device "${SMALL[@]}"
}
b16 &
b64 &
[ ${#GRAPHS[@]} = 0 ] ||
    part speed 300 "$PY" "$REPO/bench/speed.py" --device $DEV --archs NestedUNet_wDS "${SPEED[@]}" "${GRAPHS[@]}" &
wait

cp models/b16/log.csv "$OUT/b16_log.csv"
cp models/b64/log.csv "$OUT/b64_log.csv"
cp outputs/b16/scores.csv "$OUT/b16_val_scores.csv"
cp "outputs/b16_on_$TEST/scores.csv" "$OUT/b16_test_scores.csv"
"$PY" - "$OUT" <<'EOF'
"""summary.json: each part's figures against its goal (issue 17: >= 4,000 img/s and >= 7x the seed loop; the
H200 row of docs/results.md, pooled val IoU 0.8520, within 0.003)."""
import json, os, sys
import pandas as pd

out = sys.argv[1]


def lines(log, start):
    path = os.path.join(out, log)
    return [x for x in open(path).read().splitlines() if x.startswith(start)] if os.path.exists(path) else []


def run(name):
    path = os.path.join(out, f"{name}_log.csv")
    if not os.path.exists(path):
        return None
    log = pd.read_csv(path)
    best = log.loc[log["val_iou"].idxmax()]
    return {"epochs": int(log["epoch"].max()), "seconds": round(float(log["seconds"].sum()), 1),
            "best_epoch": int(best["epoch"]), "best_val_iou": round(float(best["val_iou"]), 4)}


speed = [json.loads(x) for x in lines("speed.log", '{"bench": "speed"')]
rows = [{"compile": s["compile"], "batch": r["batch_size"], "ours_img_s": r["ours"]["images_per_s"],
         "seed_img_s": r["seed"]["images_per_s"], "ratio": r["ratio"], "mfu": r["ours"]["mfu"]}
        for s in speed for r in s["rows"]]
scores = {x.split(" ", 2)[1]: json.loads(x.split(" ", 2)[2]) for x in lines("b16.log", "SCORES ")}
b16 = run("b16")
summary = {
    "device": speed[0]["devices"] if speed else None,
    "a_speed": rows, "a_goal_met": any(r["ours_img_s"] >= 4000 and r["ratio"] >= 7 for r in rows),
    "b_recipe": b16, "b_val": scores.get("val"), "b_test": scores.get("test"),
    "b_goal_met": bool(b16 and b16["epochs"] == 100 and abs(b16["best_val_iou"] - 0.8520) <= 0.003),
    "c_recipe_b64": run("b64"),
}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, indent=1))
EOF
