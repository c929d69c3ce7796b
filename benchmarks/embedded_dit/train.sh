# Device call: train the embedded DiT (apps/train_embedded_dit.py) for the time left, export it, and measure it with
# the quality harness at several guidance scales and scheduler shifts. Run from the repo root, .whl and .data carried:
#   bash benchmarks/embedded_dit/train.sh [INIT_FROM [SEED]]
# Until the shared CLIP file's tensor names were fixed (2026-12-02), .whl had to hold transformers>=5.24: 5.17
# loaded that CLIP at random, and the training script stops if a text encoder did not load. INIT_FROM: a pipeline folder whose transformer to continue from, for a second call (the first call's weights
# installed in accel/models/mini-sd3-cifar10); give it another SEED so that its batches differ.
# $OUT receives transformer.tar (config + fp16 weights), dit_result.json, train.log, eval.log, sweep.md, sweep.json
# and eval.tar (every setting's eval.json / eval.md, and the `accel eval` run's).
# SMOKE=1: the same steps on the CPU at tiny sizes (synthetic training images, 20 generated and 50 test images).
set -o pipefail
T0=$(date +%s); INIT=${1:-}; SEED=${2:-0}
if [ -n "$SMOKE" ]; then
  export PYTHONPATH=$PWD; OUT=${OUT:-out/dit-smoke}; W=$(mktemp -d)/dit; END=300; RESERVE=200; DEVICE=cpu
  TRAIN="--synthetic 64 --batch-size 8 --max-steps 3 --width 32 --depth 2 --head-dim 16"
  EVAL="--n 20 --steps 2 --batch-size 10"; SWEEP="--guidance 4 --shift 1 2"
  # A test set of 5 images per class, so that the classifier's features of it take no time on the CPU.
  SRC=$(python3 -c "from accel.quality.cifar import default_cifar10_dir; print(default_cifar10_dir())")
  mkdir -p $W/cifar && tar xzf $SRC/test.tar.gz -C $W/cifar --wildcards 'test/*/000[0-4].jpg' \
    && tar czf $W/cifar/test.tar.gz -C $W/cifar test && export ACCEL_CIFAR10_DIR=$W/cifar || exit 1
else
  source benchmarks/device_setup.sh
  export ACCEL_CIFAR10_DIR=$PWD/.data TQDM_MININTERVAL=10; W=/tmp/work/dit; END=560; RESERVE=110; DEVICE=cuda
  python3 -c "import torch, diffusers, transformers, accelerate; print(torch.__version__, diffusers.__version__, transformers.__version__, accelerate.__version__)"
  TRAIN="--max-steps 1000000 --checkpoint-every 1000000 --compile"
  EVAL="--n 1000 --steps 28 --batch-size 250"; SWEEP="--guidance 3 4 5 --shift 1 2"
fi
mkdir -p $OUT $W
# The time budget counts the training loop alone; RESERVE covers start-up (data, encoding), evaluation and packing.
BUDGET=$(( END - ($(date +%s) - T0) - RESERVE ))
echo "training budget $BUDGET s"
python3 -m apps.train_embedded_dit --out $W $TRAIN --seed $SEED ${INIT:+--init-from $INIT} --time-budget $BUDGET 2>&1 \
  | tee $OUT/train.log | grep -a -e resumed -e initialised -e "torch.compile" -e Error -e '^{' || exit 1
python3 benchmarks/embedded_dit/sweep.py --model $W/pipeline --device $DEVICE $EVAL $SWEEP --out $W/eval 2>&1 \
  | tee $OUT/eval.log | grep -a -e '^\[sweep\]' -e Error
# The command line's own path, at one of the sweep's settings (shift 1 is the exported scheduler's): the same numbers.
python3 -m apps.cli eval --model $W/pipeline --device $DEVICE $EVAL --guidance 4 --out $W/eval/accel-eval 2>&1 \
  | tee -a $OUT/eval.log | grep -a -e Error -e wrote
cp $W/dit_result.json $W/eval/sweep.md $W/eval/sweep.json $OUT/
tar cf $OUT/transformer.tar -C $W/pipeline transformer && tar cf $OUT/eval.tar -C $W eval
cat $OUT/sweep.md; ls -la $OUT; echo "total $(( $(date +%s) - T0 )) s"
