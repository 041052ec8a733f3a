#!/bin/bash
# One prepared GPU check (e.g. an H200 box whose Python lacks some of SAVLT's packages): the
# screening answer end to end on CUDA (train, predict, evaluate of 3,000 scans, serve), and that
# stopping a command in each phase (training, the decode check, a sweep, the service) leaves no
# process and no GPU memory behind. Run from the repository root with OUT set to a results folder.
# Missing packages come as wheels in .whl/ (cp312 manylinux: open_clip_torch,
# segmentation_models_pytorch, albumentations, albucore, stringzilla, simsimd, fastapi, starlette,
# uvicorn, python-multipart, pydantic, pydantic_core, annotated-types, typing-inspection,
# typing_extensions, opentelemetry-api, ftfy, wcwidth, timm, imagecodecs); NO_PIP=1 skips them.
# MODEL, PER, BIG, STEPS, STOP_AT and EXTRA shrink it for a dry run on a CPU, e.g.
#   OUT=/tmp/o NO_PIP=1 MODEL=tiny PER=8 BIG=40 STEPS=6 STOP_AT=5 EXTRA="--set train.max_steps=12" \
#   bash benchmarks/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
t() { echo "[t=$(( $(date +%s) - START ))s] $*"; }
[ -n "${NO_PIP:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 || { echo "pip failed"; tail -5 "$OUT/pip.log"; }
export PYTHONPATH=/tmp/site:$PWD/src; [ -n "${PY:-}" ] && export PATH="$(dirname $PY):$PATH"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
python3 -c "import torch, transformers, peft, accelerate, open_clip, albumentations, fastapi; print('torch', torch.__version__, 'tf', transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -2
S="python3 -m savlt.cli"
MODEL=${MODEL:-random-vit-b16}; PER=${PER:-40}; BIG=${BIG:-600}; X=${EXTRA:-}
gpu_apps() { command -v nvidia-smi >/dev/null && nvidia-smi --query-compute-apps=pid --format=csv,noheader | wc -l || echo "n/a"; }
left() {  # processes still carrying the tag $1 two seconds on, and GPU compute processes
  sleep 2
  local n=0
  for e in /proc/[0-9]*/environ; do grep -qa "SAVLT_CHECK=$1" "$e" 2>/dev/null && n=$((n+1)); done
  echo "left: $n process(es) tagged $1; GPU compute apps: $(gpu_apps)"
}
( $S synth /tmp/big --centers xiangya --per-class $BIG --seed 11 --no-preview >/tmp/big.log 2>&1; echo "big synth rc $?" >>/tmp/big.log ) &
$S synth /tmp/d --seed 0 --per-class $PER --no-preview >/tmp/d.log 2>&1; echo "synth rc $?"
TIMEFORMAT='wall %R s'
t "1. train K=16 on CUDA (random-vit-b16, bf16 auto)"
time SAVLT_CHECK=train timeout 240 $S train -q --data /tmp/d --model $MODEL --shots 16 --seed 5 --out /tmp/r16 --set eval.bootstrap=200 $X >"$OUT/train16.txt" 2>&1
echo "rc $?"; tail -16 "$OUT/train16.txt"; left train
grep -i "took\|calibration\|operating" /tmp/r16/train.log | cut -c1-220
t "2. predict: referral, rule, prediction sets"
timeout 60 $S predict /tmp/r16 /tmp/d/huaxi/images/cancer /tmp/d/xiangya/images/cyst -q --json > /tmp/p.json 2>/tmp/p.err; echo "rc $?"
python3 - <<'PY'
import json
p = json.load(open("/tmp/p.json"))
hr = {"high-grade_squamous_intraepithelial_lesion", "cancer"}
bad = [x["path"] for x in p if x["predicted"] in hr and x["referral"] != "refer"]
print(len(p), "predictions;", sum(x["referral"] == "refer" for x in p), "referred; contradictions:", bad)
print("rule:", p[0]["referral_rule"]); print("sets:", sorted({len(x["prediction_set"]) for x in p}))
PY
t "3. SIGTERM during training, then the same command again"
( SAVLT_CHECK=stop exec $S train -q --data /tmp/d --model $MODEL --shots 16 --seed 6 --out /tmp/rk --set eval.bootstrap=50 $X >/tmp/rk.txt 2>&1 ) & pid=$!
for i in $(seq 120); do grep -q '"step": ${STOP_AT:-40}' /tmp/rk/history.jsonl 2>/dev/null && break; sleep 0.5; done
echo "stopping at: $(tail -1 /tmp/rk/history.jsonl | cut -c1-60)"; kill -TERM $pid; wait $pid; echo "rc $?"; sleep 5; left stop
time SAVLT_CHECK=again timeout 200 $S train -q --data /tmp/d --model $MODEL --shots 16 --seed 6 --out /tmp/rk --set eval.bootstrap=50 $X >/tmp/rk2.txt 2>&1; echo "rerun rc $?"; grep -c complete /tmp/rk/metrics.json
tail -1 /tmp/big.log
t "4. evaluate 3000 scans (decode check by 16 fork-server workers), then SIGTERM in the decode check"
time SAVLT_CHECK=eval timeout 150 $S evaluate -q /tmp/r16 --data /tmp/big --centers xiangya --out /tmp/ev >"$OUT/eval3000.txt" 2>&1; echo "rc $?"
grep -i "checking\|took" /tmp/ev/evaluate.log | head -3; tail -4 "$OUT/eval3000.txt"
( SAVLT_CHECK=evstop exec $S evaluate /tmp/r16 --data /tmp/big --centers xiangya --out /tmp/ev2 >/tmp/ev2.txt 2>&1 ) & pid=$!
sleep 8; kill -TERM $pid; wait $pid; echo "rc $?"; sleep 4; left evstop; tail -c 300 /tmp/ev2.txt; echo
t "5. a 2-point sweep on the GPU stopped mid-point"
printf "base:\n  data: {root: /tmp/d}\n  model: {backbone: $MODEL}\n  train: {shots: 8, max_steps: ${STEPS:-80}}\n  eval: {bootstrap: 20}\ngrid:\n  seed: [1, 2]\n" > /tmp/sw.yaml
( SAVLT_CHECK=sweep exec $S sweep /tmp/sw.yaml --out /tmp/sw --jobs 2 -q >/tmp/sw.txt 2>&1 ) & pid=$!
for i in $(seq 120); do [ "$(cat /tmp/sw/runs/*/history.jsonl 2>/dev/null | wc -l)" -gt 10 ] && break; sleep 0.5; done
command -v nvidia-smi >/dev/null && nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
kill -TERM $pid; wait $pid; echo "sweep rc $?"; sleep 5; left sweep; tail -3 /tmp/sw.txt
t "6. serve on CUDA, one request, SIGTERM"
( SAVLT_CHECK=serve exec $S serve /tmp/r16 --port 8765 >/tmp/serve.txt 2>&1 ) & pid=$!
for i in $(seq 120); do curl -s 127.0.0.1:8765/health | grep -q ready && break; sleep 0.5; done
curl -s -F files=@$(ls /tmp/d/huaxi/images/cancer/* | head -1) 127.0.0.1:8765/predict | python3 -c "import json,sys; p=json.load(sys.stdin)['predictions'][0]; print(p['predicted'], p['referral'], p['prediction_set'])"
kill -TERM $pid; wait $pid; echo "serve rc $?"; sleep 3; left serve
t "done"
